//! Paired comparisons with bootstrap intervals: is a difference between two methods more than
//! the noise of which samples happened to be drawn?
//!
//! Every method sees the same samples, so two methods are compared on the samples both
//! measured, sample by sample (pairing removes the between-sample variance, which dominates:
//! some needles are easy for every method). The interval is the 2.5–97.5 % percentile range of
//! the mean difference over resamples of those samples, with replacement, from a generator
//! seeded by the run's seed and the pair's names, so a rerun reproduces it.
use crate::measure::Record;
use crate::rng::Rng;
use serde::Serialize;

/// Resamples per interval: enough that the percentile bounds move by well under their
/// width between seeds.
pub const RESAMPLES: usize = 2000;

/// A per-sample quality figure that two methods are compared on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// RULER score of the free answer (0–100), task samples.
    Score,
    /// Mean token log-prob of the gold answer, teacher-forced, task samples.
    TfLogp,
    /// Share of gold answer tokens that are the argmax, task samples.
    TfAcc,
    /// KL of next-token distributions to the full cache, prose samples.
    Kl,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 4] = [Metric::Score, Metric::TfLogp, Metric::TfAcc, Metric::Kl];

    /// The record's value.
    pub fn of(self, r: &Record) -> Option<f64> {
        match self {
            Metric::Score => r.score,
            Metric::TfLogp => r.tf_logp,
            Metric::TfAcc => r.tf_acc,
            Metric::Kl => r.kl,
        }
    }

    /// Column name.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Score => "score",
            Metric::TfLogp => "TF log-p",
            Metric::TfAcc => "TF acc",
            Metric::Kl => "prose KL",
        }
    }

    /// Whether larger values are better (KL: smaller).
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::Kl)
    }
}

/// The mean paired difference `a − b` with its 95 % bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    /// Mean of the per-sample differences.
    pub mean: f64,
    /// 2.5 % percentile of the resampled means.
    pub lo: f64,
    /// 97.5 % percentile of the resampled means.
    pub hi: f64,
    /// Samples both methods measured.
    pub n: usize,
}

impl Interval {
    /// Whether the interval excludes zero: the sign of the difference is resolved.
    pub fn resolved(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }

    /// Half the interval's width.
    pub fn half_width(&self) -> f64 {
        (self.hi - self.lo) / 2.0
    }
}

/// The bootstrap interval of the mean of `diffs`; `None` below two samples (one sample has no
/// spread to resample, and a zero-width interval would claim a resolution it does not have).
pub fn bootstrap(diffs: &[f64], seed: u64) -> Option<Interval> {
    let n = diffs.len();
    if n < 2 || diffs.iter().any(|d| !d.is_finite()) {
        return None;
    }
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let mut rng = Rng(seed);
    let mut means: Vec<f64> = (0..RESAMPLES)
        .map(|_| (0..n).map(|_| diffs[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (RESAMPLES - 1) as f64).round() as usize).min(RESAMPLES - 1)];
    Some(Interval {
        mean,
        lo: at(0.025),
        hi: at(0.975),
        n,
    })
}

/// Which sample a record measured: records of two methods pair on this.
fn key(r: &Record) -> (usize, &'static str, usize) {
    (r.length, r.task, r.sample)
}

/// The per-sample differences `a − b` of `metric` on the samples both measured.
pub fn differences(a: &[&Record], b: &[&Record], metric: Metric) -> Vec<f64> {
    a.iter()
        .filter_map(|ra| {
            let x = metric.of(ra)?;
            let rb = b.iter().find(|rb| key(rb) == key(ra))?;
            Some(x - metric.of(rb)?)
        })
        .collect()
}

/// FNV-1a of a pair's names: each comparison gets its own resampling stream.
fn name_seed(seed: u64, parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// One method against another at one budget, per metric.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The method compared.
    pub method: String,
    /// Its budget label.
    pub budget: String,
    /// What it is compared with (`full`, or the best other method at the budget).
    pub against: String,
    /// `method − against` per metric (metrics neither measured twice are absent).
    pub diffs: Vec<(Metric, Interval)>,
}

impl Comparison {
    /// The interval of `metric`, if measured.
    pub fn get(&self, metric: Metric) -> Option<&Interval> {
        self.diffs
            .iter()
            .find(|(m, _)| *m == metric)
            .map(|(_, i)| i)
    }
}

