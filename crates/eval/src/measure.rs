//! Measuring one method on one sample: its caches built from the shared recorded prefill (or
//! a chunked prefill of its own), then the probe — prose NLL and KL to the full cache, or a
//! task's teacher-forced answer and the start of free generation.
use crate::data::Sample;
use crate::error::{EvalError, Result};
use crate::methods::Entry;
use crate::progress::{Event, Progress};
use crate::tasks::TaskSample;
use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use kv_tensor::KvBackend;
use kv_tensor::{LayerCache, RecordingCache};
use models::{LoadedModel, Logits, PrefillOptions};
use serde::Serialize;

/// One method on one sample.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Method name.
    pub method: String,
    /// Budget label (`1/8`), `-` for budget-free methods.
    pub budget: String,
    /// Nominal context length of the sample.
    pub length: usize,
    /// RULER task name, or `prose`.
    pub task: &'static str,
    /// Index of the sample among its length's samples.
    pub sample: usize,
    /// Context tokens of the sample (at most `length`).
    pub tokens: usize,
    /// Measured cache bytes after the context.
    pub bytes: u64,
    /// fp16 K+V bytes of the context / `bytes`.
    pub ratio: f64,
    /// RULER score of the free-generation answer, 0–100.
    pub score: Option<f64>,
    /// Mean log-probability of the gold answer's tokens (teacher forcing).
    pub tf_logp: Option<f64>,
    /// Share of the gold answer's tokens that are the argmax (teacher forcing).
    pub tf_acc: Option<f64>,
    /// Prose: NLL of the continuation.
    pub nll: Option<f64>,
    /// Prose: KL of next-token distributions to the full cache.
    pub kl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The greedy answer (tasks).
    pub prediction: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    /// The reference answers (tasks).
    pub refs: Vec<String>,
    /// The method whose caches were identical on this sample (measured once; its results are
    /// this record's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub same_as: Option<String>,
    /// Seconds building the compressed caches and running the probes (teacher forcing or
    /// prose scoring; the batched generation is not counted), on one worker. A twin's are
    /// its measured entry's.
    pub seconds: [f64; 2],
}

/// One method's caches, one per layer.
pub type Caches<B> = Vec<Box<dyn LayerCache<B>>>;

/// Teacher-forced scores of a task's gold answer.
struct TeacherForced {
    logp: f64,
    acc: f64,
    /// The first gold token that is not the argmax, with the argmax there.
    first_miss: Option<(usize, u32)>,
}

/// What every method of one sample shares: the model, the calibrated axes, the recorded full
/// prefill and the sample.
pub struct EntryCtx<'a, B: KvBackend> {
    /// The model.
    pub m: &'a LoadedModel<B>,
    /// The calibrated axes plans share.
    pub axes: &'a router::Axes<B>,
    /// The sample's recorded full prefill.
    pub rec: &'a [RecordingCache<B>],
    /// `Some`: every method prefills the context itself with these options (chunk by chunk).
    pub own_prefill: Option<&'a PrefillOptions>,
    /// The sample.
    pub sample: &'a Sample,
    /// Its nominal context length.
    pub length: usize,
    /// Its index among its length's samples.
    pub index: usize,
    /// fp16 K+V bytes of its context.
    pub fp16: u64,
}

/// One method measured on one sample.
pub struct Measured<B: KvBackend> {
    /// The record (prediction and score still empty for an answer to generate).
    pub record: Record,
    /// Log-probabilities of the prose continuation (the full cache's are the KL reference).
    pub logp: Option<Tensor<B, 2>>,
    /// Caches and tokens so far of a greedy answer still to finish.
    pub generation: Option<(Caches<B>, Vec<u32>)>,
}

