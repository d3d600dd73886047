//! The MoE-nD greedy: start every layer at its cheapest expert, then repeatedly take the
//! upgrade (any layer, any costlier expert that lowers that layer's loss) with the largest loss
//! reduction per extra byte that still fits, until none fits.
use crate::{Problem, Solution, SolverError};

/// Solves `p` under `budget` bytes.
pub fn solve(p: &Problem, budget: u64) -> Result<Solution, SolverError> {
    p.check_feasible(budget)?;
    let mut choice = p.cheapest();
    let mut bytes: u64 = choice.iter().zip(&p.layers).map(|(&c, l)| l[c].0).sum();
    loop {
        let mut best: Option<(usize, usize, f64)> = None;
        for (l, cands) in p.layers.iter().enumerate() {
            let (cur_b, cur_loss) = cands[choice[l]];
            for (e, &(b, loss)) in cands.iter().enumerate() {
                if loss >= cur_loss || bytes - cur_b + b > budget {
                    continue;
                }
                // A free improvement (no extra bytes) ranks above any paid one.
                let gain = (cur_loss - loss) / (b.saturating_sub(cur_b) as f64 + 1e-9);
                if best.is_none_or(|(_, _, g)| gain > g) {
                    best = Some((l, e, gain));
                }
            }
        }
        match best {
            Some((l, e, _)) => {
                bytes = bytes - p.layers[l][choice[l]].0 + p.layers[l][e].0;
                choice[l] = e;
            }
            None => return Ok(p.solution(choice)),
        }
    }
}
