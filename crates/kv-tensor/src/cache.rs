//! The single attention patch point: the model talks to each layer's cache only through
//! [`LayerCache`]; [`FullCache`] is the uncompressed reference.
use crate::KvBackend;
use crate::{
    AxisError, Bytes, CompressedLayer, DensePrecision, Footprint, KvError, ObservationCtx,
    attention_padded, attention_with_mass, attention_with_peak,
};
use burn::tensor::{Bool, Tensor};

/// One layer's KV cache as the model sees it. Keys arrive after RoPE.
///
/// GQA is the cache's business: `attend` takes all query heads. The default `attend` decodes
/// the cache and runs [`attention`]; a backend-specific cache may override it with a fused
/// kernel (or score keys in a reduced space).
///
/// Caches are `Send` so that a harness can evaluate several compressed states on different
/// threads (burn tensors are shared copy-on-write and thread-safe).
pub trait LayerCache<B: KvBackend>: Send {
    /// Appends new tokens. A compressing cache may compress older tokens here (a residual
    /// window that fills up), hence the axis error.
    ///
    /// # Shapes
    /// `k`, `v`: `[b, kv_heads, t, d]`
    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), AxisError>;

    /// Everything cached, decoded to dense `[b, kv_heads, stored, d]` keys and values.
    fn keys_values(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError>;

    /// Attention of the newest `tq` tokens' queries over the cache (see [`attention`] for the
    /// causal convention).
    ///
    /// # Shapes
    /// `q`: `[b, q_heads, tq, d]` → `[b, q_heads, tq, d]`
    fn attend(&self, q: Tensor<B, 4>) -> Result<Tensor<B, 4>, KvError> {
        let (k, v) = self.keys_values()?;
        attention_padded(q, k, v, self.padding())
    }

    /// [`attend`](Self::attend) that also returns the attention mass every held key received
    /// from these queries (`[b, kv_heads, stored]`, summed over queries and grouped heads; see
    /// [`attention_with_mass`]). The prefill calls it when a scorer needs the mass (H2O), so the
    /// statistic comes from the same softmax as the output. A cache overriding `attend` with
    /// side effects meant for decoding need not repeat them here.
    fn attend_with_mass(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        let (k, v) = self.keys_values()?;
        attention_with_mass(q, k, v, self.padding())
    }

    /// [`attend`](Self::attend) that also returns the largest attention weight every held key
    /// received from these queries and their grouped heads (`[b, kv_heads, stored]`; see
    /// [`attention_with_peak`]): KVzip's reconstruction pass reads it from a fork of the
    /// prefilled cache. The default decodes the cache; the full cache reads its stored rows.
    fn attend_with_peak(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        let (k, v) = self.keys_values()?;
        attention_with_peak(q, k, v, self.padding())
    }

    /// Which rows of [`keys_values`](Self::keys_values) are padding rather than tokens
    /// (`[b, kv_heads, stored]`, true = padding): caches holding ragged head-wise segments
    /// decode them padded. `None` (the default) when every row is a token.
    fn padding(&self) -> Option<Tensor<B, 3, Bool>> {
        None
    }

    /// Called once per layer when the prompt has been prefilled: the moment question-agnostic
    /// compression happens. The context carries what scorers observed during prefill.
    fn finish_prefill(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        let _ = ctx;
        Ok(())
    }

    /// Called after each prefill chunk when the prefill compresses as it goes
    /// (`PrefillOptions::compress_chunks` in `models`): a compressing cache brings what exceeds
    /// its budget down to it now, with what scorers have observed so far, so the prompt is never
    /// held dense as a whole. `finish_prefill` still follows the last chunk. The default keeps
    /// everything until then.
    fn after_prefill_chunk(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        let _ = ctx;
        Ok(())
    }

    /// Exact bytes held.
    fn footprint(&self) -> Footprint;

    /// Bytes really allocated for the cache's storage: the footprint, plus any spare capacity
    /// of growing buffers (the default: the footprint).
    fn resident(&self) -> Bytes {
        self.footprint().total()
    }

    /// Tokens appended so far (the logical sequence length; the next token's position).
    fn len(&self) -> usize;

    /// True before the first append.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens actually held per head (≤ `len` once tokens were evicted).
    fn stored(&self) -> usize;

    /// An independent copy of this cache as it is now, or `None` when the implementation
    /// cannot copy itself (the default). Lets a caller probe one compressed state twice (e.g.
    /// teacher forcing and free generation) without compressing again; burn tensors are shared
    /// copy-on-write, so a fork costs little until one side appends.
    fn fork(&self) -> Option<Box<dyn LayerCache<B>>> {
        None
    }
}

