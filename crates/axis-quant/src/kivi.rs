//! KIVI asymmetric integer quantization (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit
//! Quantization for KV Cache", 2024): keys per-channel, values per-token.
//!
//! Each group stores `min` rounded *down* and `scale` rounded *up* to fp16, so the stored range
//! `[min, min + (2^b − 1)·scale]` covers every value of the group and each value is within
//! half a stored scale step of its reconstruction.
use crate::{QuantError, QuantSetting};
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use kv_tensor::{
    AxisError, Bits, CodeBits, CompressionAxis, Encoded, Footprint, Fp16Tensor, GroupAxis,
    LayerShape, ObservationCtx, PackedCodes, PlanStage, Quantized, Segment, Side, SidePlan,
};

/// Quantizes `x` `[b, h, t, d]` to `bits` with groups of `group` along `along`.
pub fn quantize<B: KvBackend>(
    x: Tensor<B, 4>,
    bits: CodeBits,
    group: usize,
    along: GroupAxis,
    what: &'static str,
) -> Result<Quantized<B>, QuantError> {
    let [b, h, t, d] = x.dims();
    let len = match along {
        GroupAxis::Tokens => t,
        GroupAxis::Channels => d,
    };
    if group == 0 || len % group != 0 {
        return Err(QuantError::Ragged { what, len, group });
    }
    let device = x.device();
    match kv_tensor::host_copy(x) {
        Ok(v) => crate::kivi_host::quantize(&v, [b, h, t, d], bits, group, along, what, &device),
        Err(x) => quantize_ops(x, bits, group, along, what),
    }
}

/// [`quantize`] as tensor ops, for backends whose tensors are not in host memory.
pub(crate) fn quantize_ops<B: KvBackend>(
    x: Tensor<B, 4>,
    bits: CodeBits,
    group: usize,
    along: GroupAxis,
    what: &'static str,
) -> Result<Quantized<B>, QuantError> {
    let [b, h, t, d] = x.dims();
    let (shape5, reduce) = match along {
        GroupAxis::Tokens => ([b, h, t / group, group, d], 3),
        GroupAxis::Channels => ([b, h, t, d / group, group], 4),
    };
    let finite = x
        .clone()
        .is_finite()
        .all()
        .into_data()
        .iter::<bool>()
        .next()
        .unwrap_or(false);
    if !finite {
        return Err(QuantError::NonFinite { what });
    }
    let max_abs: f32 = x
        .clone()
        .abs()
        .max()
        .into_data()
        .iter::<f32>()
        .next()
        .unwrap_or(0.0);
    if max_abs > crate::kivi_host::MAX_ABS {
        return Err(QuantError::OutOfRange { what, max_abs });
    }
    let levels = bits.max_code() as f32;
    let xg = x.reshape(shape5);
    let mn = xg.clone().min_dim(reduce);
    let mx = xg.clone().max_dim(reduce);
    let mins = Fp16Tensor::encode_floor(mn);
    let min16 = mins.decode();
    let scales = Fp16Tensor::encode_ceil((mx - min16.clone()) / levels);
    let scale16 = scales.decode();
    // A zero scale means a constant group stored exactly by its minimum: code 0.
    let zero = scale16.clone().equal_elem(0.0);
    let safe = scale16.mask_fill(zero, 1.0);
    let codes = ((xg - min16) / safe).round().clamp(0.0, levels).int();
    let [g0, g1, g2, g3, g4] = shape5;
    let codes = codes.reshape([g0, g1, g2 * g3, g4]).reshape([b, h, t, d]);
    let sdims = match along {
        GroupAxis::Tokens => [b, h, t / group, d],
        GroupAxis::Channels => [b, h, t, d / group],
    };
    Ok(Quantized::new(
        PackedCodes::pack(codes, bits),
        scales.reshape(sdims),
        mins.reshape(sdims),
        group,
        along,
    )?)
}

/// The KIVI axis: quantizes a segment's keys per-channel and values per-token.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kivi;

impl Kivi {
    fn side<B: KvBackend>(
        e: Encoded<B>,
        bits: Bits,
        group: usize,
        along: GroupAxis,
        what: &'static str,
    ) -> Result<Encoded<B>, QuantError> {
        let Bits::Code(cb) = bits else { return Ok(e) };
        Ok(match e {
            Encoded::Dense(x) => Encoded::Quantized(quantize(x, cb, group, along, what)?),
            // Low-rank coefficients are quantized in place; the basis stays.
            Encoded::Projected { coeffs, basis } => Encoded::Projected {
                coeffs: Box::new(Self::side(*coeffs, bits, group, along, what)?),
                basis,
            },
            Encoded::Half(h) => Encoded::Quantized(quantize(h.decode(), cb, group, along, what)?),
            Encoded::Quantized(q) => Encoded::Quantized(q),
            // Head-wise ragged segments: each head on its own (key groups must then divide
            // every head's length).
            Encoded::Ragged(heads) => Encoded::Ragged(
                heads
                    .into_iter()
                    .map(|h| Self::side(h, bits, group, along, what))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// Predicted bytes of one side of `[b, h, t, d]` values at `bits`.
    pub fn side_footprint(
        shape: &LayerShape,
        bits: Bits,
        group: usize,
        along: GroupAxis,
        float_bytes: usize,
    ) -> Footprint {
        let n = shape.numel();
        match bits {
            Bits::Full => Footprint::dense(kv_tensor::Bytes((n * float_bytes) as u64)),
            Bits::Code(cb) => {
                // One fp16 scale and one fp16 minimum per group, whichever axis groups run along.
                let _ = along;
                let groups = n / group;
                Footprint {
                    codes: cb.packed_bytes(n),
                    scales: kv_tensor::Bytes((groups * 2 * 2) as u64),
                    ..Footprint::default()
                }
            }
        }
    }
}

/// Quantization stores each side: keys grouped along tokens (per channel), values along
/// channels (per token); a 16-bit side is stored in fp16.
impl PlanStage for QuantSetting {
    fn plan_side(&self, side: Side, input: &LayerShape) -> SidePlan {
        let (bits, along) = match side {
            Side::Keys => (self.k_bits, GroupAxis::Tokens),
            Side::Values => (self.v_bits, GroupAxis::Channels),
        };
        SidePlan {
            stored: Some(Kivi::side_footprint(
                input,
                bits,
                self.group.get(),
                along,
                2,
            )),
            ..SidePlan::unchanged(input)
        }
    }
}

impl<B: KvBackend> CompressionAxis<B> for Kivi {
    type Setting = QuantSetting;

    fn compress(
        &self,
        segment: Segment<B>,
        s: &QuantSetting,
        _ctx: &ObservationCtx<B>,
    ) -> Result<Segment<B>, AxisError> {
        let g = s.group.get();
        Ok(Segment {
            positions: segment.positions,
            k: Self::side(segment.k, s.k_bits, g, GroupAxis::Tokens, "keys")?,
            v: Self::side(segment.v, s.v_bits, g, GroupAxis::Channels, "values")?,
        })
    }

    fn footprint(&self, shape: &LayerShape, s: &QuantSetting) -> Footprint {
        let fb = std::mem::size_of::<B::FloatElem>();
        let g = s.group.get();
        Self::side_footprint(shape, s.k_bits, g, GroupAxis::Tokens, fb)
            + Self::side_footprint(shape, s.v_bits, g, GroupAxis::Channels, fb)
    }
}
