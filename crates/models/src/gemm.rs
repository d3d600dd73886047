//! The host product for many input rows (prefill chunks, a teacher-forced answer, a prose
//! continuation): `Y = X · Wᵀ`, with `W` read from its host copy (the model file's blocks, or
//! f32 rows).
//!
//! Why not burn's matmul: burn-ndarray multiplies through `matrixmultiply`, which wants f32
//! weights and packs the whole right-hand matrix on every call, so a ten-row forward pays for a
//! full copy of the weights. Here each task dequantises a few weight
//! rows into a k-major panel once, in cache, and reuses it for every input row through
//! `kv_tensor::host_gemm`'s register tiles (12 × 32 outputs on AVX-512, 6 × 16 on AVX2). The
//! input rows are packed k-major once per product.
use kv_tensor::host_gemm::{self, Packed, TileOp};
use pulp::Simd;
use rayon::prelude::*;

/// A weight matrix the product can read: `rows` outputs of `inp` values each.
pub(crate) trait WeightRows: Sync {
    /// Values per row (the input width).
    fn inp(&self) -> usize;
    /// Number of rows (outputs).
    fn rows(&self) -> usize;
    /// Row `o` as f32 into `out` (`inp` values). Implementations are `#[inline(always)]`: a
    /// call compiled outside the product's target-feature function dequantised with scalar
    /// code, a quarter of a small forward's time.
    fn row_into(&self, o: usize, out: &mut [f32]);
}

/// f32 rows, `[rows][inp]`.
pub(crate) struct F32Rows<'a> {
    pub(crate) rows: &'a [f32],
    pub(crate) inp: usize,
}

impl WeightRows for F32Rows<'_> {
    fn inp(&self) -> usize {
        self.inp
    }
    fn rows(&self) -> usize {
        self.rows.len() / self.inp.max(1)
    }
    #[inline(always)]
    fn row_into(&self, o: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.rows[o * self.inp..(o + 1) * self.inp]);
    }
}

impl WeightRows for crate::quant_rows::QuantRows {
    fn inp(&self) -> usize {
        self.inp()
    }
    fn rows(&self) -> usize {
        self.rows()
    }
    #[inline(always)]
    fn row_into(&self, o: usize, out: &mut [f32]) {
        self.row_into(o, out);
    }
}

/// Bytes of one task's weight panel: small enough to stay in a core's L2 beside the input
/// rows it is multiplied with.
const PANEL_BYTES: usize = 1 << 18;

/// `X · Wᵀ` for the `t` rows of `x` (`[t][inp]`): `[t][rows]`, row-major.
pub(crate) fn gemm<W: WeightRows + ?Sized>(w: &W, x: &[f32], t: usize) -> Vec<f32> {
    host_gemm::dispatch(Product { w, x, t })
}

/// [`gemm`] with pulp's scalar "vectors" (the reference the vector tiles are tested against).
#[cfg(test)]
pub(crate) fn plain<W: WeightRows + ?Sized>(w: &W, x: &[f32], t: usize) -> Vec<f32> {
    host_gemm::plain(Product { w, x, t })
}

/// The whole product: weight-row groups split over rayon tasks.
struct Product<'a, W: ?Sized> {
    w: &'a W,
    x: &'a [f32],
    t: usize,
}

impl<W: WeightRows + ?Sized> TileOp for Product<'_, W> {
    type Output = Vec<f32>;

    #[inline(always)]
    fn run<S: Simd, const MR: usize, const NV: usize>(self, simd: S) -> Vec<f32> {
        let Product { w, x, t } = self;
        let (inp, out) = (w.inp(), w.rows());
        let nr = NV * S::F32_LANES;
        if t == 0 || out == 0 || inp == 0 {
            return vec![0f32; t * out];
        }
        let groups = out.div_ceil(nr);
        let by_cache = (PANEL_BYTES / (inp * nr * 4)).max(1);
        let by_share = groups.div_ceil(4 * rayon::current_num_threads()).max(1);
        let per_task = by_cache.min(by_share);
        let packed = Packed::new(x, t, inp, inp, MR);
        let starts: Vec<usize> = (0..groups).step_by(per_task).collect();
        let parts: Vec<Vec<f32>> = starts
            .par_iter()
            .map(|&g0| {
                simd.vectorize(Task::<W, MR, NV> {
                    w,
                    packed: &packed,
                    t,
                    groups: g0..(g0 + per_task).min(groups),
                })
            })
            .collect();
        let mut y = vec![0f32; t * out];
        for (&g0, part) in starts.iter().zip(&parts) {
            let c0 = g0 * nr;
            let width = part.len() / t;
            let keep = width.min(out - c0);
            for (yr, pr) in y.chunks_exact_mut(out).zip(part.chunks_exact(width)) {
                yr[c0..c0 + keep].copy_from_slice(&pr[..keep]);
            }
        }
        y
    }
}

