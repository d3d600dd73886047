//! Solver properties on random tables: never over budget, exact ≤ greedy, loss non-increasing
//! as the budget grows, infeasible budgets name the smallest feasible bytes.
use crate::{Problem, SolverError, exact, greedy};
use proptest::prelude::*;

fn problem() -> impl Strategy<Value = Problem> {
    let cand = (1u64..40, 0.0f64..10.0).prop_map(|(b, l)| (b * 8, l));
    prop::collection::vec(prop::collection::vec(cand, 1..6), 1..8)
        .prop_map(|layers| Problem { layers })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn solvers_respect_budget_and_exact_wins(p in problem(), extra in 0u64..400) {
        let min = p.solution(p.cheapest()).bytes.get();
        let budget = min + extra;
        let g = greedy::solve(&p, budget).expect("feasible");
        let e = exact::solve(&p, budget).expect("feasible");
        prop_assert!(g.bytes.get() <= budget && e.bytes.get() <= budget);
        prop_assert!(e.loss <= g.loss + 1e-9, "exact {} > greedy {}", e.loss, g.loss);
        // Brute force on small problems: exact is optimal.
        if p.layers.iter().map(|l| l.len()).product::<usize>() <= 4096 {
            let mut best = f64::INFINITY;
            let mut idx = vec![0usize; p.layers.len()];
            loop {
                let s = p.solution(idx.clone());
                if s.bytes.get() <= budget { best = best.min(s.loss); }
                let mut i = 0;
                while i < idx.len() { idx[i] += 1; if idx[i] < p.layers[i].len() { break; } idx[i] = 0; i += 1; }
                if i == idx.len() { break; }
            }
            prop_assert!((e.loss - best).abs() < 1e-9, "exact {} vs optimum {}", e.loss, best);
        }
    }

    #[test]
    fn loss_is_monotone_in_budget(p in problem(), a in 0u64..300, b in 0u64..300) {
        let min = p.solution(p.cheapest()).bytes.get();
        let (lo, hi) = (min + a.min(b), min + a.max(b));
        prop_assert!(exact::solve(&p, hi).expect("ok").loss <= exact::solve(&p, lo).expect("ok").loss + 1e-9);
    }

    #[test]
    fn infeasible_names_the_minimum(p in problem()) {
        let min = p.solution(p.cheapest()).bytes.get();
        prop_assert_eq!(greedy::solve(&p, min - 1), Err(SolverError::Infeasible { budget: min - 1, min_bytes: min }));
        prop_assert_eq!(exact::solve(&p, min - 1), Err(SolverError::Infeasible { budget: min - 1, min_bytes: min }));
    }
}
