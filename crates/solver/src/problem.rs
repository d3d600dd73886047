//! A routing problem: per layer, each candidate expert's bytes and predicted loss.
use kv_tensor::Bytes;
use thiserror::Error;

/// What went wrong solving.
#[derive(Debug, Error, PartialEq)]
pub enum SolverError {
    /// Even the cheapest expert everywhere exceeds the budget.
    #[error("budget of {budget} bytes is infeasible: the smallest plan needs {min_bytes} bytes")]
    Infeasible {
        /// The budget asked for.
        budget: u64,
        /// The cheapest plan's bytes.
        min_bytes: u64,
    },
    /// A budgeted baseline cannot keep even 1 % of the tokens within the budget.
    #[error(
        "budget of {budget} bytes is infeasible: not even a 1 % keep fits (sinks and the recent window are always kept)"
    )]
    NoKeepFits {
        /// The budget asked for.
        budget: u64,
    },
    /// A budget string that does not parse.
    #[error("invalid budget {0:?}: use bytes (12345, 3MiB) or a fraction of fp16 (1/14, 0.25)")]
    BadBudget(String),
    /// A malformed problem (no layers, a layer without candidates, NaN losses).
    #[error("invalid routing problem: {0}")]
    Invalid(String),
}

/// Per layer, the candidates `(bytes, loss)`; the solution picks one per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// `layers[l][e] = (bytes, predicted loss)` of expert `e` at layer `l`.
    pub layers: Vec<Vec<(u64, f64)>>,
}

/// A chosen candidate per layer with its totals.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// Candidate index per layer.
    pub choice: Vec<usize>,
    /// Total bytes.
    pub bytes: Bytes,
    /// Total predicted loss (losses are additive over layers).
    pub loss: f64,
}

impl Problem {
    /// Checks the problem is well formed.
    pub fn validate(&self) -> Result<(), SolverError> {
        if self.layers.is_empty() {
            return Err(SolverError::Invalid("no layers".into()));
        }
        for (l, c) in self.layers.iter().enumerate() {
            if c.is_empty() {
                return Err(SolverError::Invalid(format!("layer {l} has no candidate")));
            }
            if c.iter().any(|(_, loss)| !loss.is_finite()) {
                return Err(SolverError::Invalid(format!(
                    "layer {l} has a non-finite loss"
                )));
            }
        }
        Ok(())
    }

    /// Totals of a choice.
    pub fn solution(&self, choice: Vec<usize>) -> Solution {
        let bytes = choice.iter().zip(&self.layers).map(|(&c, l)| l[c].0).sum();
        let loss = choice.iter().zip(&self.layers).map(|(&c, l)| l[c].1).sum();
        Solution {
            choice,
            bytes: Bytes(bytes),
            loss,
        }
    }

    /// The cheapest candidate of each layer (lowest loss among equally cheap ones).
    pub fn cheapest(&self) -> Vec<usize> {
        self.layers
            .iter()
            .map(|c| {
                (0..c.len())
                    .min_by(|&a, &b| c[a].0.cmp(&c[b].0).then(c[a].1.total_cmp(&c[b].1)))
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Fails with [`SolverError::Infeasible`] when the cheapest plan exceeds `budget`.
    pub fn check_feasible(&self, budget: u64) -> Result<(), SolverError> {
        self.validate()?;
        let min = self.solution(self.cheapest()).bytes.get();
        if min > budget {
            return Err(SolverError::Infeasible {
                budget,
                min_bytes: min,
            });
        }
        Ok(())
    }
}
