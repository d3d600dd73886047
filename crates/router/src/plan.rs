//! Routing plans: one expert per layer, stored as TOML and validated on load.
use crate::Expert;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What was wrong with a plan.
#[derive(Debug, Error)]
pub enum RouterError {
    /// The TOML does not parse or holds unknown keys / out-of-range values (the message names
    /// the line).
    #[error("invalid plan file: {0}")]
    Parse(String),
    /// The plan is for a different number of layers.
    #[error("the plan routes {plan} layers but the model has {model}")]
    LayerCount {
        /// Layers in the plan.
        plan: usize,
        /// Layers in the model.
        model: usize,
    },
    /// Writing the plan failed.
    #[error("cannot serialise the plan: {0}")]
    Serialise(String),
}

/// One expert per layer, in layer order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingPlan {
    /// The experts.
    pub layers: Vec<Expert>,
}

impl RoutingPlan {
    /// Every layer gets the same expert.
    pub fn uniform(expert: Expert, layers: usize) -> Self {
        Self {
            layers: vec![expert; layers],
        }
    }

    /// Parses and validates a plan for a model with `layers` layers. Bit widths, ratios and
    /// group sizes are validated by their types during parsing; unknown keys are rejected.
    pub fn from_toml(text: &str, layers: usize) -> Result<Self, RouterError> {
        let plan: RoutingPlan =
            toml::from_str(text).map_err(|e| RouterError::Parse(e.to_string()))?;
        if plan.layers.len() != layers {
            return Err(RouterError::LayerCount {
                plan: plan.layers.len(),
                model: layers,
            });
        }
        Ok(plan)
    }

    /// The plan as TOML.
    pub fn to_toml(&self) -> Result<String, RouterError> {
        toml::to_string(self).map_err(|e| RouterError::Serialise(e.to_string()))
    }
}
