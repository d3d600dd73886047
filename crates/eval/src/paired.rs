//! Paired comparisons with bootstrap intervals: is a difference between two methods more than
//! the noise of which samples happened to be drawn?
//!
//! Every method sees the same samples, so two methods are compared on the samples both
//! measured, sample by sample (pairing removes the between-sample variance, which dominates:
//! some needles are easy for every method). The interval is the 2.5–97.5 % percentile range of
//! the mean difference over resamples of those samples, with replacement, from a generator
//! seeded by the run's seed and the pair's names, so a rerun reproduces it.
//!
//! The eval draws a fixed number of samples in each cell of its design (a task at a context
//! length), and every mean it reports weighs the cells equally (the mean of the cells' means,
//! [`cell_mean`]), so the quantity estimated is the mean over that fixed mix of
//! cells, and how the differences vary *between* cells is not sampling noise. The bootstrap
//! therefore resamples within each cell (a stratified bootstrap) and averages the cells'
//! resampled means: a pooled one would count the between-cell spread as noise and report
//! intervals wider than the design's. Within a cell the differences are widened about the
//! cell's mean by `√(n/(n−1))` before resampling, so that the resampled variance is the
//! unbiased one even for cells of a few samples. Cells of one sample have no spread of their
//! own and are pooled into one stratum that weighs as many cells as it holds (a lone one joins
//! the largest cell, whose weight grows by one). The pooled interval's half-width, every sample
//! resampled as one pool, is kept beside it.
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
    /// Cells of the design resampled within (1: the samples were resampled as one pool).
    pub cells: usize,
    /// Half-width of the pooled bootstrap interval of the same differences, for comparison.
    pub pooled_half_width: f64,
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

/// The pooled bootstrap interval of the mean of `diffs`; `None` below two samples (one sample
/// has no spread to resample, and a zero-width interval would claim a resolution it does not
/// have).
pub fn bootstrap(diffs: &[f64], seed: u64) -> Option<Interval> {
    let n = diffs.len();
    if n < 2 || diffs.iter().any(|d| !d.is_finite()) {
        return None;
    }
    let (lo, hi) = percentiles(resampled_means(&[Stratum::cell(diffs.to_vec())], seed));
    Some(Interval {
        mean: diffs.iter().sum::<f64>() / n as f64,
        lo,
        hi,
        n,
        cells: 1,
        pooled_half_width: (hi - lo) / 2.0,
    })
}

/// Differences resampled together, and how many cells of the design they stand for.
struct Stratum {
    diffs: Vec<f64>,
    cells: usize,
}

impl Stratum {
    fn cell(diffs: Vec<f64>) -> Self {
        Self { diffs, cells: 1 }
    }

    fn mean(&self) -> f64 {
        self.diffs.iter().sum::<f64>() / self.diffs.len() as f64
    }
}

/// The mean of the strata's means, each weighted by the cells it stands for.
fn weighted_mean(strata: impl Iterator<Item = (f64, usize)>) -> f64 {
    let (sum, cells) = strata.fold((0.0, 0), |(s, n), (m, c)| (s + m * c as f64, n + c));
    sum / cells as f64
}

/// [`RESAMPLES`] cell-weighted means of `strata`, each stratum drawn with replacement within
/// itself (one stratum: the pooled bootstrap).
fn resampled_means(strata: &[Stratum], seed: u64) -> Vec<f64> {
    let mut rng = Rng(seed);
    (0..RESAMPLES)
        .map(|_| {
            weighted_mean(strata.iter().map(|s| {
                let n = s.diffs.len();
                let sum: f64 = (0..n).map(|_| s.diffs[rng.below(n)]).sum();
                (sum / n as f64, s.cells)
            }))
        })
        .collect()
}

/// The 2.5 % and 97.5 % percentiles of resampled means.
fn percentiles(mut means: Vec<f64>) -> (f64, f64) {
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    (at(0.025), at(0.975))
}

