//! Multiple-choice knapsack by dynamic programming over byte buckets: optimal for additive
//! predicted losses, exactly so when every cost is a multiple of the bucket size (the budget is
//! cut into at most `MAX_BUCKETS`; other costs are rounded up, which keeps every plan within
//! budget). The greedy plan is also scored and the better of the two returned, so the exact
//! solver is never worse than greedy even where rounding costs it a bucket.
use crate::{Problem, Solution, SolverError, greedy};

/// Buckets the budget is divided into.
pub const MAX_BUCKETS: u64 = 8192;

/// Solves `p` under `budget` bytes.
pub fn solve(p: &Problem, budget: u64) -> Result<Solution, SolverError> {
    p.check_feasible(budget)?;
    let unit = gcd_all(p).max(budget.div_ceil(MAX_BUCKETS)).max(1);
    let cap = (budget / unit) as usize;
    let cost = |b: u64| b.div_ceil(unit) as usize;
    // best[c] = least loss of the layers so far using ≤ c buckets; choices kept per layer.
    let mut best = vec![0f64; cap + 1];
    let mut picks: Vec<Vec<u32>> = Vec::with_capacity(p.layers.len());
    for cands in &p.layers {
        let mut next = vec![f64::INFINITY; cap + 1];
        let mut pick = vec![u32::MAX; cap + 1];
        for c in 0..=cap {
            for (e, &(b, loss)) in cands.iter().enumerate() {
                let w = cost(b);
                if w <= c && best[c - w] + loss < next[c] {
                    next[c] = best[c - w] + loss;
                    pick[c] = e as u32;
                }
            }
        }
        best = next;
        picks.push(pick);
    }
    let dp = if best[cap].is_finite() {
        let mut choice = vec![0usize; p.layers.len()];
        let mut c = cap;
        for l in (0..p.layers.len()).rev() {
            let e = picks[l][c] as usize;
            choice[l] = e;
            c -= cost(p.layers[l][e].0);
        }
        Some(p.solution(choice))
    } else {
        None
    };
    let g = greedy::solve(p, budget)?;
    Ok(match dp {
        Some(d) if d.loss <= g.loss => d,
        _ => g,
    })
}

fn gcd_all(p: &Problem) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    p.layers.iter().flatten().fold(0, |g, &(b, _)| gcd(g, b))
}
