//! One layer's recipe and its exact byte cost.
use crate::CustomStage;
use axis_evict::{EvictSetting, Selection};
use axis_lowrank::LowRankSetting;
use axis_quant::QuantSetting;
use kv_tensor::{Bits, Footprint, LayerShape, PlanStage, Side, compose_footprint, output_shape};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Default residual window (tokens) kept in fp16 by a layer whose expert quantizes or projects:
/// the window of an expert that does not set its own.
pub const RESIDUAL: usize = 64;

/// Tokens projected at a time by an expert that projects without quantizing (the flush
/// granularity of its residual window).
pub const PROJECT_GROUP: usize = 32;

/// A layer's expert: optional eviction, then its stages in order (projection, any stages of
/// registered axes, quantization), each optional.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expert {
    /// Token eviction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evict: Option<EvictSetting>,
    /// Low-rank projection of keys and/or values (needs calibrated bases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lowrank: Option<LowRankSetting>,
    /// Stages of axes outside the router (registered with [`crate::register_stage`]), applied
    /// in order after the projection and before quantization.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<CustomStage>,
    /// Quantization (of the coefficients when the side is projected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantSetting>,
    /// The newest tokens kept in fp16 while older ones go through the stages (default
    /// [`RESIDUAL`]). A small window is what makes 1/14 and below plannable on short prompts;
    /// 0 keeps only the partial quantization group in fp16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual: Option<usize>,
    /// Decode-time compression: while tokens are generated, the layer is evicted again with
    /// its scorer whenever it has grown by `interval` tokens past `tokens` (see
    /// [`DecodeBudget`]). Without it a layer grows by every generated token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<DecodeBudget>,
}

/// How a layer stays within its budget while tokens are generated: every `interval` generated
/// tokens, if the layer holds more than `tokens` tokens (per KV head), it is evicted back to
/// `tokens` by the expert's scorer and selection over everything it holds, observing the last
/// queries it attended with; the survivors go through the expert's stages again (quantization
/// composes, so re-quantized tokens carry a second rounding). Generated tokens count like
/// prompt tokens: the layer never holds more than `tokens + interval`, and
/// [`Expert::decode_peak`] prices that bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeBudget {
    /// Tokens held after each re-eviction.
    pub tokens: usize,
    /// Generated tokens between re-evictions (the cadence: when this much of the window has
    /// filled).
    #[serde(default = "default_interval")]
    pub interval: usize,
}

fn default_interval() -> usize {
    DecodeBudget::DEFAULT_INTERVAL
}

impl DecodeBudget {
    /// The default cadence: one projection group of generated tokens.
    pub const DEFAULT_INTERVAL: usize = PROJECT_GROUP;
}

/// Recent decoding queries the scorers observe at a re-eviction.
pub const DECODE_OBSERVE: usize = 32;

impl Expert {
    /// The identity expert (full cache).
    pub const FULL: Expert = Expert {
        evict: None,
        lowrank: None,
        stages: Vec::new(),
        quant: None,
        residual: None,
        decode: None,
    };

    /// Tokens of the residual window.
    pub fn residual(&self) -> usize {
        self.residual.unwrap_or(RESIDUAL)
    }

    /// The byte plans of the history stages, in the order they run.
    pub fn plan_stages(&self) -> Vec<&dyn PlanStage> {
        let mut v: Vec<&dyn PlanStage> = Vec::new();
        if let Some(l) = &self.lowrank {
            v.push(l);
        }
        v.extend(self.stages.iter().map(|s| s.setting() as &dyn PlanStage));
        if let Some(q) = &self.quant {
            v.push(q);
        }
        v
    }

