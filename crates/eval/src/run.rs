//! The comparison: every method on identical inputs at matched bytes.
//!
//! Protocol (kvpress-style, question-agnostic): each sample's context is prefilled once with
//! full attention (shared by every method); each method's caches then receive that prefill's
//! K/V and observations and compress at the end of prefill; the probe (a prose continuation or
//! a question) is appended afterwards and scored through the compressed cache. With
//! `chunked_prefill`, every method prefills the context itself and compresses chunk by chunk.
use crate::data::{self, Sample};
use crate::decode::{Generation, generate};
use crate::error::{EvalError, Result};
use crate::measure::{EntryCtx, Measured, Record, prefill_all};
use crate::methods::Build;
use crate::methods::PlanRecord;
use crate::methods::{self, Entry, Skips};
use crate::options::EvalOptions;
use crate::paired;
use crate::progress::{Event, Progress};
use crate::report::{self, Report};
use crate::session::Session;
use crate::stats::{self, Summary};
use crate::tasks::{self, QaSet, Task};
use kv_tensor::KvBackend;
use models::PrefillOptions;
use rayon::prelude::*;
use solver::Budget;

/// Samples of one context length.
type Group = (usize, Vec<Sample>);

/// What a run measured and wrote.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// One record per method, budget and sample.
    pub records: Vec<Record>,
    /// Means per shown row (methods with identical plans share one).
    pub summary: Vec<Summary>,
    /// Paired comparisons of every row with full and with the best other method.
    pub comparisons: Vec<paired::Comparison>,
    /// Every distinct per-layer plan.
    pub plans: Vec<PlanRecord>,
    /// Methods not planned for some samples, one line each.
    pub skipped: Vec<String>,
    /// Wall seconds after calibration and sample generation.
    pub seconds: f64,
    /// What was written.
    pub report: Report,
}

/// Runs the comparison of `opts` on `session`'s model: calibrates (or reuses the table),
/// generates the samples, plans every method for every sample, measures, and writes results
/// to `opts.out`. Fails if any method held more than its budget or scored a non-finite value.
pub fn run<B: KvBackend>(
    session: &Session<B>,
    opts: &EvalOptions,
    progress: &dyn Progress,
) -> Result<Outcome> {
    check_options(session, opts)?;
    let table = session.table(&opts.calibration, None, progress)?;
    let groups = samples(session, opts, progress)?;
    let mut skips = Skips::default();
    let learned = if opts.quick {
        None
    } else {
        Some(session.moqae_router(&crate::moqae::RouterConfig::default(), progress)?)
    };
    let plans = plan_all(session, &table, &groups, opts, learned.as_ref(), &mut skips)?;
    let skipped = skips.lines(groups.iter().map(|(_, s)| s.len()).sum());
    for line in &skipped {
        progress.event(Event::Note(line));
    }
    let t0 = std::time::Instant::now();
    let records = measure_all(session, &groups, &plans, opts, progress)?;
    let seconds = t0.elapsed().as_secs_f64();
    let summary = stats::summarize(&records, &opts.lengths);
    let shown: Vec<(String, String)> = summary
        .iter()
        .map(|s| (s.method.clone(), s.budget.clone()))
        .collect();
    let comparisons = paired::all(&records, &shown, opts.seed);
    let plan_records = plan_records(&groups, &plans);
    let moqae = if opts.quick || opts.prose_samples == 0 {
        Vec::new()
    } else {
        let sweep = crate::moqae::SweepOptions {
            lambdas: crate::moqae::EVAL_SWEEP.to_vec(),
            router: crate::moqae::RouterConfig::default(),
            prose_samples: opts.prose_samples,
            context: opts.prose_context,
            continuation: opts.continuation,
            seed: opts.seed,
        };
        crate::moqae::sweep(session, &sweep, progress)?
    };
    let long = match &opts.long_generation {
        Some(lg) => Some(crate::longgen::run(session, lg, progress)?),
        None => None,
    };
    let findings = report::Findings {
        summary: &summary,
        records: &records,
        comparisons: &comparisons,
        plans: &plan_records,
        skipped: &skipped,
        seconds,
        moqae: &moqae,
        long_generation: long.as_ref().zip(opts.long_generation.as_ref()),
    };
    let report = report::write(opts, &findings)?;
    let layout = session.model.model.config.kv_layout();
    stats::check_matched_bytes(&records, |t| layout.fp16_bytes(1, t))?;
    stats::check_evidence(&summary, &comparisons, &plan_records, opts.quick)?;
    Ok(Outcome {
        records,
        summary,
        comparisons,
        plans: plan_records,
        skipped,
        seconds,
        report,
    })
}

