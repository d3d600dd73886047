//! A quantized layer cache with a full-precision residual window (KIVI's decoding scheme).
use crate::{Kivi, QuantSetting};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use kv_tensor::{
    AxisError, CompressedLayer, CompressionAxis, Footprint, KvError, LayerCache, ObservationCtx,
};

/// KIVI as a cache: the newest `residual` tokens stay in full precision; older tokens are
/// quantized one whole group at a time.
///
/// - During prefill nothing is quantized (attention over the prompt is exact).
/// - At the end of prefill, everything older than the window is quantized in whole groups;
///   the tail (between `residual` and `residual + group − 1` tokens) stays dense.
/// - During decode each new token lands in the window; whenever the window holds
///   `residual + group` tokens, its oldest `group` tokens are quantized and appended as a new
///   segment. History is never re-quantized.
#[derive(Debug, Clone)]
pub struct QuantizedCache<B: Backend> {
    layer: CompressedLayer<B>,
    setting: QuantSetting,
    residual: usize,
    prefilled: bool,
}

impl<B: Backend> QuantizedCache<B> {
    /// KIVI's default residual window.
    pub const DEFAULT_RESIDUAL: usize = 64;

    /// An empty cache.
    pub fn new(setting: QuantSetting, residual: usize) -> Self {
        Self {
            layer: CompressedLayer::new(),
            setting,
            residual,
            prefilled: false,
        }
    }

    /// The underlying storage.
    pub fn layer(&self) -> &CompressedLayer<B> {
        &self.layer
    }

    fn flush(&mut self) -> Result<(), AxisError> {
        if self.setting.is_identity() {
            return Ok(());
        }
        if let Some(seg) = self
            .layer
            .take_overflow(self.residual, self.setting.group.get())
        {
            let seg = CompressionAxis::<B>::compress(
                &Kivi,
                seg,
                &self.setting,
                &ObservationCtx::bare(0),
            )?;
            self.layer.push_segment(seg)?;
        }
        Ok(())
    }
}

impl<B: Backend> LayerCache<B> for QuantizedCache<B> {
    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), AxisError> {
        self.layer.push(k, v)?;
        if self.prefilled { self.flush() } else { Ok(()) }
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

    fn resident(&self) -> kv_tensor::Bytes {
        self.layer.resident()
    }

    /// Whole groups beyond the residual window are quantized as soon as they exist.
    fn after_prefill_chunk(&mut self, _ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        self.flush()
    }

    fn finish_prefill(&mut self, _ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        self.prefilled = true;
        self.flush()
    }

    fn footprint(&self) -> Footprint {
        self.layer.footprint()
    }

    fn len(&self) -> usize {
        self.layer.seen()
    }

    fn stored(&self) -> usize {
        self.layer.stored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn_ndarray::NdArray;
    use kv_tensor::{Bits, LayerShape, Segment};

    type B = NdArray<f32>;

    fn rand(t: usize) -> Tensor<B, 4> {
        Tensor::random(
            [1, 3, t, 64],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        )
    }

    #[test]
    fn prefill_quantizes_whole_groups_and_keeps_the_tail() {
        let s = QuantSetting::new(
            Bits::try_from(2).expect("bits"),
            Bits::try_from(4).expect("bits"),
        );
        let mut c = QuantizedCache::<B>::new(s, 64);
        c.append(rand(200), rand(200)).expect("append");
        assert_eq!(
            c.layer().segment_lens().len(),
            0,
            "nothing quantized during prefill"
        );
        c.finish_prefill(&ObservationCtx::bare(0)).expect("flush");
        // 200 − 64 = 136 → 128 quantized (4 groups), 72 stay dense.
        assert_eq!(c.layer().segment_lens()[0], 128);
        assert_eq!(c.layer().window_len(), 72);
        // Decode: 23 more tokens keep the window below 64 + 32 = 96; the 24th flushes 32.
        for _ in 0..23 {
            c.append(rand(1), rand(1)).expect("append");
        }
        assert_eq!(c.layer().segment_lens().len(), 1);
        c.append(rand(1), rand(1)).expect("append");
        assert_eq!(c.layer().segment_lens().len(), 2);
        assert_eq!(
            c.layer().segment_lens()[1],
            32,
            "only the new group is quantized"
        );
        assert_eq!(c.layer().window_len(), 64);
        assert_eq!(c.len(), 224);
        assert_eq!(c.stored(), 224);

        // Footprint = predicted for the quantized parts + the dense window, exactly.
        let kivi = Kivi;
        let predicted = CompressionAxis::<B>::footprint(
            &kivi,
            &LayerShape {
                batch: 1,
                kv_heads: 3,
                tokens: 128,
                head_dim: 64,
            },
            &s,
        ) + CompressionAxis::<B>::footprint(
            &kivi,
            &LayerShape {
                batch: 1,
                kv_heads: 3,
                tokens: 32,
                head_dim: 64,
            },
            &s,
        );
        // The residual window stores fp16 on the host.
        let window = (2 * 64 * 3 * 64 * 2) as u64;
        assert_eq!(
            c.footprint().total().get(),
            predicted.total().get() + window
        );
        // 2-bit keys + 4-bit values + fp16 scales and mins at g = 32 (1 bit per element per side).
        let n = (160 * 3 * 64) as u64;
        assert_eq!(predicted.codes.get(), n * 2 / 8 + n * 4 / 8);
        assert_eq!(predicted.scales.get(), 2 * n / 8);
        let (k, _) = c.keys_values().expect("decode");
        assert_eq!(k.dims(), [1, 3, 224, 64]);
    }

    #[test]
    fn identity_setting_never_quantizes() {
        let mut c = QuantizedCache::<B>::new(QuantSetting::new(Bits::Full, Bits::Full), 0);
        c.append(rand(100), rand(100)).expect("append");
        c.finish_prefill(&ObservationCtx::bare(0)).expect("flush");
        assert!(c.layer().segment_lens().is_empty());
        let _ = Segment::<B>::dense(rand(1), rand(1), 0).expect("dense");
    }
}
