//! One scorer trait (kvpress's `ScorerPress.score`) and the registry of the scorers this crate
//! ships. Adding a scorer is one file (a type implementing [`ScorerType`] and [`Scorer`]; for a
//! scorer without calibration, one [`builtin_scorer!`] invocation) and one line in
//! [`scorers!`]'s invocation below.
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use kv_tensor::{AxisError, ObservationCtx};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What a scorer reads besides the keys and values. The prefill must be asked for attention
/// mass and the calibrated axes must carry statistics; window queries always come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScorerNeeds {
    /// The observation window's queries (`ObservationCtx::window_queries`).
    pub window_queries: bool,
    /// The attention every key received during the prefill (`ObservationCtx::attention_mass`).
    pub attention_mass: bool,
    /// Statistics calibrated offline on the model (the scorer is built from them).
    pub calibration: bool,
    /// The context-reconstruction pass's peak attention (`ObservationCtx::reconstruction`).
    pub reconstruction: bool,
}

impl ScorerNeeds {
    /// Whether the scorer reads a statistic only a prefill produces (KVzip's reconstruction
    /// pass), so it cannot evict again while tokens are generated. Attention mass is not one:
    /// a cache that re-evicts can add up what the decoding queries pay each row (the routed
    /// cache does; H2O's paper accumulates it exactly so).
    pub fn prefill_only(self) -> bool {
        self.reconstruction
    }

    /// Nothing besides keys and values.
    pub const NONE: ScorerNeeds = ScorerNeeds {
        window_queries: false,
        attention_mass: false,
        calibration: false,
        reconstruction: false,
    };
}

/// A scorer that needs no calibration, in one invocation: its type (a unit struct), the
/// observations it reads, and its score given the input `i`. It implements [`ScorerType`]
/// (its uncalibrated instance is itself) and [`Scorer`] for every backend.
#[macro_export]
macro_rules! builtin_scorer {
    ($(#[$doc:meta])* $ty:ident, needs: [$($need:ident),*], |$i:ident| $body:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $ty;

        impl $crate::ScorerType for $ty {
            const NEEDS: $crate::ScorerNeeds = $crate::ScorerNeeds {
                $($need: true,)*
                ..$crate::ScorerNeeds::NONE
            };

            fn builtin() -> Option<Self> {
                Some(Self)
            }
        }

        impl<B: kv_tensor::KvBackend> $crate::Scorer<B> for $ty {
            fn needs(&self) -> $crate::ScorerNeeds {
                <Self as $crate::ScorerType>::NEEDS
            }

            fn score(
                &self,
                $i: &$crate::ScoreInput<'_, B>,
            ) -> Result<burn::tensor::Tensor<B, 3>, kv_tensor::AxisError> {
                $body
            }
        }
    };
}

/// What a scorer is given: the cached keys (after RoPE) and values `[b, h, t, d]`, the
/// position of the next query, and what the prefill observed.
#[derive(Debug, Clone, Copy)]
pub struct ScoreInput<'a, B: KvBackend> {
    /// Keys, after RoPE.
    pub k: &'a Tensor<B, 4>,
    /// Values.
    pub v: &'a Tensor<B, 4>,
    /// Position of the next query (one past the newest cached token).
    pub next: usize,
    /// The layer index and the observations.
    pub ctx: &'a ObservationCtx<B>,
}

/// A per-token statistic the prefill observed (`[b, h, t]`, e.g. H2O's attention mass), checked
/// to cover exactly the keys `k` being scored: missing, it is the typed error naming `method`
/// and `what` it needed; misshapen, a shape error.
pub(crate) fn observed_per_token<B: KvBackend>(
    stat: Option<&Tensor<B, 3>>,
    k: &Tensor<B, 4>,
    method: &'static str,
    what: &'static str,
) -> Result<Tensor<B, 3>, AxisError> {
    let stat = stat
        .cloned()
        .ok_or(AxisError::MissingObservation { method, what })?;
    if stat.dims() != k.dims()[..3] {
        return Err(kv_tensor::KvError::Shape {
            context: what,
            expected: k.dims()[..3].to_vec(),
            got: stat.dims().to_vec(),
        }
        .into());
    }
    Ok(stat)
}