/// One task: the output columns of weight-row groups `groups` (each `NV` vectors wide) for
/// every input row; returns them `[t][groups.len() · nr]`.
struct Task<'a, W: ?Sized, const MR: usize, const NV: usize> {
    w: &'a W,
    packed: &'a Packed,
    t: usize,
    groups: std::ops::Range<usize>,
}

impl<W: WeightRows + ?Sized, const MR: usize, const NV: usize> pulp::WithSimd
    for Task<'_, W, MR, NV>
{
    type Output = Vec<f32>;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Vec<f32> {
        let Task {
            w,
            packed,
            t,
            groups,
        } = self;
        let (inp, out) = (w.inp(), w.rows());
        let nr = NV * S::F32_LANES;
        let width = groups.len() * nr;
        let mut ys = vec![0f32; t * width];
        let mut panel = vec![0f32; inp * nr];
        let mut rows = vec![0f32; nr * inp];
        for (gi, g) in groups.enumerate() {
            for (j, row) in rows.chunks_exact_mut(inp).enumerate() {
                let o = g * nr + j;
                if o < out {
                    w.row_into(o, row);
                } else {
                    row.fill(0.0);
                }
            }
            host_gemm::transpose(&rows, inp, &mut panel, nr);
            host_gemm::panel_product::<S, MR, NV>(simd, packed, &panel, &mut ys, width, gi * nr);
        }
        ys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgmlType;
    use crate::quant_rows::QuantRows;
    use proptest::prelude::*;

    /// `X · Wᵀ` in f64, and `Σ |w·x|` per output (the scale of the rounding error).
    fn reference(w: &[f32], x: &[f32], inp: usize) -> (Vec<f32>, Vec<f32>) {
        let out = w.len() / inp;
        let mut y = Vec::new();
        let mut mag = Vec::new();
        for xr in x.chunks_exact(inp) {
            for wr in w.chunks_exact(inp) {
                let terms = xr
                    .iter()
                    .zip(wr)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b));
                y.push(terms.clone().sum::<f64>() as f32);
                mag.push(terms.map(f64::abs).sum::<f64>() as f32);
            }
        }
        debug_assert_eq!(y.len(), x.len() / inp * out);
        (y, mag)
    }

    fn check(got: &[f32], want: &[f32], mag: &[f32]) -> Result<(), TestCaseError> {
        prop_assert_eq!(got.len(), want.len());
        for (k, ((g, e), m)) in got.iter().zip(want).zip(mag).enumerate() {
            prop_assert!((g - e).abs() <= 1e-5 * m + 1e-5, "element {k}: {g} vs {e}");
        }
        Ok(())
    }

    proptest! {
        /// Every version (the CPU's widest, and the plain one) equals the f64 product, for
        /// row counts on every side of the tile heights and column counts that leave partial
        /// panels and partial tasks.
        #[test]
        fn gemm_matches_the_plain_product(
            t in 1usize..30,
            inp in 1usize..70,
            out in 1usize..140,
            seed in 0u32..1000,
        ) {
            let val = |i: usize| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0;
            let w: Vec<f32> = (0..inp * out).map(val).collect();
            let x: Vec<f32> = (0..t * inp).map(|i| val(i + 7919)).collect();
            let (want, mag) = reference(&w, &x, inp);
            let rows = F32Rows { rows: &w, inp };
            check(&gemm(&rows, &x, t), &want, &mag)?;
            check(&plain(&rows, &x, t), &want, &mag)?;
        }

        /// Read from ggml blocks, the product is that of the dequantised weights.
        #[test]
        fn gemm_reads_blocks_as_their_weights(
            ty in prop::sample::select(vec![GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q6K]),
            t in 1usize..20,
            out in 1usize..40,
            seed in proptest::collection::vec(any::<u8>(), 1..40),
        ) {
            let inp = 256;
            let bytes = crate::quant_rows::tests::blocks(ty, inp, out, &seed);
            let q = QuantRows::from_ggml(ty, &bytes, inp, out).expect("whole blocks");
            let mut w = vec![0f32; inp * out];
            ty.dequantize(&bytes, &mut w);
            let x: Vec<f32> = (0..t * inp).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let (want, mag) = reference(&w, &x, inp);
            check(&gemm(&q, &x, t), &want, &mag)?;
        }
    }
}
