//! Loss predictors and the stored calibration table.
use router::Expert;
use serde::{Deserialize, Serialize};

/// Predicted quality loss of giving `expert` to `layer`, assumed additive over layers.
pub trait LossPredictor {
    /// The loss (≥ 0; 0 = lossless).
    fn loss(&self, layer: usize, expert: &Expert) -> Option<f64>;
}

/// The result of a calibration run: per layer, the loss of every expert of a menu, for a
/// given prompt length. Stored as JSON and reusable across solves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensitivityTable {
    /// sha256 of the model file the table was measured on (checked on load by callers).
    pub model_sha256: String,
    /// Prompt tokens of the calibration passages (costs are planned at this length).
    pub tokens: usize,
    /// The experts, in column order.
    pub menu: Vec<Expert>,
    /// `loss[layer][expert]`: the calibration's loss averaged over its passages (the relative
    /// attention-output error by default; see [`crate::CalibrationLoss`]).
    pub loss: Vec<Vec<f64>>,
}

impl LossPredictor for SensitivityTable {
    fn loss(&self, layer: usize, expert: &Expert) -> Option<f64> {
        let e = self.menu.iter().position(|m| m == expert)?;
        self.loss.get(layer)?.get(e).copied()
    }
}