/// Positions kept free after a context for the question and the answer.
const ANSWER_ROOM: usize = 512;

fn check_options<B: KvBackend>(session: &Session<B>, opts: &EvalOptions) -> Result<()> {
    let max_ctx = session.model.model.config.context;
    for &l in opts.lengths.iter().chain([&opts.prose_context]) {
        if l + ANSWER_ROOM > max_ctx {
            return Err(EvalError::Options(format!(
                "context {l} leaves no room for the question and answer in the model's {max_ctx} positions"
            )));
        }
    }
    opts.check_calibration()?;
    if opts.lengths.is_empty() || opts.budgets.is_empty() {
        return Err(EvalError::Options(
            "at least one length and one budget".into(),
        ));
    }
    for b in &opts.budgets {
        b.parse::<Budget>()?;
    }
    Ok(())
}

/// The QA data sets the selected tasks need.
fn qa_sets(opts: &EvalOptions) -> Result<(Option<QaSet>, Option<QaSet>)> {
    if !opts.tasks.iter().any(|t| t.needs_qa()) {
        return Ok((None, None));
    }
    let dir = opts
        .qa_dir
        .as_ref()
        .ok_or_else(|| EvalError::Options("qa_1 and qa_2 need the QA documents (qa_dir)".into()))?;
    let squad = (opts.tasks.contains(&Task::Qa1))
        .then(|| QaSet::squad(&dir.join("squad.json")))
        .transpose()?;
    let hotpot = (opts.tasks.contains(&Task::Qa2))
        .then(|| QaSet::hotpot(&dir.join("hotpotqa.json")))
        .transpose()?;
    Ok((squad, hotpot))
}

/// Every task sample (each task at its lengths) and the prose samples, grouped by length.
fn samples<B: KvBackend>(
    session: &Session<B>,
    opts: &EvalOptions,
    progress: &dyn Progress,
) -> Result<Vec<Group>> {
    let m = &session.model;
    let (squad, hotpot) = qa_sets(opts)?;
    let src = tasks::Sources::new(
        data::evaluation_text(&session.text),
        squad.as_ref(),
        hotpot.as_ref(),
    );
    let chat = if opts.raw { None } else { m.chat.as_ref() };
    let mut groups: Vec<Group> = Vec::new();
    progress.event(Event::Start {
        what: "generate",
        total: (opts.lengths.len() * opts.tasks.len()) as u64,
    });
    for (li, &length) in opts.lengths.iter().enumerate() {
        let mut samples = Vec::new();
        for (i, &task) in opts.tasks.iter().enumerate() {
            // Without `grid`, task i runs at length i mod (number of lengths) only.
            if !opts.grid && i % opts.lengths.len() != li {
                continue;
            }
            let ti = Task::ALL.iter().position(|t| *t == task).unwrap_or(0);
            for i in 0..opts.samples.of(task) {
                let seed = data::sample_seed(opts.seed, ti, length, i);
                let t = tasks::fit(task, &src, &m.tokenizer, chat, length, seed)?;
                samples.push(Sample::Task(t));
            }
            progress.event(Event::Step);
        }
        groups.push((length, samples));
    }
    progress.event(Event::Finish);
    if let Some(d) = &opts.dataset {
        let max = m.model.config.context.saturating_sub(ANSWER_ROOM);
        let user = crate::dataset::load(d, &m.tokenizer, chat, max)?;
        let longest = user.iter().map(|t| t.context.len()).max().unwrap_or(0);
        progress.event(Event::Note(&format!(
            "{}: {} samples, contexts up to {longest} tokens",
            d.path.display(),
            user.len()
        )));
        groups.push((longest, user.into_iter().map(Sample::Task).collect()));
    }
    if opts.prose_samples > 0 {
        let prose = data::prose_samples(
            &m.tokenizer,
            &session.text,
            opts.prose_samples,
            opts.prose_context,
            opts.continuation,
            opts.seed,
        )?;
        match groups.iter_mut().find(|(l, _)| *l == opts.prose_context) {
            Some((_, g)) => g.extend(prose),
            None => groups.push((opts.prose_context, prose)),
        }
    }
    Ok(groups)
}

