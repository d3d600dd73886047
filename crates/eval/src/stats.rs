//! Summaries over samples, and where hetero stands against the best other method.
use crate::measure::Record;
use crate::paired::{Comparison, Interval, Metric, cell_mean};
use serde::Serialize;

/// One method at one budget, averaged.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Method name.
    pub method: String,
    /// Budget label.
    pub budget: String,
    /// Methods with identical caches on every sample, shown on this row.
    pub aliases: Vec<String>,
    /// Mean compression ratio over samples.
    pub ratio: f64,
    /// Mean cache bytes at each length.
    pub bytes: Vec<(usize, f64)>,
    /// Task samples measured.
    pub n: usize,
    /// Mean RULER score over the task cells (each cell's mean weighs the same, see
    /// [`cell_mean`]).
    pub score: Option<f64>,
    /// Mean teacher-forced log-prob of the gold answers over the task cells.
    pub tf_logp: Option<f64>,
    /// Mean teacher-forced argmax accuracy over the task cells.
    pub tf_acc: Option<f64>,
    /// Mean prose NLL.
    pub nll: Option<f64>,
    /// Mean prose KL to the full cache.
    pub kl: Option<f64>,
    /// Mean score per task.
    pub per_task: Vec<(&'static str, f64)>,
    /// Mean score and teacher-forced accuracy per length.
    pub per_length: Vec<(usize, f64, f64)>,
    /// Mean seconds per sample building the method's caches from the shared prefill, and
    /// probing them (one worker's wall time; the shared prefill and KVzip's pass are not in
    /// it).
    pub seconds: [f64; 2],
}

