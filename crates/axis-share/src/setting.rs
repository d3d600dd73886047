//! The per-layer knob and its byte plan.
use axis_lowrank::BASIS_BYTES;
use kv_tensor::{LayerShape, PlanStage, Side, SidePlan};
use serde::{Deserialize, Serialize};

/// Ranks on the group's shared basis for keys and values (`None` = that side untouched), and
/// how many adjacent layers share each basis (the calibrated group size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareSetting {
    /// Key rank.
    #[serde(default)]
    pub k_rank: Option<usize>,
    /// Value rank.
    #[serde(default)]
    pub v_rank: Option<usize>,
    /// Adjacent layers per shared basis.
    pub layers: usize,
}

impl ShareSetting {
    /// The rank of `side`.
    pub fn rank(&self, side: Side) -> Option<usize> {
        match side {
            Side::Keys => self.k_rank,
            Side::Values => self.v_rank,
        }
    }
}

/// A projected side narrows to its rank; the group's basis `[kv_heads, head_dim, rank]` is
/// charged `1/layers` to each member.
impl PlanStage for ShareSetting {
    fn plan_side(&self, side: Side, input: &LayerShape) -> SidePlan {
        SidePlan::projected(input, self.rank(side), BASIS_BYTES, self.layers)
    }
}

impl router::StageSetting for ShareSetting {
    fn axis(&self) -> &'static str {
        crate::AXIS
    }

    fn to_toml(&self) -> Result<toml::Table, String> {
        toml::Table::try_from(self).map_err(|e| e.to_string())
    }

    fn validate(&self, head_dim: usize) -> Result<(), String> {
        if self.layers == 0 {
            return Err("layers = 0: a basis is shared by at least one layer".into());
        }
        for (side, r) in [("k_rank", self.k_rank), ("v_rank", self.v_rank)] {
            if let Some(r) = r
                && (r == 0 || r > head_dim)
            {
                return Err(format!("{side} = {r} is not in 1..={head_dim}"));
            }
        }
        Ok(())
    }

    fn label(&self) -> String {
        let r = |x: Option<usize>| x.map_or("-".to_string(), |r| r.to_string());
        format!(
            "share K{}V{}/{}",
            r(self.k_rank),
            r(self.v_rank),
            self.layers
        )
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