/// Methods for every sample, planned for its exact context length (budgets are fractions of
/// its fp16 bytes; a plan made for a longer context can overshoot on a shorter one, because
/// the quantized/dense split of a residual window moves in whole groups).
fn plan_all<B: KvBackend>(
    session: &Session<B>,
    table: &solver::SensitivityTable,
    groups: &[Group],
    opts: &EvalOptions,
    learned: Option<&std::sync::Arc<axis_quant::moqae::learned::LearnedRouter>>,
    skips: &mut Skips,
) -> Result<Vec<Vec<Vec<Entry>>>> {
    let layout = session.model.model.config.kv_layout();
    let mut plans = Vec::new();
    for (_, samples) in groups {
        let mut per = Vec::new();
        for sample in samples {
            let tokens = sample.context().len();
            let geo = session.geometry(tokens);
            let fp16 = layout.fp16_bytes(1, tokens);
            let budgets: Vec<(String, u64)> = opts
                .budgets
                .iter()
                .map(|b| Ok((b.clone(), b.parse::<Budget>()?.bytes(fp16).get())))
                .collect::<Result<_, solver::SolverError>>()?;
            per.push(methods::entries(
                table,
                &geo,
                &budgets,
                opts.quick,
                &opts.methods,
                learned,
                skips,
            ));
        }
        plans.push(per);
    }
    Ok(plans)
}

/// Every distinct plan each method used at each budget, with the context lengths it served.
fn plan_records(groups: &[Group], plans: &[Vec<Vec<Entry>>]) -> Vec<PlanRecord> {
    let mut out: Vec<PlanRecord> = Vec::new();
    for ((_, samples), per) in groups.iter().zip(plans) {
        for (sample, entries) in samples.iter().zip(per) {
            let tokens = sample.context().len();
            for e in entries {
                let Build::Plan(plan) = &e.build else {
                    continue;
                };
                let same = |p: &&mut PlanRecord| {
                    p.method == e.name && p.budget == e.budget && p.plan == *plan
                };
                match out.iter_mut().find(same) {
                    Some(p) if !p.tokens.contains(&tokens) => p.tokens.push(tokens),
                    Some(_) => {}
                    None => out.push(PlanRecord {
                        method: e.name.clone(),
                        budget: e.budget.clone(),
                        tokens: vec![tokens],
                        plan: plan.clone(),
                    }),
                }
            }
        }
    }
    out
}

/// Seconds in prefill (wall), compression, probes (teacher forcing, prose, generation set-up)
/// and batched generation; compression and probes run on every core and are summed over them.
#[derive(Debug, Default)]
struct Phases([f64; 4]);

/// Prefills every sample once, then measures every method on it.
fn measure_all<B: KvBackend>(
    session: &Session<B>,
    groups: &[Group],
    plans: &[Vec<Vec<Entry>>],
    opts: &EvalOptions,
    progress: &dyn Progress,
) -> Result<Vec<Record>> {
    let t0 = std::time::Instant::now();
    let plan_layers = plans
        .iter()
        .flatten()
        .flatten()
        .flat_map(|e| e.plan_layers());
    // One full prefill per sample, shared by every method: all of them first, on every core.
    let needs = router::Needs::of(plan_layers);
    let popts = solver::observing(needs);
    // KVzip's pass runs after the last chunk: KVzip layers keep their prompt until then,
    // the others compress as they go.
    let chunked = PrefillOptions {
        compress_chunks: true,
        ..popts
    };
    let mut recordings = prefill_all(&session.model, groups, &popts, progress)?.into_iter();
    let mut phases = Phases([t0.elapsed().as_secs_f64(), 0.0, 0.0, 0.0]);
    let total: usize = plans.iter().flatten().map(Vec::len).sum();
    progress.event(Event::Start {
        what: "evaluate",
        total: total as u64,
    });
    let mut records: Vec<Record> = Vec::new();
    for ((length, samples), per) in groups.iter().zip(plans) {
        for (si, (sample, entries)) in samples.iter().zip(per).enumerate() {
            let rec = recordings
                .next()
                .ok_or(EvalError::Internal("a sample's prefill is missing"))?;
            progress.event(Event::Message(&format!("{}@{length}", sample.task())));
            let ctx = EntryCtx {
                m: &session.model,
                axes: &session.axes,
                rec: &rec,
                own_prefill: opts.chunked_prefill.then_some(&chunked),
                sample,
                length: *length,
                index: si,
                fp16: session
                    .model
                    .model
                    .config
                    .kv_layout()
                    .fp16_bytes(1, sample.context().len())
                    .get(),
            };
            records.extend(measure_sample(&ctx, entries, &mut phases, progress)?);
        }
    }
    progress.event(Event::Finish);
    let [p, c, q, g] = phases.0;
    progress.event(Event::Note(&format!(
        "time: {:.0} s; prefill {p:.0} s, compression {c:.0} s and probes {q:.0} s (summed over {} workers), batched generation {g:.0} s",
        t0.elapsed().as_secs_f64(),
        rayon::current_num_threads(),
    )));
    Ok(records)
}

