//! Summaries over samples, and where hetero stands against the best other method.
use crate::measure::Record;
use serde::Serialize;

/// One method at one budget, averaged.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Method name.
    pub method: String,
    /// Budget label.
    pub budget: String,
    /// Mean compression ratio over samples.
    pub ratio: f64,
    /// Mean cache bytes at each length.
    pub bytes: Vec<(usize, f64)>,
    /// Task samples measured.
    pub n: usize,
    /// Mean RULER score over every task sample.
    pub score: Option<f64>,
    /// Mean teacher-forced log-prob of the gold answers.
    pub tf_logp: Option<f64>,
    /// Mean teacher-forced argmax accuracy.
    pub tf_acc: Option<f64>,
    /// Mean prose NLL.
    pub nll: Option<f64>,
    /// Mean prose KL to the full cache.
    pub kl: Option<f64>,
    /// Mean score per task.
    pub per_task: Vec<(&'static str, f64)>,
    /// Mean score and teacher-forced accuracy per length.
    pub per_length: Vec<(usize, f64, f64)>,
}

/// The mean, `None` for no values.
pub fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// One summary per (method, budget), in first-seen order.
pub fn summarize(records: &[Record], lengths: &[usize]) -> Vec<Summary> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in records {
        let k = (r.method.clone(), r.budget.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut tasks: Vec<&'static str> = Vec::new();
    for r in records.iter().filter(|r| r.score.is_some()) {
        if !tasks.contains(&r.task) {
            tasks.push(r.task);
        }
    }
    let mut all_lengths: Vec<usize> = records.iter().map(|r| r.length).collect();
    all_lengths.sort_unstable();
    all_lengths.dedup();
    keys.into_iter()
        .map(|(method, budget)| {
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
                score: mean(rs.iter().filter_map(|r| r.score)),
                tf_logp: mean(rs.iter().filter_map(|r| r.tf_logp)),
                tf_acc: mean(rs.iter().filter_map(|r| r.tf_acc)),
                nll: mean(rs.iter().filter_map(|r| r.nll)),
                kl: mean(rs.iter().filter_map(|r| r.kl)),
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
                            mean(at().filter_map(|r| r.score))?,
                            mean(at().filter_map(|r| r.tf_acc))?,
                        ))
                    })
                    .collect(),
                method,
                budget,
            }
        })
        .collect()
}

/// Where hetero stands at each budget against the best other method, each pair compared on
/// the samples both measured (a plan can be infeasible at some lengths: at 1024 tokens the
/// 64-token residual window alone exceeds 1/14 of the cache). Best = highest mean score, then
/// teacher-forced log-prob.
pub fn versus(records: &[Record]) -> String {
    let key = |r: &Record| (r.length, r.task, r.sample);
    let mut budgets: Vec<&str> = Vec::new();
    for r in records.iter().filter(|r| r.budget != "-") {
        if !budgets.contains(&r.budget.as_str()) {
            budgets.push(&r.budget);
        }
    }
    let mut out = String::new();
    for b in budgets {
        let hetero: Vec<&Record> = records
            .iter()
            .filter(|r| r.budget == b && r.method == "hetero")
            .collect();
        let mut others: Vec<&str> = Vec::new();
        for r in records
            .iter()
            .filter(|r| r.budget == b && !r.method.starts_with("hetero"))
        {
            if !others.contains(&r.method.as_str()) {
                others.push(&r.method);
            }
        }
        // (method, n, hetero score, its score, hetero TF log-p, its TF log-p)
        let mut best: Option<(&str, usize, f64, f64, f64, f64)> = None;
        for o in others {
            let theirs: Vec<&Record> = records
                .iter()
                .filter(|r| r.budget == b && r.method == o && r.score.is_some())
                .filter(|r| hetero.iter().any(|h| key(h) == key(r)))
                .collect();
            let ours: Vec<&Record> = hetero
                .iter()
                .copied()
                .filter(|h| h.score.is_some() && theirs.iter().any(|r| key(r) == key(h)))
                .collect();
            let (Some(hs), Some(os), Some(hl), Some(ol)) = (
                mean(ours.iter().filter_map(|r| r.score)),
                mean(theirs.iter().filter_map(|r| r.score)),
                mean(ours.iter().filter_map(|r| r.tf_logp)),
                mean(theirs.iter().filter_map(|r| r.tf_logp)),
            ) else {
                continue;
            };
            if best.is_none_or(|(_, _, _, bs, _, bl)| (os, ol) > (bs, bl)) {
                best = Some((o, theirs.len(), hs, os, hl, ol));
            }
        }
        if let Some((o, n, hs, os, hl, ol)) = best {
            out.push_str(&format!(
                "At {b}, on the {n} task samples both measured: hetero scores {hs:.1} (TF log-p {hl:.3}); the best other method, {o}, scores {os:.1} (TF log-p {ol:.3}).\n"
            ));
        }
    }
    if !out.is_empty() {
        out.insert(0, '\n');
    }
    out
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

    fn rec(method: &str, budget: &str, task: &'static str, score: f64, logp: f64) -> Record {
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
        }
    }

    #[test]
    fn summaries_average_per_method_and_budget() {
        let rs = vec![
            rec("hetero", "1/8", "vt", 100.0, -0.5),
            rec("hetero", "1/8", "cwe", 50.0, -1.5),
            rec("snapkv", "1/8", "vt", 0.0, -2.0),
        ];
        let s = summarize(&rs, &[1024]);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].method.as_str(), s[0].n), ("hetero", 2));
        assert_eq!(s[0].score, Some(75.0));
        assert_eq!(s[0].tf_logp, Some(-1.0));
        assert_eq!(s[0].per_task, vec![("vt", 100.0), ("cwe", 50.0)]);
        assert_eq!(s[1].score, Some(0.0));
        assert_eq!(mean(std::iter::empty()), None);
    }

    #[test]
    fn versus_compares_on_shared_samples_only() {
        let mut other = rec("snapkv", "1/8", "cwe", 100.0, -0.1);
        other.sample = 9; // a sample hetero did not measure
        let rs = vec![
            rec("hetero", "1/8", "vt", 100.0, -0.5),
            rec("knorm", "1/8", "vt", 40.0, -1.0),
            other,
        ];
        let v = versus(&rs);
        assert!(
            v.contains("the best other method, knorm, scores 40.0"),
            "{v}"
        );
        assert!(v.contains("on the 1 task samples"), "{v}");
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
