//! The per-layer knob of the token axis.
use crate::ScorerKind;
use kv_tensor::{KvError, Ratio};
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
    /// How the kept tokens are chosen from the scores.
    #[serde(default, skip_serializing_if = "Selection::is_top_k")]
    pub selection: Selection,
}

/// How the kept tokens are chosen from the scores (one file each: [`crate::select`],
/// [`crate::headwise`], [`crate::redundancy`], [`crate::facility`], [`crate::chunks`]).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Selection {
    /// The `ceil(keep × t)` best tokens of every KV head.
    #[default]
    TopK,
    /// AdaKV-style: the layer's budget (`ceil(keep × t)` × heads) is shared by its KV heads by
    /// score, each head keeping at least `min_share` of its even share (plus its protected
    /// tokens). Heads end up with different lengths, stored ragged (batch 1 only).
    HeadWise {
        /// Guaranteed share of the even per-head budget (AdaKV's safeguard; 0.2 by default).
        #[serde(default = "default_min_share")]
        min_share: Ratio,
    },
    /// Redundancy-aware greedy (facility-location style): each next pick maximises its
    /// min-max-normalised score minus `lambda` × its largest cosine similarity in V space to
    /// the tokens already kept. `lambda = 0` is top-k.
    Redundancy {
        /// Weight of the redundancy penalty.
        lambda: Lambda,
    },
    /// α's facility-location retention ([`crate::facility`]): the lazy greedy maximum of the
    /// kept scores plus `lambda` × the importance-weighted V-space coverage of every token.
    /// `lambda = 0` is top-k.
    FacilityLocation {
        /// Weight of the coverage term (α's tuned value is 0.5).
        lambda: Lambda,
    },
    /// ChunkKV span selection ([`crate::chunks`]): whole chunks of `size` consecutive tokens,
    /// ranked by their mean score summed over heads, the same for every head.
    Chunks {
        /// Tokens per chunk (kvpress's default is 20).
        size: std::num::NonZeroUsize,
    },
}

impl Selection {
    fn is_top_k(&self) -> bool {
        *self == Selection::TopK
    }
}

fn default_min_share() -> Ratio {
    Ratio::new(0.2).expect("0.2 is a ratio")
}

/// A redundancy weight: finite and non-negative, checked once at construction.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Lambda(f64);

impl Lambda {
    /// `v` if it is finite and ≥ 0.
    pub fn new(v: f64) -> Result<Self, KvError> {
        if v.is_finite() && v >= 0.0 {
            Ok(Self(v))
        } else {
            Err(KvError::InvalidValue {
                what: "redundancy lambda",
                value: v.to_string(),
                allowed: "a finite number ≥ 0",
            })
        }
    }

    /// The weight.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Lambda {
    type Error = KvError;
    fn try_from(v: f64) -> Result<Self, KvError> {
        Self::new(v)
    }
}

impl From<Lambda> for f64 {
    fn from(l: Lambda) -> f64 {
        l.0
    }
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
            selection: Selection::TopK,
        }
    }

    /// The same setting with another selection.
    pub fn with_selection(self, selection: Selection) -> Self {
        Self { selection, ..self }
    }

    /// Tokens kept out of `t`: `ceil(keep × t)` clamped to `[sinks + window, t]`.
    pub fn kept(&self, t: usize) -> usize {
        self.keep.of(t).max(self.sinks + self.window).min(t)
    }
}
