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
    /// A layer's expert is inconsistent (e.g. a rank beyond the head dimension).
    #[error("layer {layer}: {why}")]
    Expert {
        /// The layer.
        layer: usize,
        /// What is wrong.
        why: String,
    },
    /// Writing the plan failed.
    #[error("cannot serialise the plan: {0}")]
    Serialise(String),
}

/// What a set of experts needs beyond the keys and values: what the prefill must observe and
/// what must be calibrated. One scan, so a caller cannot forget a need (a plan with H2O
/// layers needs the prefill's attention mass).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// The attention every key received during the prefill (H2O).
    pub attention_mass: bool,
    /// KVzip's context-reconstruction pass after the prefill.
    pub reconstruction: bool,
    /// Calibrated low-rank bases (a layer projects).
    pub bases: bool,
    /// Calibrated TriAttention statistics (a layer evicts with `trig`).
    pub trig_stats: bool,
    /// Registered axes' stages (a layer runs one): the calibrated axes must carry them.
    pub stages: bool,
}

impl Needs {
    /// Whether the caches need calibrated axes at all (anything beyond the uncalibrated
    /// scorers and KIVI).
    pub fn calibration(&self) -> bool {
        self.bases || self.trig_stats || self.stages
    }
}

impl Needs {
    /// The union of what `experts` need.
    pub fn of<'a>(experts: impl IntoIterator<Item = &'a Expert>) -> Self {
        experts.into_iter().fold(Needs::default(), |n, e| {
            let scorer = e.evict.map(|s| s.scorer);
            Needs {
                attention_mass: n.attention_mass
                    || scorer.is_some_and(|s| s.needs().attention_mass),
                reconstruction: n.reconstruction
                    || scorer.is_some_and(|s| s.needs().reconstruction),
                bases: n.bases || e.lowrank.is_some(),
                trig_stats: n.trig_stats || scorer == Some(axis_evict::ScorerKind::Trig),
                stages: n.stages || !e.stages.is_empty(),
            }
        })
    }
}

/// What a plan was sized for: its budget holds at this prompt length. At other lengths the
/// ratio drifts (the residual window is a fixed number of tokens and quantization flushes
/// whole groups), which `generate` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizedFor {
    /// Prompt tokens the plan was solved for.
    pub tokens: usize,
    /// The plan's predicted bytes at that length.
    pub bytes: u64,
    /// The fp16 cache of that length.
    pub fp16_bytes: u64,
}

impl SizedFor {
    /// The compression ratio the plan was sized for.
    pub fn ratio(&self) -> f64 {
        self.fp16_bytes as f64 / self.bytes.max(1) as f64
    }
}

/// One expert per layer, in layer order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingPlan {
    /// What the plan was sized for, when a solver recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sized_for: Option<SizedFor>,
    /// The experts.
    pub layers: Vec<Expert>,
}

impl RoutingPlan {
    /// Every layer gets the same expert.
    pub fn uniform(expert: Expert, layers: usize) -> Self {
        Self {
            sized_for: None,
            layers: vec![expert; layers],
        }
    }

    /// The plan held through a generation to `total` tokens (prompt + generated): every layer
    /// that evicts with a scorer able to run during decoding gets a decode budget of what it
    /// keeps of `total` tokens, re-evicting every `interval` generated tokens, so the cache
    /// stays at the plan's bytes for `total` tokens however the generation grows. Layers that
    /// do not evict, or whose scorer needs a statistic only the prefill produces (KVzip's
    /// reconstruction pass), keep growing. H2O layers re-evict on the attention mass they
    /// accumulate while decoding.
    pub fn with_decode(mut self, total: usize, interval: usize) -> Self {
        for e in &mut self.layers {
            if e.compresses_while_decoding()
                && let Some(ev) = e.evict
            {
                e.decode = Some(crate::DecodeBudget {
                    tokens: e.kept(total).max(ev.sinks + ev.window),
                    interval,
                });
            }
        }
        self
    }

    /// Parses and validates a plan for a model with `layers` layers of head dimension
    /// `head_dim`. Bit widths, ratios and group sizes are validated by their types during
    /// parsing; unknown keys are rejected; ranks and combinations by [`Expert::validate`].
    pub fn from_toml(text: &str, layers: usize, head_dim: usize) -> Result<Self, RouterError> {
        let plan: RoutingPlan =
            toml::from_str(text).map_err(|e| RouterError::Parse(e.to_string()))?;
        if plan.layers.len() != layers {
            return Err(RouterError::LayerCount {
                plan: plan.layers.len(),
                model: layers,
            });
        }
        plan.validate(head_dim)?;
        Ok(plan)
    }

    /// Checks every layer's expert (see [`Expert::validate`]).
    pub fn validate(&self, head_dim: usize) -> Result<(), RouterError> {
        for (layer, e) in self.layers.iter().enumerate() {
            e.validate(head_dim)
                .map_err(|why| RouterError::Expert { layer, why })?;
        }
        Ok(())
    }

    /// What a prefill and the calibrated axes must provide for this plan's experts.
    pub fn needs(&self) -> Needs {
        Needs::of(&self.layers)
    }

    /// The plan as TOML.
    pub fn to_toml(&self) -> Result<String, RouterError> {
        toml::to_string(self).map_err(|e| RouterError::Serialise(e.to_string()))
    }
}