/// The stratified bootstrap interval of the cell-weighted mean of the differences in `cells`
/// (one vector per cell of the design; see the module's doc). `None` below two samples or for
/// a non-finite difference.
pub fn bootstrap_stratified(cells: &[Vec<f64>], seed: u64) -> Option<Interval> {
    let all: Vec<f64> = cells.iter().flatten().copied().collect();
    let pooled = bootstrap(&all, seed)?;
    let strata: Vec<Stratum> = pool_single_samples(cells)
        .into_iter()
        .map(|s| {
            let (m, n) = (s.mean(), s.diffs.len() as f64);
            let k = (n / (n - 1.0)).sqrt();
            Stratum {
                diffs: s.diffs.iter().map(|d| m + k * (d - m)).collect(),
                ..s
            }
        })
        .collect();
    let (lo, hi) = percentiles(resampled_means(&strata, seed));
    Some(Interval {
        mean: weighted_mean(strata.iter().map(|s| (s.mean(), s.cells))),
        lo,
        hi,
        cells: strata.len(),
        pooled_half_width: pooled.half_width(),
        ..pooled
    })
}

/// The strata to resample within: cells of two or more samples as they are, cells of one
/// sample pooled into one stratum (a lone pooled sample joins the largest cell). Every stratum
/// holds at least two samples when `cells` hold two in all.
fn pool_single_samples(cells: &[Vec<f64>]) -> Vec<Stratum> {
    let (mut out, singles): (Vec<Stratum>, Vec<Stratum>) = cells
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| Stratum::cell(c.clone()))
        .partition(|s| s.diffs.len() > 1);
    let pooled = Stratum {
        cells: singles.len(),
        diffs: singles.into_iter().flat_map(|s| s.diffs).collect(),
    };
    match (pooled.cells, out.iter_mut().max_by_key(|s| s.diffs.len())) {
        (0, _) => {}
        (1, Some(largest)) => {
            largest.diffs.extend(pooled.diffs);
            largest.cells += 1;
        }
        _ => out.push(pooled),
    }
    out
}

/// Which sample a record measured: records of two methods pair on this.
fn key(r: &Record) -> (usize, &'static str, usize) {
    (r.length, r.task, r.sample)
}

/// The cell of the design a record's sample was drawn in: its context length and task.
pub fn cell(r: &Record) -> (usize, &'static str) {
    (r.length, r.task)
}

/// The mean of `f` over `records` with every cell of the design weighted equally: the mean of
/// the cells' means (see the module's doc); `None` when no record has a value.
pub fn cell_mean<'a>(
    records: impl IntoIterator<Item = &'a Record>,
    f: impl Fn(&Record) -> Option<f64>,
) -> Option<f64> {
    let cells = by_cell(records.into_iter().filter_map(|r| Some((cell(r), f(r)?))));
    let means: Vec<f64> = cells
        .iter()
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect();
    (!means.is_empty()).then(|| means.iter().sum::<f64>() / means.len() as f64)
}