/// Compares `a` with `b` (records of one method each) on every metric.
pub fn compare(a: &[&Record], b: &[&Record], names: [&str; 3], seed: u64) -> Comparison {
    let [method, budget, against] = names;
    let diffs = Metric::ALL
        .iter()
        .filter_map(|&m| {
            let d = differences(a, b, m);
            bootstrap(&d, name_seed(seed, &[method, budget, against, m.name()])).map(|i| (m, i))
        })
        .collect();
    Comparison {
        method: method.into(),
        budget: budget.into(),
        against: against.into(),
        diffs,
    }
}

/// Whether `method` belongs to hetero's family (its variants are not "other methods" for it).
fn ours(method: &str) -> bool {
    method.starts_with("hetero")
}

/// The best method at `budget` other than `method` (and, for hetero's family, other than the
/// family): highest mean teacher-forced log-prob, then lowest prose KL. `rows` are the shown
/// (method, budget) rows; merged twins are not candidates.
pub fn best_other<'a>(
    records: &[Record],
    rows: &'a [(String, String)],
    method: &str,
    budget: &str,
) -> Option<&'a str> {
    let mean = |m: &str, metric: Metric| {
        let xs: Vec<f64> = records
            .iter()
            .filter(|r| r.method == m && r.budget == budget)
            .filter_map(|r| metric.of(r))
            .collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
    };
    rows.iter()
        .filter(|(m, b)| b == budget && m != method && !(ours(method) && ours(m)))
        .map(|(m, _)| {
            let logp = mean(m, Metric::TfLogp).unwrap_or(f64::NEG_INFINITY);
            let kl = mean(m, Metric::Kl).unwrap_or(f64::INFINITY);
            (m.as_str(), logp, kl)
        })
        .max_by(|x, y| x.1.total_cmp(&y.1).then(y.2.total_cmp(&x.2)))
        .map(|(m, _, _)| m)
}

/// Every shown row at a budget against `full` and against the best other method there.
pub fn all(records: &[Record], rows: &[(String, String)], seed: u64) -> Vec<Comparison> {
    let of = |m: &str, b: &str| -> Vec<&Record> {
        records
            .iter()
            .filter(|r| r.method == m && r.budget == b)
            .collect()
    };
    let full = of("full", "-");
    let mut out = Vec::new();
    for (m, b) in rows.iter().filter(|(_, b)| b != "-") {
        let mine = of(m, b);
        out.push(compare(&mine, &full, [m, b, "full"], seed));
        let best = best_other(records, rows, m, b);
        if let Some(o) = best {
            out.push(compare(&mine, &of(o, b), [m, b, o], seed));
        }
        // Pairs that settle one question each, always asked whichever method is best
        // otherwise: does the learned MoQAE router beat the heuristic, and does hetero's
        // scorer axis beat hetero with one scorer?
        for (method, control) in CONTROLS {
            if m == method
                && best != Some(control)
                && rows.iter().any(|(x, y)| x == control && y == b)
            {
                out.push(compare(&mine, &of(control, b), [m, b, control], seed));
            }
        }
    }
    out
}

