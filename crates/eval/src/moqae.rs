//! MoQAE in the eval: the learned router trained (or loaded) per model and λ, and the λ sweep
//! on prose — average bits against continuation NLL, the paper's table shape — beside fp16,
//! KIVI-4, KIVI-2 and the heuristic router at the bytes each learned row reached.
use crate::data;
use crate::error::{IoContext, Result};
use crate::measure::{EntryCtx, prefill_all};
use crate::methods::{Build, Entry};
use crate::progress::{Event, Progress};
use crate::session::Session;
use axis_quant::moqae::learned::{LearnedRouter, TrainOptions, Voting, train};
use axis_quant::moqae::{AttentionMassRouter, BudgetedRouter, ChunkRouter, DEFAULT_CHUNK};
use kv_tensor::{Bits, KvBackend, LayerShape};
use models::PrefillOptions;
use serde::Serialize;
use std::sync::Arc;

/// Calibration passages the router is trained on.
pub const TRAIN_PASSAGES: usize = 2;
/// Context tokens of a training passage (the routed tokens).
pub const TRAIN_CONTEXT: usize = 1024;
/// Held-out continuation tokens whose attention weighs the routed tokens.
pub const TRAIN_FUTURE: usize = 64;
/// How a learned router is trained and used: λ, tokens per chunk (a multiple of the KIVI
/// group, 32) and adjacent layers per router (routing sharing; `usize::MAX`: one router).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterConfig {
    /// Weight of the model term against the memory term, in [0, 1].
    pub lambda: f64,
    /// Tokens per routed chunk.
    pub chunk: usize,
    /// Adjacent layers sharing one router.
    pub layers_per_router: usize,
}

impl Default for RouterConfig {
    /// The router the budgeted `moqae` entries rank chunks with: λ = 0.5, MoQAE's 32-token
    /// chunks, one router shared by every layer (the paper's routing sharing).
    fn default() -> Self {
        Self {
            lambda: 0.5,
            chunk: DEFAULT_CHUNK,
            layers_per_router: usize::MAX,
        }
    }
}

impl RouterConfig {
    fn check(&self) -> Result<()> {
        let group = axis_quant::GroupSize::DEFAULT.get();
        if self.chunk == 0 || !self.chunk.is_multiple_of(group) {
            return Err(crate::EvalError::Options(format!(
                "MoQAE chunk {} tokens: a multiple of the quantization group ({group})",
                self.chunk
            )));
        }
        if !(0.0..=1.0).contains(&self.lambda) || self.layers_per_router == 0 {
            return Err(crate::EvalError::Options(format!(
                "MoQAE λ {} (in [0, 1]) and {} layers per router (at least 1)",
                self.lambda, self.layers_per_router
            )));
        }
        Ok(())
    }

    fn file_name(&self, sha: &str) -> String {
        let share = if self.layers_per_router == usize::MAX {
            String::new()
        } else {
            format!("-g{}", self.layers_per_router)
        };
        format!(
            "{}-moqae-l{}-c{}{share}.json",
            &sha[..12],
            self.lambda,
            self.chunk
        )
    }
}
/// λ values of `cargo xtask moqae`'s sweep.
pub const SWEEP: [f64; 5] = [0.2, 0.35, 0.5, 0.65, 0.8];

/// λ values of the sweep at the end of the default eval (its ends and middle, to keep the run's
/// time).
pub const EVAL_SWEEP: [f64; 3] = [0.2, 0.5, 0.8];

fn bits(b: u8) -> Bits {
    Bits::try_from(b).unwrap_or(Bits::Full)
}

/// MoQAE's expert set.
pub fn experts() -> Vec<Bits> {
    AttentionMassRouter::default_experts()
}