/// A scorer: the importance `[b, h, t]` of every cached token per KV head, higher = keep.
/// Selections ([`crate::select`], [`crate::headwise`], [`crate::redundancy`]) turn scores
/// into kept tokens.
pub trait Scorer<B: KvBackend>: Send + Sync + std::fmt::Debug {
    /// What the scorer reads besides keys and values.
    fn needs(&self) -> ScorerNeeds;

    /// The scores.
    fn score(&self, input: &ScoreInput<'_, B>) -> Result<Tensor<B, 3>, AxisError>;
}

/// What the registry knows about a scorer's type without a backend: its needs, and the
/// instance to use when nothing was calibrated (`None` for scorers built from calibration).
pub trait ScorerType: Sized {
    /// What every instance needs.
    const NEEDS: ScorerNeeds;

    /// The uncalibrated instance, if the scorer has one.
    fn builtin() -> Option<Self>;
}

/// The registry: one line per scorer (`Variant => "plan name", file::Type;`) generates
/// [`ScorerKind`], its names and its dispatch.
macro_rules! scorers {
    ($($(#[$doc:meta])* $kind:ident => $name:literal, $ty:ty;)*) => {
        /// Every scorer this crate ships, by the name plans use.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum ScorerKind {
            $($(#[$doc])* $kind,)*
        }

        impl ScorerKind {
            /// Every scorer.
            pub const ALL: [ScorerKind; [$($name),*].len()] = [$(ScorerKind::$kind),*];

            /// The name plans and method names use (`expected_attention`).
            pub fn name(self) -> &'static str {
                match self {
                    $(ScorerKind::$kind => $name,)*
                }
            }

            /// What the scorer reads besides keys and values.
            pub fn needs(self) -> ScorerNeeds {
                match self {
                    $(ScorerKind::$kind => <$ty as ScorerType>::NEEDS,)*
                }
            }

            /// The uncalibrated scorer (`None` for one built from calibration statistics).
            pub fn builtin<B: KvBackend>(self) -> Option<Arc<dyn Scorer<B>>> {
                match self {
                    $(ScorerKind::$kind => <$ty as ScorerType>::builtin()
                        .map(|s| Arc::new(s) as Arc<dyn Scorer<B>>),)*
                }
            }
        }
    };
}

scorers! {
    /// StreamingLLM: sinks + most recent tokens.
    Streaming => "streaming", crate::streaming::Streaming;
    /// Negative key norm.
    Knorm => "knorm", crate::knorm::Knorm;
    /// SnapKV: observation-window attention, max-pooled.
    Snapkv => "snapkv", crate::snapkv::Snapkv;
    /// H2O: attention accumulated over the whole prefill.
    H2o => "h2o", crate::h2o::H2o;
    /// TOVA: attention of the last query.
    Tova => "tova", crate::tova::Tova;
    /// Expected attention of future queries under Gaussian query statistics.
    ExpectedAttention => "expected_attention", crate::expected_attention::ExpectedAttention;
    /// Uniformly random (a control).
    Random => "random", crate::random::Random;
    /// TriAttention: calibrated pre-RoPE query centres give each head a distance preference
    /// (a trigonometric series over the RoPE frequencies) plus a key-norm term.
    Trig => "trig", crate::trig::Trig;
    /// KVzip: the peak attention of a pass that makes the model repeat its context.
    Kvzip => "kvzip", crate::kvzip::Kvzip;
}

impl std::fmt::Display for ScorerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ScorerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                format!("unknown scorer {s:?}; one of {}", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::ScorerKind;

    /// Method names (`adakv(snapkv)`) and plans (`scorer = "snapkv"`) spell scorers alike.
    #[test]
    fn names_are_the_plan_spelling_and_parse_back() {
        for k in ScorerKind::ALL {
            let serde = serde_json::to_string(&k).unwrap_or_default();
            assert_eq!(serde, format!("\"{}\"", k.name()));
            assert_eq!(k.name().parse::<ScorerKind>(), Ok(k));
        }
        assert!("snap_kv".parse::<ScorerKind>().is_err());
    }
}