/// (method, its control): rows always paired with each other.
const CONTROLS: [(&str, &str); 2] = [
    ("moqae", "moqae-heuristic"),
    ("hetero", "hetero(expected_attention)"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(method: &str, sample: usize, logp: f64) -> Record {
        let mut r = crate::measure::test_record(method, "1/8", "vt", 50.0, logp);
        r.sample = sample;
        r
    }

    /// The learned MoQAE row is always paired with the heuristic one, and hetero with its
    /// one-scorer control, even when another method is their best rival.
    #[test]
    fn learned_moqae_is_always_compared_with_the_heuristic() {
        let mut records = Vec::new();
        for s in 0..3 {
            records.push(rec("hetero", s, -0.5));
            records.push(rec("moqae", s, -1.0 - s as f64 * 0.1));
            records.push(rec("moqae-heuristic", s, -1.2));
        }
        let mut rows: Vec<(String, String)> = ["hetero", "moqae", "moqae-heuristic"]
            .iter()
            .map(|m| (m.to_string(), "1/8".to_string()))
            .collect();
        // Whom `method` is compared against, in order.
        let against = |records: &[Record], rows: &[(String, String)], method: &str| {
            all(records, rows, 1)
                .into_iter()
                .filter(|c| c.method == method)
                .map(|c| c.against)
                .collect::<Vec<String>>()
        };
        assert_eq!(
            against(&records, &rows, "moqae"),
            ["full", "hetero", "moqae-heuristic"]
        );
        // hetero's best other method excludes its own family, yet it meets its one-scorer
        // control.
        for s in 0..3 {
            records.push(rec("hetero(expected_attention)", s, -0.7));
        }
        rows.push(("hetero(expected_attention)".into(), "1/8".into()));
        assert_eq!(
            against(&records, &rows, "hetero"),
            ["full", "moqae", "hetero(expected_attention)"]
        );
    }

    #[test]
    fn a_consistent_difference_resolves_and_noise_does_not() {
        // b is a better by 0.5 on every sample, with large between-sample spread: pairing
        // resolves it.
        let a: Vec<Record> = (0..20).map(|i| rec("a", i, -(i as f64) - 0.5)).collect();
        let b: Vec<Record> = (0..20).map(|i| rec("b", i, -(i as f64))).collect();
        let (ra, rb): (Vec<&Record>, Vec<&Record>) = (a.iter().collect(), b.iter().collect());
        let c = compare(&ra, &rb, ["a", "1/8", "b"], 1);
        let i = c.get(Metric::TfLogp).expect("measured");
        assert!((i.mean + 0.5).abs() < 1e-12);
        assert!(i.resolved() && i.hi < 0.0, "{i:?}");
        // Differences of alternating sign around zero: not resolved.
        let noisy: Vec<Record> = (0..20)
            .map(|i| rec("c", i, -(i as f64) + if i % 2 == 0 { 0.3 } else { -0.3 }))
            .collect();
        let rc: Vec<&Record> = noisy.iter().collect();
        let c = compare(&rc, &rb, ["c", "1/8", "b"], 1);
        assert!(!c.get(Metric::TfLogp).expect("measured").resolved());
        // Identical results: a zero-width interval at zero, not resolved.
        let c = compare(&rb, &rb, ["b", "1/8", "b"], 1);
        let i = c.get(Metric::TfLogp).expect("measured");
        assert_eq!((i.lo, i.hi), (0.0, 0.0));
        assert!(!i.resolved());
    }

    #[test]
    fn only_shared_samples_pair_and_one_sample_gives_no_interval() {
        let a = [rec("a", 0, -1.0), rec("a", 1, -2.0), rec("a", 2, -3.0)];
        let b = [rec("b", 1, -1.0), rec("b", 2, -1.0), rec("b", 7, 0.0)];
        let ra: Vec<&Record> = a.iter().collect();
        let rb: Vec<&Record> = b.iter().collect();
        assert_eq!(differences(&ra, &rb, Metric::TfLogp), vec![-1.0, -2.0]);
        assert_eq!(differences(&ra, &rb, Metric::Kl), Vec::<f64>::new());
        assert!(bootstrap(&[1.0], 3).is_none());
        assert!(bootstrap(&[1.0, f64::NAN], 3).is_none());
    }

    #[test]
    fn best_other_skips_the_method_its_family_and_other_budgets() {
        let rs = vec![
            rec("hetero", 0, -0.1),
            rec("hetero+rank", 0, -0.05),
            rec("snapkv", 0, -1.0),
            rec("knorm", 0, -0.5),
        ];
        let rows: Vec<(String, String)> = ["hetero", "hetero+rank", "snapkv", "knorm"]
            .map(|m| (m.to_string(), "1/8".to_string()))
            .to_vec();
        assert_eq!(best_other(&rs, &rows, "hetero", "1/8"), Some("knorm"));
        assert_eq!(best_other(&rs, &rows, "knorm", "1/8"), Some("hetero+rank"));
        assert_eq!(best_other(&rs, &rows, "knorm", "1/4"), None);
    }

    proptest! {
        /// The interval holds the mean, lies within the differences' range, and is the same
        /// for the same seed.
        #[test]
        fn interval_brackets_the_mean(diffs in prop::collection::vec(-10.0f64..10.0, 2..40), seed: u64) {
            let i = bootstrap(&diffs, seed).expect("two or more samples");
            let (lo, hi) = diffs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &d| (a.min(d), b.max(d)));
            prop_assert!(i.lo <= i.mean + 1e-9 && i.mean <= i.hi + 1e-9, "{i:?}");
            prop_assert!(lo - 1e-9 <= i.lo && i.hi <= hi + 1e-9);
            prop_assert_eq!(bootstrap(&diffs, seed), Some(i));
        }
    }
}