/// The mean, `None` for no values.
pub fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// The rows a report shows: one per (method, budget) in first-seen order, except that a
/// method whose caches were identical to an earlier method's on every sample (recorded as
/// `same_as`) is shown once, as an alias on that method's row.
pub fn rows(records: &[Record]) -> Vec<Row> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in records {
        let k = (r.method.clone(), r.budget.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    // Per sample, the method whose caches a record's were: two methods are identical on a
    // sample when these agree.
    let canonical = |m: &str, b: &str| -> Vec<((usize, &'static str, usize), &str)> {
        let mut v: Vec<_> = records
            .iter()
            .filter(|r| r.method == m && r.budget == b)
            .map(|r| {
                let c = r.same_as.as_deref().unwrap_or(r.method.as_str());
                ((r.length, r.task, r.sample), c)
            })
            .collect();
        v.sort_unstable();
        v
    };
    let mut out: Vec<Row> = Vec::new();
    for (method, budget) in keys {
        let mine = canonical(&method, &budget);
        match out
            .iter_mut()
            .find(|r| r.budget == budget && canonical(&r.method, &r.budget) == mine)
        {
            Some(row) => row.aliases.push(method),
            None => out.push(Row {
                method,
                budget,
                aliases: Vec::new(),
            }),
        }
    }
    out
}

/// A shown row: a method at a budget and the names of methods with identical caches.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The method measured.
    pub method: String,
    /// Budget label.
    pub budget: String,
    /// Methods whose plans were identical on every sample (measured once, shown here).
    pub aliases: Vec<String>,
}

impl Row {
    /// `1d = expectedattention`.
    pub fn label(&self) -> String {
        label(&self.method, &self.aliases)
    }
}

/// A row's names joined: `1d = expectedattention`.
pub fn label(method: &str, aliases: &[String]) -> String {
    std::iter::once(method)
        .chain(aliases.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" = ")
}

/// One summary per shown row (see [`rows`]).
pub fn summarize(records: &[Record], lengths: &[usize]) -> Vec<Summary> {
    let mut tasks: Vec<&'static str> = Vec::new();
    for r in records.iter().filter(|r| r.score.is_some()) {
        if !tasks.contains(&r.task) {
            tasks.push(r.task);
        }
    }
    let mut all_lengths: Vec<usize> = records.iter().map(|r| r.length).collect();
    all_lengths.sort_unstable();
    all_lengths.dedup();
    rows(records)
        .into_iter()
        .map(
            |Row {
                 method,
                 budget,
                 aliases,
             }| {
                let rs: Vec<&Record> = records
                    .iter()
                    .filter(|r| r.method == method && r.budget == budget)
                    .collect();
                Summary {
                    ratio: mean(rs.iter().map(|r| r.ratio)).unwrap_or(f64::NAN),
                    bytes: all_lengths
                        .iter()
                        .filter_map(|&l| {
                            mean(rs.iter().filter(|r| r.length == l).map(|r| r.bytes as f64))
                                .map(|b| (l, b))
                        })
                        .collect(),
                    n: rs.iter().filter(|r| r.score.is_some()).count(),
                    score: cell_mean(rs.iter().copied(), |r| r.score),
                    tf_logp: cell_mean(rs.iter().copied(), |r| r.tf_logp),
                    tf_acc: cell_mean(rs.iter().copied(), |r| r.tf_acc),
                    nll: cell_mean(rs.iter().copied(), |r| r.nll),
                    kl: cell_mean(rs.iter().copied(), |r| r.kl),
                    per_task: tasks
                        .iter()
                        .filter_map(|&t| {
                            mean(rs.iter().filter(|r| r.task == t).filter_map(|r| r.score))
                                .map(|s| (t, s))
                        })
                        .collect(),
                    per_length: lengths
                        .iter()
                        .filter_map(|&l| {
                            let at = || rs.iter().filter(move |r| r.length == l);
                            Some((
                                l,
                                cell_mean(at().copied(), |r| r.score)?,
                                cell_mean(at().copied(), |r| r.tf_acc)?,
                            ))
                        })
                        .collect(),
                    seconds: [0, 1].map(|i| mean(rs.iter().map(|r| r.seconds[i])).unwrap_or(0.0)),
                    method,
                    budget,
                    aliases,
                }
            },
        )
        .collect()
}

/// `+0.12 [+0.03, +0.21]`.
pub fn interval_text(i: &Interval, digits: usize) -> String {
    format!(
        "{:+.digits$} [{:+.digits$}, {:+.digits$}]",
        i.mean, i.lo, i.hi
    )
}

/// Where hetero stands at each budget against the best other method there (see
/// [`paired::best_other`]): the paired difference per metric with its 95 % bootstrap
/// interval, and whether the interval resolves the sign.
pub fn versus(comparisons: &[Comparison]) -> String {
    let mut out = String::new();
    for c in comparisons
        .iter()
        .filter(|c| c.method == "hetero" && c.against != "full")
    {
        let parts: Vec<String> = c
            .diffs
            .iter()
            .map(|(m, i)| {
                let verdict = match (i.resolved(), (i.mean > 0.0) == m.higher_is_better()) {
                    (false, _) => "not resolved".to_string(),
                    (true, true) => "resolved, hetero better".to_string(),
                    (true, false) => format!("resolved, {} better", c.against),
                };
                let digits = if *m == Metric::Score { 1 } else { 3 };
                format!(
                    "{} {} over {} samples, half-width {:.digits$} ({:.digits$} pooled) ({verdict})",
                    m.name(),
                    interval_text(i, digits),
                    i.n,
                    i.half_width(),
                    i.pooled_half_width,
                )
            })
            .collect();
        if !parts.is_empty() {
            let role = if crate::paired::is_control(&c.method, &c.against) {
                "the same menu with one scorer"
            } else {
                "the best other method there"
            };
            out.push_str(&format!(
                "- At {}, hetero − {} ({role}): {}.\n",
                c.budget,
                c.against,
                parts.join("; ")
            ));
        }
    }
    if !out.is_empty() {
        out.insert_str(
            0,
            "\nWhere hetero stands (paired differences on the samples both measured, 95 % bootstrap intervals stratified by task and length; the pooled bootstrap's half-width beside):\n\n",
        );
    }
    out
}

/// The evidence a run must hold: every paired interval finite; with `strict` (the CI-sized
/// run) every row at a budget compared with full on at least two samples; and no two shown
/// rows at a budget with the same plan at every context (they must share one row).
pub fn check_evidence(
    summary: &[Summary],
    comparisons: &[Comparison],
    plans: &[crate::methods::PlanRecord],
    strict: bool,
) -> crate::Result<()> {
    let bad = |why: String| Err(crate::EvalError::Evidence(why));
    for c in comparisons {
        if let Some((m, i)) = c
            .diffs
            .iter()
            .find(|(_, i)| ![i.mean, i.lo, i.hi].iter().all(|x| x.is_finite()))
        {
            return bad(format!(
                "{} vs {} at {}: {} interval {i:?}",
                c.method,
                c.against,
                c.budget,
                m.name()
            ));
        }
    }
    for s in summary.iter().filter(|s| s.budget != "-") {
        let paired = comparisons.iter().any(|c| {
            c.method == s.method
                && c.budget == s.budget
                && c.against == "full"
                && !c.diffs.is_empty()
        });
        if strict && !paired {
            return bad(format!(
                "{} at {}: no paired interval against full (fewer than two shared samples)",
                s.method, s.budget
            ));
        }
    }
    let plans_of = |m: &str, b: &str| -> Vec<(&router::RoutingPlan, Vec<usize>)> {
        plans
            .iter()
            .filter(|p| p.method == m && p.budget == b)
            .map(|p| (&p.plan, p.tokens.clone()))
            .collect()
    };
    for (i, a) in summary.iter().enumerate() {
        let pa = plans_of(&a.method, &a.budget);
        if pa.is_empty() {
            continue;
        }
        if let Some(b) = summary[i + 1..]
            .iter()
            .find(|b| b.budget == a.budget && plans_of(&b.method, &b.budget) == pa)
        {
            return bad(format!(
                "{} and {} at {} have identical plans but are shown as two rows",
                a.method, b.method, a.budget
            ));
        }
    }
    Ok(())
}

/// Matched memory: no method at a budget holds more than its budget after the context
/// (`fp16(tokens)` is the fp16 cache of a context).
pub fn check_matched_bytes(
    records: &[Record],
    fp16: impl Fn(usize) -> kv_tensor::Bytes,
) -> crate::Result<()> {
    for r in records.iter().filter(|r| r.budget != "-") {
        let cap = r
            .budget
            .parse::<solver::Budget>()?
            .bytes(fp16(r.tokens))
            .get();
        if r.bytes > cap {
            return Err(crate::EvalError::OverBudget {
                method: r.method.clone(),
                budget: r.budget.clone(),
                bytes: r.bytes,
                tokens: r.tokens,
                cap,
            });
        }
    }
    if let Some(r) = records.iter().find(|r| {
        [r.tf_logp, r.nll, r.kl, r.score]
            .iter()
            .flatten()
            .any(|x| !x.is_finite())
    }) {
        return Err(crate::EvalError::NonFinite(format!(
            "{} at {}",
            r.method, r.budget
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::measure::test_record as rec;

    #[test]
    fn summaries_average_per_method_and_budget() {
        let mut rs = vec![
            rec("hetero", "1/8", "vt", 100.0, -0.5),
            rec("hetero", "1/8", "cwe", 50.0, -1.5),
            rec("snapkv", "1/8", "vt", 0.0, -2.0),
        ];
        rs[0].seconds = [1.0, 3.0];
        rs[1].seconds = [2.0, 5.0];
        let s = summarize(&rs, &[1024]);
        assert_eq!(s[0].seconds, [1.5, 4.0]);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].method.as_str(), s[0].n), ("hetero", 2));
        assert_eq!(s[0].score, Some(75.0));
        assert_eq!(s[0].tf_logp, Some(-1.0));
        assert_eq!(s[0].per_task, vec![("vt", 100.0), ("cwe", 50.0)]);
        assert_eq!(s[1].score, Some(0.0));
        assert_eq!(mean(std::iter::empty()), None);
    }

    #[test]
    fn summaries_weigh_every_cell_the_same() {
        let mut rs = vec![rec("hetero", "1/8", "cwe", 0.0, -3.0)];
        for i in 0..3 {
            let mut r = rec("hetero", "1/8", "vt", 100.0, -1.0);
            r.sample = i;
            rs.push(r);
        }
        let s = summarize(&rs, &[1024]);
        assert_eq!(
            (s[0].n, s[0].score, s[0].tf_logp),
            (4, Some(50.0), Some(-2.0))
        );
        assert_eq!(
            s[0].per_length,
            vec![(1024, 50.0, s[0].tf_acc.expect("measured"))]
        );
        assert_eq!(cell_mean(&rs, |r| r.kl), None);
    }

    #[test]
    fn twins_on_every_sample_share_a_row() {
        let mut twin = rec("1d", "1/8", "vt", 100.0, -0.5);
        twin.same_as = Some("hetero".into());
        let mut twin_once = rec("hetero+rank", "1/8", "vt", 100.0, -0.5);
        twin_once.same_as = Some("hetero".into());
        let mut own = rec("hetero+rank", "1/8", "cwe", 10.0, -0.5);
        own.sample = 1;
        let rs = vec![
            rec("hetero", "1/8", "vt", 100.0, -0.5),
            twin,
            twin_once,
            own,
        ];
        let r = rows(&rs);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].label(), "hetero = 1d");
        assert_eq!(r[1].label(), "hetero+rank");
        let s = summarize(&rs, &[1024]);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].aliases, vec!["1d".to_string()]);
    }

    #[test]
    fn versus_says_whether_each_difference_is_resolved() {
        let mut rs = Vec::new();
        for i in 0..12 {
            let mut h = rec("hetero", "1/8", "vt", 100.0, -0.5 - 0.1 * i as f64);
            h.sample = i;
            let mut o = rec(
                "snapkv",
                "1/8",
                "vt",
                if i % 2 == 0 { 100.0 } else { 0.0 },
                -1.0 - 0.1 * i as f64,
            );
            o.sample = i;
            rs.extend([h, o]);
        }
        let shown: Vec<(String, String)> = rows(&rs)
            .into_iter()
            .map(|r| (r.method, r.budget))
            .collect();
        let v = versus(&crate::paired::all(&rs, &shown, 1));
        assert!(v.contains("hetero − snapkv"), "{v}");
        assert!(
            v.contains(
                "TF log-p +0.500 [+0.500, +0.500] over 12 samples, half-width 0.000 (0.000 pooled) (resolved, hetero better)"
            ),
            "{v}"
        );
        assert!(v.contains("score +50.0"), "{v}");
    }

    #[test]
    fn evidence_check_catches_unmerged_twins_and_missing_intervals() {
        let plan = router::RoutingPlan::uniform(router::Expert::FULL, 2);
        let record = |m: &str| crate::methods::PlanRecord {
            method: m.into(),
            budget: "1/8".into(),
            tokens: vec![1000],
            plan: plan.clone(),
        };
        let mut rs = Vec::new();
        for i in 0..4 {
            for m in ["full", "a", "b"] {
                let mut r = rec(
                    m,
                    if m == "full" { "-" } else { "1/8" },
                    "vt",
                    50.0,
                    -(i as f64),
                );
                r.sample = i;
                rs.push(r);
            }
        }
        let summary = summarize(&rs, &[1024]);
        let shown: Vec<(String, String)> = summary
            .iter()
            .map(|s| (s.method.clone(), s.budget.clone()))
            .collect();
        let comparisons = crate::paired::all(&rs, &shown, 1);
        // a and b hold the same plan but were measured (and shown) separately.
        let plans = [record("a"), record("b")];
        let err = check_evidence(&summary, &comparisons, &plans, true);
        assert!(
            matches!(err, Err(crate::EvalError::Evidence(ref w)) if w.contains("identical plans")),
            "{err:?}"
        );
        let mut other = record("b");
        other.plan = router::RoutingPlan::uniform(router::Expert::FULL, 3);
        assert!(
            check_evidence(&summary, &comparisons, &[record("a"), other.clone()], true).is_ok()
        );
        // Strict runs need every row paired with full.
        let err = check_evidence(&summary, &[], &[record("a"), other.clone()], true);
        assert!(
            matches!(err, Err(crate::EvalError::Evidence(ref w)) if w.contains("no paired interval")),
            "{err:?}"
        );
        assert!(check_evidence(&summary, &[], &[record("a"), other], false).is_ok());
    }

    #[test]
    fn matched_bytes_catches_a_method_over_its_budget() {
        let fp16 = |_| kv_tensor::Bytes(8000);
        let ok = rec("hetero", "1/8", "vt", 1.0, -1.0);
        assert!(check_matched_bytes(std::slice::from_ref(&ok), fp16).is_ok());
        let mut over = ok.clone();
        over.bytes = 1001;
        let err = check_matched_bytes(&[over], fp16);
        assert!(
            matches!(err, Err(crate::EvalError::OverBudget { cap: 1000, .. })),
            "{err:?}"
        );
        let mut nan = ok;
        nan.tf_logp = Some(f64::NAN);
        assert!(matches!(
            check_matched_bytes(&[nan], fp16),
            Err(crate::EvalError::NonFinite(_))
        ));
    }
}
