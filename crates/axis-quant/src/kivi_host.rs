//! KIVI quantization on host vectors, for backends whose tensors live in host memory.
//!
//! The tensor-op version ([`crate::quantize`] on other backends) takes a dozen full passes, each
//! allocating a tensor, plus the packing ops: about 30 ms for 4k tokens × 3 heads × 64
//! channels, which made quantizing a prefilled cache cost as much as probing it. Here it is one
//! pass for the statistics and one for the codes, with the same rounding, bit for bit: minimums
//! rounded down and scales rounded up to binary16, codes rounded half to even and clamped.
use crate::QuantError;
use kv_tensor::{
    CodeBits, Fp16Tensor, GroupAxis, KvBackend, PackedCodes, Quantized, f16_ceil_bits,
    f16_floor_bits, f16_value,
};

/// The largest magnitude the binary16 scales and minimums can cover with margin.
pub(crate) const MAX_ABS: f32 = 65000.0;

/// Quantizes `x` (row-major `dims` = `[b, h, t, d]`, f32 on the host); the caller has checked
/// that `group` divides the grouped axis.
pub(crate) fn quantize<B: KvBackend>(
    x: &[f32],
    dims: [usize; 4],
    bits: CodeBits,
    group: usize,
    along: GroupAxis,
    what: &'static str,
    device: &B::Device,
) -> Result<Quantized<B>, QuantError> {
    let mut max_abs = 0f32;
    for &v in x {
        if !v.is_finite() {
            return Err(QuantError::NonFinite { what });
        }
        max_abs = max_abs.max(v.abs());
    }
    if max_abs > MAX_ABS {
        return Err(QuantError::OutOfRange { what, max_abs });
    }
    let [b, h, t, d] = dims;
    let levels = bits.max_code() as f32;
    let mut codes = vec![0u8; x.len()];
    let mut st = Stats::new(x.len() / group);
    let sdims = match along {
        GroupAxis::Tokens => {
            // Blocks of `group` rows, one statistic per channel.
            let (mut lo, mut hi) = (vec![0f32; d], vec![0f32; d]);
            for (bi, block) in x.chunks_exact(group * d).enumerate() {
                lo.fill(f32::INFINITY);
                hi.fill(f32::NEG_INFINITY);
                for row in block.chunks_exact(d) {
                    for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                        *l = l.min(v);
                        *h = h.max(v);
                    }
                }
                for c in 0..d {
                    st.set(bi * d + c, lo[c], hi[c], levels);
                }
                let (m, s) = (&st.min[bi * d..][..d], &st.step[bi * d..][..d]);
                let out = &mut codes[bi * group * d..(bi + 1) * group * d];
                for (row, o) in block.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                    for (((o, &v), &m), &s) in o.iter_mut().zip(row).zip(m).zip(s) {
                        *o = code(v, m, s, levels);
                    }
                }
            }
            [b, h, t / group, d]
        }
        GroupAxis::Channels => {
            // Runs of `group` channels, one statistic per run.
            let runs = x.chunks_exact(group).zip(codes.chunks_exact_mut(group));
            for (gi, (run, out)) in runs.enumerate() {
                let lo = run.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                let hi = run.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                st.set(gi, lo, hi, levels);
                let (m, s) = (st.min[gi], st.step[gi]);
                for (o, &v) in out.iter_mut().zip(run) {
                    *o = code(v, m, s, levels);
                }
            }
            [b, h, t, d / group]
        }
    };
    let codes = PackedCodes::from_codes(&codes, bits, dims.to_vec(), device)?;
    Ok(Quantized::new(
        codes,
        Fp16Tensor::from_bits(&st.scales, sdims, device)?,
        Fp16Tensor::from_bits(&st.mins, sdims, device)?,
        group,
        along,
    )?)
}

/// Per-group statistics: the stored binary16 bits, and the decoded minimum and code step
/// (the scale, or 1 where the scale is 0: a constant group is stored by its minimum alone).
struct Stats {
    scales: Vec<u16>,
    mins: Vec<u16>,
    min: Vec<f32>,
    step: Vec<f32>,
}