impl<B: KvBackend> Session<B> {
    /// The router trained as `cfg` says on this model's calibration prose, from the calibration
    /// directory (`<sha12>-moqae-l<λ>-c<chunk>[-g<layers>].json`, checked against the model's
    /// features) or trained and written there.
    pub fn moqae_router(
        &self,
        cfg: &RouterConfig,
        progress: &dyn Progress,
    ) -> Result<Arc<LearnedRouter>> {
        cfg.check()?;
        let lambda = cfg.lambda;
        let path = self.calibration_dir().join(cfg.file_name(&self.sha));
        let layout = self.model.model.config.kv_layout();
        let features = 2 * layout.kv_heads * layout.head_dim;
        if let Ok(text) = std::fs::read_to_string(&path) {
            match serde_json::from_str::<LearnedRouter>(&text) {
                Ok(r) if r.features() == features && r.lambda == lambda => {
                    progress.event(Event::Note(&format!("MoQAE router: {}", path.display())));
                    return Ok(Arc::new(r));
                }
                _ => progress.event(Event::Note(&format!(
                    "{} is stale or invalid: retraining",
                    path.display()
                ))),
            }
        }
        let ids: Vec<Vec<u32>> = (0..TRAIN_PASSAGES)
            .map(|i| self.passage(100_000 + i * 200_000, TRAIN_CONTEXT + TRAIN_FUTURE))
            .collect::<Result<_>>()?;
        let t0 = std::time::Instant::now();
        let set = solver::moqae::training_set(
            &self.model.model,
            &ids,
            TRAIN_CONTEXT,
            TRAIN_FUTURE,
            cfg.chunk,
            |_, _| {},
        )?;
        let opts = TrainOptions {
            lambda,
            layers_per_router: cfg.layers_per_router,
            ..Default::default()
        };
        progress.event(Event::Start {
            what: "train MoQAE router",
            total: opts.steps as u64,
        });
        let router = train::<B>(&set, &experts(), &opts, self.device(), |d, _| {
            progress.event(Event::Done(d as u64))
        })?;
        progress.event(Event::Finish);
        progress.event(Event::Note(&format!(
            "trained the MoQAE router at λ = {lambda} on {} tokens × {} layers in {:.0} s",
            set.weight.len() / layout.layers.max(1),
            layout.layers,
            t0.elapsed().as_secs_f64()
        )));
        std::fs::create_dir_all(self.calibration_dir()).at(self.calibration_dir())?;
        std::fs::write(&path, serde_json::to_string(&router)?).at(&path)?;
        Ok(Arc::new(router))
    }
}

/// One row of the λ sweep, averaged over the prose samples.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    /// `fp16`, `int4`, `int2` (every chunk but the first at that width), `moqae λ=…` or `moqae-heuristic @ λ=…`.
    pub method: String,
    /// Effective bits per stored value: 16 × measured bytes / fp16 bytes (scales, the fp16
    /// first chunk and the residual tail included).
    pub bits: f64,
    /// Continuation NLL (nats per token).
    pub nll: f64,
    /// KL of next-token distributions to the fp16 cache.
    pub kl: f64,
}

/// What the λ sweep measures.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// λ values, each its own trained router.
    pub lambdas: Vec<f64>,
    /// Chunk size and routing sharing (its λ is replaced by each of `lambdas`).
    pub router: RouterConfig,
    /// Prose samples.
    pub prose_samples: usize,
    /// Context tokens of each.
    pub context: usize,
    /// Continuation tokens scored.
    pub continuation: usize,
    /// Seed of the samples (the eval's, for the eval's samples).
    pub seed: u64,
}