impl<B: KvBackend> EntryCtx<'_, B> {
    /// `entry`'s caches holding the sample's context, compressed: from the shared recorded
    /// prefill, or by a prefill of the method's own that compresses chunk by chunk.
    fn caches(&self, entry: &Entry) -> Result<Caches<B>> {
        match self.own_prefill {
            None => compressed(entry, self.rec, self.axes),
            Some(opts) => {
                let mut caches = entry.caches(self.rec.len(), self.axes);
                self.m
                    .model
                    .prefill(self.sample.context(), &mut caches, opts)?;
                Ok(caches)
            }
        }
    }

    /// Compresses the sample's context with `entry` and runs its probes: prose NLL and KL to
    /// `reference`, or teacher forcing, and the start of free generation when greedy decoding
    /// leaves the gold answer.
    pub fn measure(&self, entry: &Entry, reference: Option<&Tensor<B, 2>>) -> Result<Measured<B>> {
        let m = self.m;
        let tc = std::time::Instant::now();
        let mut caches = self.caches(entry)?;
        let compress = tc.elapsed().as_secs_f64();
        let tt = std::time::Instant::now();
        let bytes: u64 = caches.iter().map(|c| c.footprint().total().get()).sum();
        let tokens = self.sample.context().len();
        let mut r = Record {
            method: entry.name.clone(),
            budget: entry.budget.clone(),
            length: self.length,
            task: self.sample.task(),
            sample: self.index,
            tokens,
            bytes,
            ratio: self.fp16 as f64 / bytes.max(1) as f64,
            score: None,
            tf_logp: None,
            tf_acc: None,
            nll: None,
            kl: None,
            prediction: None,
            refs: Vec::new(),
            same_as: None,
            seconds: [compress, 0.0],
        };
        let mut logp_out = None;
        let mut generation = None;
        match self.sample {
            Sample::Prose { continuation, .. } => {
                let n = continuation.len();
                let logits = m
                    .model
                    .forward(&continuation[..n - 1], &mut caches, Logits::All)?;
                let logp = log_softmax(logits, 1);
                r.nll = Some(nll(&logp, &continuation[1..]));
                r.kl = Some(match reference {
                    None => 0.0,
                    Some(reference) => solver::measured::kl(reference, &logp),
                });
                logp_out = Some(logp);
            }
            Sample::Task(t) => {
                let (tf, fork) = teacher_forced(m, t, &mut caches)?;
                r.tf_logp = Some(tf.logp);
                r.tf_acc = Some(tf.acc);
                r.refs = t.refs.clone();
                match tf.first_miss {
                    // Greedy decoding reproduces the whole gold answer.
                    None => r.prediction = Some(m.tokenizer.decode(&t.target)?),
                    Some((i, token)) => {
                        // Caches holding the context and the question: forked after the
                        // question, or compressed and fed again.
                        let mut caches = match fork {
                            Some(c) => c,
                            None => {
                                let mut c = self.caches(entry)?;
                                m.model.forward(&t.question, &mut c, Logits::Last)?;
                                c
                            }
                        };
                        if i > 0 {
                            m.model.forward(&t.target[..i], &mut caches, Logits::Last)?;
                        }
                        let mut out = t.target[..i].to_vec();
                        out.push(token);
                        generation = Some((caches, out));
                    }
                }
            }
        }
        r.seconds[1] = tt.elapsed().as_secs_f64();
        Ok(Measured {
            record: r,
            logp: logp_out,
            generation,
        })
    }
}

/// Appends the question and the gold answer to `caches` and scores the answer's tokens.
///
/// Greedy decoding reproduces the gold tokens for as long as each is the argmax, which this
/// pass computes: generation only has to start at the first gold token that is not (and when
/// there is none, the greedy answer starts with the whole gold answer, which holds every
/// reference).
fn teacher_forced<B: KvBackend>(
    m: &LoadedModel<B>,
    t: &TaskSample,
    caches: &mut [Box<dyn LayerCache<B>>],
) -> Result<(TeacherForced, Option<Caches<B>>)> {
    let n = t.target.len();
    // The question first, then a fork of the caches (free generation resumes from there),
    // then the gold answer but its last token.
    let first = m.model.forward(&t.question, caches, Logits::Last)?;
    let fork: Option<Caches<B>> = caches.iter().map(|c| c.fork()).collect();
    let logits = if n > 1 {
        let rest = m.model.forward(&t.target[..n - 1], caches, Logits::All)?;
        Tensor::cat(vec![first, rest], 0)
    } else {
        first
    };
    let rows = log_softmax(logits, 1);
    let best: Vec<i64> = rows.clone().argmax(1).into_data().iter::<i64>().collect();
    let hits = t
        .target
        .iter()
        .zip(&best)
        .filter(|(g, b)| **g as i64 == **b)
        .count();
    let first_miss = t
        .target
        .iter()
        .zip(&best)
        .position(|(g, b)| *g as i64 != *b)
        .map(|i| (i, best[i] as u32));
    Ok((
        TeacherForced {
            logp: -nll(&rows, &t.target),
            acc: hits as f64 / n as f64,
            first_miss,
        },
        fork,
    ))
}