impl Stats {
    fn new(n: usize) -> Self {
        Self {
            scales: vec![0; n],
            mins: vec![0; n],
            min: vec![0.0; n],
            step: vec![1.0; n],
        }
    }

    /// Group `slot` of values in `lo..=hi`.
    fn set(&mut self, slot: usize, lo: f32, hi: f32, levels: f32) {
        let mb = f16_floor_bits(lo);
        let m = f16_value(mb);
        let sb = f16_ceil_bits((hi - m) / levels);
        let sc = f16_value(sb);
        self.mins[slot] = mb;
        self.scales[slot] = sb;
        self.min[slot] = m;
        self.step[slot] = if sc == 0.0 { 1.0 } else { sc };
    }
}

/// `round((v − m) / s)` (half to even, as the tensor path's `round`), clamped to the codes.
/// Clamping first gives the same code, and rounding by adding and subtracting 1.5·2²³ (exact
/// for the clamped range) keeps the loops free of `rintf` calls, so they vectorise.
#[inline(always)]
fn code(v: f32, m: f32, s: f32, levels: f32) -> u8 {
    const MAGIC: f32 = 12_582_912.0;
    let y = ((v - m) / s).clamp(0.0, levels);
    ((y + MAGIC) - MAGIC) as u8
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};
    use burn_ndarray::NdArray;
    use kv_tensor::{CodeBits, GroupAxis, Quantized};
    use proptest::prelude::*;

    type B = NdArray<f32>;

    fn ints(t: &Tensor<B, 1, burn::tensor::Int>) -> Vec<i64> {
        t.clone()
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("ints")
    }

    /// Words, scale bits and minimum bits of a quantized tensor.
    fn parts(q: &Quantized<B>) -> [Vec<i64>; 3] {
        let flat = |t: &kv_tensor::Fp16Tensor<B, 4>| {
            let n: usize = t.dims().iter().product();
            ints(&t.bits().clone().reshape([n]))
        };
        [ints(q.codes().words()), flat(q.scales()), flat(q.mins())]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The host quantizer stores what the tensor ops store, bit for bit: codes, scales and
        /// minimums, for every width and both group axes (constant groups included).
        #[test]
        fn host_path_equals_tensor_ops(
            bits in prop::sample::select(CodeBits::ALL.to_vec()),
            tokens in prop::sample::select(vec![8usize, 16, 32]),
            group in prop::sample::select(vec![4usize, 8]),
            along in prop::sample::select(vec![GroupAxis::Tokens, GroupAxis::Channels]),
            spread in prop::sample::select(vec![0.0f32, 1e-3, 1.0, 300.0]),
            seed in any::<u64>(),
        ) {
            let dims = [1, 2, tokens, 16];
            let n: usize = dims.iter().product();
            let mut s = seed | 1;
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread - 0.25
                })
                .collect();
            let x = Tensor::<B, 4>::from_data(TensorData::new(v.clone(), dims), &Default::default());
            let ops = crate::kivi::quantize_ops(x, bits, group, along, "t").expect("ops");
            let host = super::quantize::<B>(&v, dims, bits, group, along, "t", &Default::default())
                .expect("host");
            prop_assert_eq!(parts(&host), parts(&ops));
            prop_assert_eq!(host.codes().bytes(), ops.codes().bytes());
            prop_assert_eq!(host.scales().bytes(), ops.scales().bytes());
        }
    }

    /// Bad input is refused as by the tensor path.
    #[test]
    fn refuses_non_finite_and_out_of_range_values() {
        let q = |v: Vec<f32>| {
            super::quantize::<B>(
                &v,
                [1, 1, 4, 4],
                CodeBits::B4,
                4,
                GroupAxis::Tokens,
                "t",
                &Default::default(),
            )
        };
        let mut v = vec![0.5f32; 16];
        v[3] = f32::NAN;
        assert!(matches!(q(v), Err(crate::QuantError::NonFinite { .. })));
        let mut v = vec![0.5f32; 16];
        v[7] = -70000.0;
        assert!(matches!(q(v), Err(crate::QuantError::OutOfRange { .. })));
    }
}
