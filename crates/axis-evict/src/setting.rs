//! The per-layer knob of the token axis.
use crate::ScorerKind;
use kv_tensor::Ratio;
use serde::{Deserialize, Serialize};

/// Which scorer, what share of tokens to keep, and what is always protected.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictSetting {
    /// The scorer.
    pub scorer: ScorerKind,
    /// Share of tokens kept (per KV head).
    pub keep: Ratio,
    /// Leading tokens always kept (attention sinks).
    #[serde(default = "default_sinks")]
    pub sinks: usize,
    /// Most recent tokens always kept.
    #[serde(default = "default_window")]
    pub window: usize,
}

fn default_sinks() -> usize {
    4
}

fn default_window() -> usize {
    32
}

impl EvictSetting {
    /// `scorer` at `keep`, default protection (4 sinks, 32 recent tokens).
    pub fn new(scorer: ScorerKind, keep: Ratio) -> Self {
        Self {
            scorer,
            keep,
            sinks: default_sinks(),
            window: default_window(),
        }
    }

    /// Tokens kept out of `t`: `ceil(keep × t)` clamped to `[sinks + window, t]`.
    pub fn kept(&self, t: usize) -> usize {
        self.keep.of(t).max(self.sinks + self.window).min(t)
    }
}