    /// Checks what types alone cannot: ranks within the head dimension, each stage's own
    /// checks, quantization groups that divide the value width quantization receives, and
    /// head-wise (ragged) eviction only on its own (its ragged segments are not split into
    /// residual windows).
    pub fn validate(&self, head_dim: usize) -> Result<(), String> {
        if let Some(l) = self.lowrank {
            for (side, r) in [("k_rank", l.k_rank), ("v_rank", l.v_rank)] {
                if let Some(r) = r
                    && (r == 0 || r > head_dim)
                {
                    return Err(format!("{side} = {r} is not in 1..={head_dim}"));
                }
            }
        }
        for s in &self.stages {
            s.setting()
                .validate(head_dim)
                .map_err(|e| format!("stage `{}`: {e}", s.setting().axis()))?;
        }
        let shape = LayerShape {
            batch: 1,
            kv_heads: 1,
            tokens: 1,
            head_dim,
        };
        for side in [Side::Keys, Side::Values] {
            // A second projecting stage would see decoded vectors, not the first one's
            // coefficients, so its plan could not be priced from the first one's output. A
            // stage projects a side when it narrows it or holds a basis for it (a full-rank
            // projection keeps the width).
            let mut now = shape;
            let mut reshapes = 0;
            for st in self.plan_stages() {
                let p = st.plan_side(side, &now);
                reshapes += usize::from(p.output != now || p.fixed.basis.get() > 0);
                now = p.output;
            }
            if reshapes > 1 {
                return Err(format!(
                    "{reshapes} stages reshape the {side:?}; at most one may project a side"
                ));
            }
        }
        if let Some(q) = self.quant.filter(|q| !q.is_identity()) {
            let stages = self.plan_stages();
            let before = &stages[..stages.len() - 1];
            let w = output_shape(before, Side::Values, &shape).head_dim;
            if w != head_dim && !w.is_multiple_of(q.group.get()) {
                return Err(format!(
                    "values reach quantization {w} wide, not a multiple of the quantization group {} (values are grouped along channels)",
                    q.group.get()
                ));
            }
        }
        if let Some(d) = self.decode {
            self.validate_decode(d)?;
        }
        if let Some(e) = self.evict
            && matches!(e.selection, Selection::HeadWise { .. })
            && self.compresses_history()
        {
            return Err(
                "head-wise eviction cannot be combined with projection, quantization or other stages"
                    .into(),
            );
        }
        Ok(())
    }

    fn validate_decode(&self, d: DecodeBudget) -> Result<(), String> {
        let Some(e) = self.evict else {
            return Err(
                "decode-time compression needs an evicting expert (its scorer decides)".into(),
            );
        };
        if d.interval == 0 {
            return Err("decode interval must be at least 1 token".into());
        }
        if matches!(e.selection, Selection::HeadWise { .. }) {
            return Err(
                "head-wise (ragged) segments cannot be evicted again during decoding".into(),
            );
        }
        let needs = e.scorer.needs();
        if needs.prefill_only() {
            return Err(format!(
                "{} needs a statistic of the prefill (the reconstruction pass), which decoding \
                 does not produce",
                e.scorer.name(),
            ));
        }
        if d.tokens < e.sinks + e.window {
            return Err(format!(
                "decode tokens {} are fewer than the {} protected tokens (sinks + window)",
                d.tokens,
                e.sinks + e.window
            ));
        }
        Ok(())
    }

    /// An upper bound on the bytes the layer holds while generating after a `t`-token
    /// prefill: with a decode budget, the larger of the prefill's cache grown to `tokens`
    /// and the re-evicted `tokens`, each plus a full `interval` of new fp16 tokens; without
    /// one, growth is unbounded, so `None`.
    pub fn decode_peak(&self, shape: &LayerShape, t: usize) -> Option<Footprint> {
        let d = self.decode?;
        // `new` tokens landing on a layer that holds `held`, each priced at fp16 (an upper
        // bound: whole groups beyond the residual window are staged as they fill) and each with
        // its position.
        let grow = |mut f: Footprint, held: usize, new: usize| {
            let dense = 2 * shape.batch * shape.kv_heads * new * shape.head_dim * 2;
            f.dense += kv_tensor::Bytes(dense as u64);
            f.indices = kv_tensor::Bytes((shape.batch * shape.kv_heads * (held + new) * 4) as u64);
            f
        };
        // Until it first exceeds `tokens`, the layer grows from what the prefill kept, then by
        // up to an interval more.
        let kept = self.kept(t);
        let growth = d.tokens.saturating_sub(kept);
        let after_prefill = grow(self.footprint(shape, t), kept, growth + d.interval);
        // A re-evicted layer holds `tokens` tokens split as after a prefill of that many.
        let plain = Expert {
            evict: None,
            decode: None,
            ..self.clone()
        };
        let steady = grow(plain.footprint(shape, d.tokens), d.tokens, d.interval);
        Some(if after_prefill.total() >= steady.total() {
            after_prefill
        } else {
            steady
        })
    }