/// Every layer's cache for `entry`, given the recorded full prefill: appended and compressed at
/// the end of prefill, as at inference.
fn compressed<B: KvBackend>(
    entry: &Entry,
    rec: &[RecordingCache<B>],
    axes: &router::Axes<B>,
) -> Result<Caches<B>> {
    let mut caches = entry.caches(rec.len(), axes);
    for (c, r) in caches.iter_mut().zip(rec) {
        let (k, v) = r.keys_values()?;
        c.append(k, v)?;
        let obs = r
            .observed()
            .cloned()
            .ok_or(EvalError::Internal("the prefill recorded no observations"))?;
        c.finish_prefill(&obs)?;
    }
    Ok(caches)
}

/// One sample's full prefill, recorded layer by layer.
pub type Recording<B> = Vec<RecordingCache<B>>;

/// The full prefill of every sample (in `groups` order), recorded for every method to share.
/// Runs one sample per core, longest first; each prefill's matmuls may still use every core.
pub fn prefill_all<B: KvBackend>(
    m: &LoadedModel<B>,
    groups: &[(usize, Vec<Sample>)],
    popts: &PrefillOptions,
    progress: &dyn Progress,
) -> Result<Vec<Recording<B>>> {
    let layers = m.model.config.layers;
    let samples: Vec<&Sample> = groups.iter().flat_map(|(_, s)| s).collect();
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(samples[i].context().len()));
    progress.event(Event::Start {
        what: "prefill",
        total: samples.len() as u64,
    });
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Result<Recording<B>>>>> = samples
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    rayon::scope(|s| {
        for _ in 0..rayon::current_num_threads() {
            s.spawn(|_| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&j) = order.get(i) else { break };
                    let mut rec: Vec<RecordingCache<B>> =
                        (0..layers).map(|_| RecordingCache::new()).collect();
                    let r = m
                        .model
                        .prefill(samples[j].context(), &mut rec, popts)
                        .map(|_| rec)
                        .map_err(EvalError::from);
                    let failed = r.is_err();
                    if let Ok(mut slot) = slots[j].lock() {
                        *slot = Some(r);
                    }
                    progress.event(Event::Step);
                    if failed {
                        // Stop the other workers early: the run fails with this error.
                        next.store(order.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    progress.event(Event::Finish);
    // A failure is reported as such (slots left empty only follow one).
    let mut out = Vec::with_capacity(slots.len());
    let mut missing = false;
    for slot in slots {
        match slot.into_inner().ok().flatten() {
            Some(r) => out.push(r?),
            None => missing = true,
        }
    }
    if missing {
        return Err(EvalError::Internal("a sample's prefill did not run"));
    }
    Ok(out)
}

pub use solver::measured::nll;

/// A task record with the given scores, for the statistics modules' tests.
#[cfg(test)]
pub(crate) fn test_record(
    method: &str,
    budget: &str,
    task: &'static str,
    score: f64,
    logp: f64,
) -> Record {
    Record {
        method: method.into(),
        budget: budget.into(),
        length: 1024,
        task,
        sample: 0,
        tokens: 1000,
        bytes: 1000,
        ratio: 4.0,
        score: Some(score),
        tf_logp: Some(logp),
        tf_acc: Some(1.0),
        nll: None,
        kl: None,
        prediction: None,
        refs: Vec::new(),
        same_as: None,
        seconds: [0.0; 2],
    }
}