/// Every method on one sample: the distinct plans measured (in parallel), twins copied, the
/// pending answers generated in lockstep and scored.
fn measure_sample<B: KvBackend>(
    ctx: &EntryCtx<'_, B>,
    entries: &[Entry],
    phases: &mut Phases,
    progress: &dyn Progress,
) -> Result<Vec<Record>> {
    // For each entry, the earlier entry with the same caches (measured once, shown under both).
    let twins: Vec<Option<usize>> = (0..entries.len())
        .map(|ei| Entry::same_as(entries, ei))
        .collect();
    let mut results = measure_unique(ctx, entries, &twins, progress)?;
    let mut records: Vec<Record> = Vec::with_capacity(entries.len());
    let mut pending: Vec<Generation<B>> = Vec::new();
    for (ei, entry) in entries.iter().enumerate() {
        let r = match twins[ei] {
            Some(j) => {
                let mut r = records[j].clone();
                r.method = entry.name.clone();
                r.budget = entry.budget.clone();
                r.same_as = Some(entries[j].name.clone());
                progress.event(Event::Step);
                r
            }
            None => {
                let got = results[ei]
                    .take()
                    .ok_or(EvalError::Internal("an entry was not measured"))?;
                phases.0[1] += got.record.seconds[0];
                phases.0[2] += got.record.seconds[1];
                if let Some((caches, out)) = got.generation {
                    pending.push(Generation {
                        record: records.len(),
                        caches,
                        out,
                    });
                }
                got.record
            }
        };
        records.push(r);
    }
    if let Sample::Task(t) = ctx.sample {
        let tg = std::time::Instant::now();
        // One lockstep batch per core (a batch's attention runs on one thread).
        let half = pending.len().div_ceil(rayon::current_num_threads()).max(1);
        pending
            .par_chunks_mut(half)
            .try_for_each(|batch| generate(ctx.m, t, batch))?;
        phases.0[3] += tg.elapsed().as_secs_f64();
        for g in pending.drain(..) {
            records[g.record].prediction = Some(ctx.m.tokenizer.decode(&g.out)?);
        }
        // Entries measured once share their twin's prediction.
        for (ei, twin) in twins.iter().enumerate() {
            if let Some(j) = *twin {
                records[ei].prediction = records[j].prediction.clone();
            }
        }
        for r in &mut records {
            if let Some(p) = &r.prediction {
                r.score = Some(t.metric.score(p, &t.refs));
            }
        }
    }
    Ok(records)
}

/// The entries with distinct caches measured, on every core. On prose the full cache runs
/// first: its next-token distributions are the KL reference.
fn measure_unique<B: KvBackend>(
    ctx: &EntryCtx<'_, B>,
    entries: &[Entry],
    twins: &[Option<usize>],
    progress: &dyn Progress,
) -> Result<Vec<Option<Measured<B>>>> {
    let mut results: Vec<Option<Measured<B>>> = (0..entries.len()).map(|_| None).collect();
    let unique: Vec<usize> = (0..entries.len())
        .filter(|&ei| twins[ei].is_none())
        .collect();
    let (reference, rest) = match ctx.sample {
        Sample::Prose { .. } => {
            let (first, rest) = unique
                .split_first()
                .ok_or_else(|| EvalError::Options("no methods to evaluate".into()))?;
            let head = ctx.measure(&entries[*first], None)?;
            let reference = head.logp.clone();
            progress.event(Event::Step);
            results[*first] = Some(head);
            (reference, rest)
        }
        Sample::Task(_) => (None, &unique[..]),
    };
    // Each method owns its caches; the model, the recorded prefill and the calibrated axes
    // are shared read-only.
    let measured: Vec<(usize, Measured<B>)> = rest
        .par_iter()
        .map(|&ei| {
            let r = ctx.measure(&entries[ei], reference.as_ref());
            progress.event(Event::Step);
            r.map(|r| (ei, r))
        })
        .collect::<Result<_>>()?;
    for (ei, r) in measured {
        results[ei] = Some(r);
    }
    Ok(results)
}
