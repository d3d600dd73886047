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
    /// `passage_loss[passage][layer][expert]`: the losses `loss` averages, kept so the solver
    /// credits a routed scorer only with gains every passage shows ([`crate::credited_losses`]).
    /// Empty in tables written before it was kept.
    #[serde(default)]
    pub passage_loss: Vec<Vec<Vec<f64>>>,
}

impl SensitivityTable {
    /// `loss[layer][expert]` as the solver minimises it: the mean, with routed scorers'
    /// gains over the menu's scorer credited only as far as every passage shows them.
    pub fn solver_loss(&self) -> Vec<Vec<f64>> {
        crate::credited_losses(&self.menu, &self.passage_loss, &self.loss)
    }
}

impl LossPredictor for SensitivityTable {
    fn loss(&self, layer: usize, expert: &Expert) -> Option<f64> {
        let e = self.menu.iter().position(|m| m == expert)?;
        self.loss.get(layer)?.get(e).copied()
    }
}