    /// Whether old tokens are projected, quantized or otherwise staged (then a residual window
    /// stays dense).
    pub fn compresses_history(&self) -> bool {
        self.quant.is_some_and(|q| !q.is_identity())
            || self
                .lowrank
                .is_some_and(|l| l.k_rank.is_some() || l.v_rank.is_some())
            || !self.stages.is_empty()
    }

    /// Tokens flushed from the residual window at a time.
    pub fn group(&self) -> usize {
        self.quant
            .filter(|q| !q.is_identity())
            .map_or(PROJECT_GROUP, |q| q.group.get())
    }

    /// Whether this expert can keep its layer within a decode budget: it evicts, with a
    /// scorer that runs on what decoding observes and a selection that can be redone
    /// (head-wise ragged segments are final).
    pub fn compresses_while_decoding(&self) -> bool {
        self.evict.is_some_and(|e| {
            !e.scorer.needs().prefill_only() && !matches!(e.selection, Selection::HeadWise { .. })
        })
    }

    /// Tokens kept of `t` prompt tokens.
    pub fn kept(&self, t: usize) -> usize {
        self.evict.map_or(t, |e| e.kept(t))
    }

    /// Kept tokens split into (compressed by the stages, dense residual) at the end of a
    /// `t`-token prefill.
    pub fn split(&self, t: usize) -> (usize, usize) {
        let n = self.kept(t);
        if self.compresses_history() {
            let g = self.group();
            let quantized = n.saturating_sub(self.residual()) / g * g;
            (quantized, n - quantized)
        } else {
            (0, n)
        }
    }

    /// Exact bytes of one layer after a `t`-token prefill of `shape` (tokens ignored): what
    /// [`crate::RoutedCache`] allocates, so solvers can plan without compressing. The staged
    /// tokens cost what the stages' own plans compose to; the residual window is fp16.
    pub fn footprint(&self, shape: &LayerShape, t: usize) -> Footprint {
        let (staged, dense) = self.split(t);
        const HALF: usize = 2;
        let at = |n: usize| LayerShape {
            tokens: n,
            ..*shape
        };
        let mut f = Footprint::dense(kv_tensor::Bytes((2 * at(dense).numel() * HALF) as u64));
        if staged > 0 {
            f += compose_footprint(&self.plan_stages(), &at(staged));
        }
        if self.kept(t) < t {
            // Kept positions (i32) for every kept token and head.
            f.indices = kv_tensor::Bytes((shape.batch * shape.kv_heads * self.kept(t) * 4) as u64);
        }
        f
    }
}

impl fmt::Display for Expert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.evict {
            Some(e) => write!(f, "keep {:.2} ({:?})", e.keep.get(), e.scorer)?,
            None => write!(f, "keep 1.00")?,
        }
        if let Some(l) = self.lowrank {
            let r = |x: Option<usize>| x.map_or("-".to_string(), |r| r.to_string());
            write!(f, " rank K{}V{}", r(l.k_rank), r(l.v_rank))?;
        }
        let (k, v) = self
            .quant
            .map_or((Bits::Full, Bits::Full), |q| (q.k_bits, q.v_bits));
        for s in &self.stages {
            write!(f, " {}", s.setting().label())?;
        }
        write!(f, " K{k}V{v}")?;
        if let Some(w) = self.residual {
            write!(f, " window {w}")?;
        }
        match self.decode {
            Some(d) => write!(f, " decode ≤{}+{}", d.tokens, d.interval),
            None => Ok(()),
        }
    }
}