/// Values grouped by their cell, cells in order of first appearance.
fn by_cell(items: impl Iterator<Item = ((usize, &'static str), f64)>) -> Vec<Vec<f64>> {
    let mut cells: Vec<((usize, &str), Vec<f64>)> = Vec::new();
    for (c, x) in items {
        match cells.iter_mut().find(|(k, _)| *k == c) {
            Some((_, xs)) => xs.push(x),
            None => cells.push((c, vec![x])),
        }
    }
    cells.into_iter().map(|(_, xs)| xs).collect()
}

/// The per-sample differences `a − b` of `metric` on the samples both measured, grouped by
/// the cell of the design they were drawn in, cells in order of first appearance in `a`.
pub fn cell_differences(a: &[&Record], b: &[&Record], metric: Metric) -> Vec<Vec<f64>> {
    let diff = |ra: &Record| {
        let x = metric.of(ra)?;
        let rb = b.iter().find(|rb| key(rb) == key(ra))?;
        Some(x - metric.of(rb)?)
    };
    by_cell(a.iter().filter_map(|ra| Some((cell(ra), diff(ra)?))))
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
            let d = cell_differences(a, b, m);
            bootstrap_stratified(&d, name_seed(seed, &[method, budget, against, m.name()]))
                .map(|i| (m, i))
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
        let rs = records
            .iter()
            .filter(|r| r.method == m && r.budget == budget);
        cell_mean(rs, |r| metric.of(r))
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

/// Whether `against` is `method`'s control (see [`all`]) rather than its best rival.
pub fn is_control(method: &str, against: &str) -> bool {
    CONTROLS.contains(&(method, against))
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
        assert!(is_control("hetero", "hetero(expected_attention)"));
        assert!(!is_control("hetero", "moqae") && !is_control("moqae-heuristic", "moqae"));
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
        assert_eq!(
            cell_differences(&ra, &rb, Metric::TfLogp).concat(),
            vec![-1.0, -2.0]
        );
        assert_eq!(
            cell_differences(&ra, &rb, Metric::Kl).concat(),
            Vec::<f64>::new()
        );
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

    /// Differences that vary a lot between cells but little within them: the stratified
    /// interval resolves what the pooled one cannot, and says so beside it.
    #[test]
    fn between_cell_spread_is_not_counted_as_noise() {
        let cells: Vec<Vec<f64>> = [-2.0, 0.5, 2.0]
            .iter()
            .map(|c| (0..5).map(|i| c + 0.02 * (i as f64 - 2.0)).collect())
            .collect();
        let pooled = bootstrap(&cells.concat(), 7).expect("15 samples");
        assert!(!pooled.resolved(), "{pooled:?}");
        let i = bootstrap_stratified(&cells, 7).expect("15 samples");
        assert!(i.resolved() && i.lo > 0.1, "{i:?}");
        assert_eq!((i.n, i.cells), (15, 3));
        assert!((i.mean - pooled.mean).abs() < 1e-12);
        assert_eq!(i.pooled_half_width, pooled.half_width());
        // Records of two tasks are two cells.
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (s, task) in [(0, "vt"), (1, "vt"), (0, "cwe"), (1, "cwe")] {
            let mut ra = rec("a", s, s as f64);
            ra.task = task;
            let mut rb = rec("b", s, 0.0);
            rb.task = task;
            a.push(ra);
            b.push(rb);
        }
        let (ra, rb): (Vec<&Record>, Vec<&Record>) = (a.iter().collect(), b.iter().collect());
        let by_cell = cell_differences(&ra, &rb, Metric::TfLogp);
        assert_eq!(by_cell, vec![vec![0.0, 1.0], vec![0.0, 1.0]]);
    }

    #[test]
    fn cells_of_one_sample_are_pooled() {
        let strata = |cells: &[Vec<f64>]| -> Vec<(Vec<f64>, usize)> {
            pool_single_samples(cells)
                .into_iter()
                .map(|s| (s.diffs, s.cells))
                .collect()
        };
        let pooled = strata(&[vec![1.0], vec![2.0], vec![3.0, 4.0], vec![]]);
        assert_eq!(pooled, vec![(vec![3.0, 4.0], 1), (vec![1.0, 2.0], 2)]);
        let joined = strata(&[vec![1.0], vec![3.0, 4.0], vec![5.0, 6.0, 7.0]]);
        assert_eq!(
            joined,
            vec![(vec![3.0, 4.0], 1), (vec![5.0, 6.0, 7.0, 1.0], 2)]
        );
        // Two pooled singles weigh as two cells: (3.5 + 1.5·2) / 3.
        let i = bootstrap_stratified(&[vec![1.0], vec![2.0], vec![3.0, 4.0]], 3).expect("4");
        assert!((i.mean - 6.5 / 3.0).abs() < 1e-12, "{i:?}");
        // Every cell a single sample: one pool, a finite interval of nonzero width.
        let i = bootstrap_stratified(&[vec![1.0], vec![2.0], vec![4.0]], 3).expect("3 samples");
        assert_eq!(i.cells, 1);
        assert!(i.half_width() > 0.0);
        assert!(bootstrap_stratified(&[vec![1.0]], 3).is_none());
    }

    /// A cell of many samples weighs as much as a cell of few: the estimate is the mean of the
    /// cells' means, so drawing more samples where the spread is large sharpens it without
    /// changing what it estimates.
    #[test]
    fn cells_weigh_equally_whatever_their_sample_counts() {
        let many: Vec<f64> = (0..20).map(|i| 0.1 * (i % 2) as f64).collect();
        let i = bootstrap_stratified(&[many, vec![2.0, 2.2]], 5).expect("22 samples");
        assert!((i.mean - (0.05 + 2.1) / 2.0).abs() < 1e-12, "{i:?}");
        assert!(i.lo > 0.9 && i.hi < 1.25, "{i:?}");
    }

    proptest! {
        /// The stratified estimate is the mean of the cells' means, inside its interval.
        #[test]
        fn stratified_mean_is_the_mean_of_cell_means(
            cells in prop::collection::vec(prop::collection::vec(-5.0f64..5.0, 2..12), 1..6),
            seed: u64,
        ) {
            let i = bootstrap_stratified(&cells, seed).expect("two or more samples");
            let m = cells.iter().map(|c| c.iter().sum::<f64>() / c.len() as f64).sum::<f64>()
                / cells.len() as f64;
            prop_assert!((i.mean - m).abs() < 1e-9, "{i:?} {m}");
            prop_assert!(i.lo <= i.mean + 1e-9 && i.mean <= i.hi + 1e-9, "{i:?}");
        }

        /// Shifting every difference of a cell by the cell's own constant moves the interval
        /// with the mean and leaves its width alone: only the spread within cells is noise.
        #[test]
        fn stratified_width_ignores_between_cell_offsets(
            cells in prop::collection::vec(prop::collection::vec(-5.0f64..5.0, 2..6), 1..6),
            offsets in prop::collection::vec(-50.0f64..50.0, 6),
            seed: u64,
        ) {
            let shifted: Vec<Vec<f64>> = cells
                .iter()
                .zip(&offsets)
                .map(|(c, o)| c.iter().map(|d| d + o).collect())
                .collect();
            let i = bootstrap_stratified(&cells, seed).expect("two or more samples");
            let j = bootstrap_stratified(&shifted, seed).expect("two or more samples");
            prop_assert!(i.lo <= i.mean + 1e-9 && i.mean <= i.hi + 1e-9, "{i:?}");
            prop_assert!(((j.lo - j.mean) - (i.lo - i.mean)).abs() < 1e-9, "{i:?} {j:?}");
            prop_assert!(((j.hi - j.mean) - (i.hi - i.mean)).abs() < 1e-9, "{i:?} {j:?}");
        }

        /// One cell: the pooled resamples, widened about the mean by `√(n/(n−1))`.
        #[test]
        fn one_cell_is_the_pooled_interval_widened(
            diffs in prop::collection::vec(-10.0f64..10.0, 2..40),
            seed: u64,
        ) {
            let p = bootstrap(&diffs, seed).expect("two or more samples");
            let s = bootstrap_stratified(std::slice::from_ref(&diffs), seed).expect("two or more");
            let k = (diffs.len() as f64 / (diffs.len() - 1) as f64).sqrt();
            prop_assert!((s.lo - (p.mean + k * (p.lo - p.mean))).abs() < 1e-9, "{p:?} {s:?}");
            prop_assert!((s.hi - (p.mean + k * (p.hi - p.mean))).abs() < 1e-9, "{p:?} {s:?}");
        }

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