/// The uncompressed reference cache: every token, dense.
///
/// Stored in fp16 on host backends (burn-ndarray), like the compression ratio's reference and
/// llama.cpp's default cache; [`FullCache::f32`] keeps f32 for exact comparisons. Device
/// backends keep their float type. Decode steps attend on the host without copying the cache
/// (see [`CompressedLayer::attend`]).
#[derive(Debug, Clone, Default)]
pub struct FullCache<B: KvBackend> {
    layer: CompressedLayer<B>,
}

impl<B: KvBackend> FullCache<B> {
    /// An empty cache (fp16 on host backends).
    pub fn new() -> Self {
        Self {
            layer: CompressedLayer::new(),
        }
    }

    /// An empty cache that keeps f32 on host backends (opt-in: twice the bytes of the
    /// reference).
    pub fn f32() -> Self {
        Self {
            layer: CompressedLayer::with_precision(DensePrecision::F32),
        }
    }
}

impl<B: KvBackend> LayerCache<B> for FullCache<B> {
    fn fork(&self) -> Option<Box<dyn LayerCache<B>>> {
        Some(Box::new(self.clone()))
    }

    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), AxisError> {
        Ok(self.layer.push(k, v)?)
    }

    fn keys_values(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        self.layer.decode()
    }

    fn attend(&self, q: Tensor<B, 4>) -> Result<Tensor<B, 4>, KvError> {
        self.layer.attend(q)
    }

    fn attend_with_mass(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        self.layer.attend_with_mass(q)
    }

    fn attend_with_peak(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        self.layer.attend_with_peak(q)
    }

    fn footprint(&self) -> Footprint {
        self.layer.footprint()
    }

    fn resident(&self) -> Bytes {
        self.layer.resident()
    }

    fn len(&self) -> usize {
        self.layer.seen()
    }

    fn stored(&self) -> usize {
        self.layer.stored()
    }
}

/// A full cache that also keeps what the model observed at the end of prefill: the capture
/// pass of calibration and of the real-model measurements (post-RoPE K/V plus window queries).
#[derive(Debug, Clone, Default)]
pub struct RecordingCache<B: KvBackend> {
    inner: FullCache<B>,
    observed: Option<ObservationCtx<B>>,
}

impl<B: KvBackend> RecordingCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        Self {
            inner: FullCache::new(),
            observed: None,
        }
    }

    /// What `finish_prefill` received, if it was called.
    pub fn observed(&self) -> Option<&ObservationCtx<B>> {
        self.observed.as_ref()
    }
}

impl<B: KvBackend> LayerCache<B> for RecordingCache<B> {
    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), AxisError> {
        self.inner.append(k, v)
    }

    fn keys_values(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        self.inner.keys_values()
    }

    fn attend(&self, q: Tensor<B, 4>) -> Result<Tensor<B, 4>, KvError> {
        self.inner.attend(q)
    }

    fn attend_with_mass(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        self.inner.attend_with_mass(q)
    }

    fn attend_with_peak(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        self.inner.attend_with_peak(q)
    }

    /// A copy of the recorded cache without the observations (what a reconstruction pass or a
    /// probe reads).
    fn fork(&self) -> Option<Box<dyn LayerCache<B>>> {
        self.inner.fork()
    }

    fn finish_prefill(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        self.observed = Some(ctx.clone());
        Ok(())
    }

    fn footprint(&self) -> Footprint {
        self.inner.footprint()
    }

    fn len(&self) -> usize {
        self.inner.len()
    }

    fn stored(&self) -> usize {
        self.inner.stored()
    }
}

/// Boxed caches are caches: lets one run mix cache types (`Vec<Box<dyn LayerCache<B>>>`).
impl<B: KvBackend, C: LayerCache<B> + ?Sized> LayerCache<B> for Box<C> {
    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), AxisError> {
        (**self).append(k, v)
    }

    fn keys_values(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        (**self).keys_values()
    }

    fn attend(&self, q: Tensor<B, 4>) -> Result<Tensor<B, 4>, KvError> {
        (**self).attend(q)
    }

    fn attend_with_mass(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        (**self).attend_with_mass(q)
    }

    fn attend_with_peak(&self, q: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        (**self).attend_with_peak(q)
    }

    fn padding(&self) -> Option<Tensor<B, 3, Bool>> {
        (**self).padding()
    }

    fn finish_prefill(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        (**self).finish_prefill(ctx)
    }

    fn after_prefill_chunk(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        (**self).after_prefill_chunk(ctx)
    }

    fn footprint(&self) -> Footprint {
        (**self).footprint()
    }

    fn resident(&self) -> Bytes {
        (**self).resident()
    }

    fn len(&self) -> usize {
        (**self).len()
    }

    fn stored(&self) -> usize {
        (**self).stored()
    }

    fn fork(&self) -> Option<Box<dyn LayerCache<B>>> {
        (**self).fork()
    }
}