/// The sweep on prose samples (the eval's, for the same seed): each learned λ routed as trained (argmax and
/// majority vote), each followed by the heuristic fitted to the bytes it reached.
pub fn sweep<B: KvBackend>(
    session: &Session<B>,
    opts: &SweepOptions,
    progress: &dyn Progress,
) -> Result<Vec<SweepRow>> {
    let base = &opts.router;
    let routers: Vec<(f64, Arc<LearnedRouter>)> = opts
        .lambdas
        .iter()
        .map(|&lambda| {
            let cfg = RouterConfig { lambda, ..*base };
            Ok((lambda, session.moqae_router(&cfg, progress)?))
        })
        .collect::<Result<_>>()?;
    let m = &session.model;
    let samples = data::prose_samples(
        &m.tokenizer,
        &session.text,
        opts.prose_samples,
        opts.context,
        opts.continuation,
        opts.seed,
    )?;
    let groups = vec![(opts.context, samples)];
    let recs = prefill_all(m, &groups, &PrefillOptions::default(), progress)?;
    let layout = m.model.config.kv_layout();
    let fp16 = layout.fp16_bytes(1, opts.context).get();
    let mut sums: Vec<(String, [f64; 3])> = Vec::new();
    let mut add = |name: &str, v: [f64; 3]| match sums.iter_mut().find(|(n, _)| n == name) {
        Some((_, s)) => (0..3).for_each(|i| s[i] += v[i]),
        None => sums.push((name.to_string(), v)),
    };
    progress.event(Event::Start {
        what: "MoQAE λ sweep",
        total: (groups[0].1.len() * (3 + 2 * routers.len())) as u64,
    });
    for (i, (sample, rec)) in groups[0].1.iter().zip(&recs).enumerate() {
        let ctx = EntryCtx {
            m,
            axes: &session.axes,
            rec,
            own_prefill: None,
            sample,
            length: opts.context,
            index: i,
            fp16,
        };
        let measure = |name: &str, build: Build, reference| {
            let e = Entry {
                name: name.into(),
                budget: "-".into(),
                build,
            };
            let r = ctx.measure(&e, reference)?;
            progress.event(Event::Step);
            Ok::<_, crate::EvalError>(r)
        };
        let full = measure("fp16", Build::Full, None)?;
        let reference = full.logp.clone();
        let row = |r: &crate::measure::Record| {
            [
                16.0 / r.ratio,
                r.nll.unwrap_or(f64::NAN),
                r.kl.unwrap_or(f64::NAN),
            ]
        };
        add("fp16", row(&full.record));
        for (name, b) in [("int4", 4), ("int2", 2)] {
            let router: Arc<dyn ChunkRouter> = Arc::new(BudgetedRouter {
                high: bits(b),
                low: bits(b),
                share: kv_tensor::Ratio::ONE,
            });
            let r = measure(name, Build::Chunks(router, base.chunk), reference.as_ref())?;
            add(name, row(&r.record));
        }
        for (lambda, router) in &routers {
            let voting: Arc<dyn ChunkRouter> = Arc::new(Voting {
                router: router.clone(),
            });
            let learned = measure(
                "moqae",
                Build::Chunks(voting, base.chunk),
                reference.as_ref(),
            )?;
            add(&format!("moqae λ={lambda}"), row(&learned.record));
            let shape: LayerShape = layout.layer_shape(1, sample.context().len());
            let heuristic =
                matched_heuristic(&shape, layout.layers, learned.record.bytes, base.chunk);
            let r = measure(
                "heuristic",
                Build::Chunks(heuristic, base.chunk),
                reference.as_ref(),
            )?;
            add(&format!("moqae-heuristic @ λ={lambda}"), row(&r.record));
        }
    }
    progress.event(Event::Finish);
    let n = groups[0].1.len().max(1) as f64;
    Ok(sums
        .into_iter()
        .map(|(method, s)| SweepRow {
            method,
            bits: s[0] / n,
            nll: s[1] / n,
            kl: s[2] / n,
        })
        .collect())
}

/// The heuristic (attention-mass ranking) at `bytes`: the widest adjacent pair of MoQAE's
/// experts whose narrower width alone fits, with the largest share of the wider that fits.
fn matched_heuristic(
    shape: &LayerShape,
    layers: usize,
    bytes: u64,
    chunk: usize,
) -> Arc<dyn ChunkRouter> {
    for (high, low) in [(16, 4), (4, 2)] {
        if let Some(r) = BudgetedRouter::fit(
            bits(high),
            bits(low),
            shape,
            chunk,
            layers,
            kv_tensor::Bytes(bytes),
        ) {
            return Arc::new(r);
        }
    }
    Arc::new(BudgetedRouter {
        high: bits(2),
        low: bits(2),
        share: kv_tensor::Ratio::ONE,
    })
}

/// The sweep as a markdown table.
pub fn markdown(rows: &[SweepRow]) -> String {
    let mut s = String::from("| method | avg bits | prose NLL | KL to fp16 |\n|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.2} | {:.4} | {:.4} |\n",
            r.method, r.bits, r.nll, r.kl
        ));
    }
    s
}
