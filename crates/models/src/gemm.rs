//! The host product for many input rows (prefill chunks, a teacher-forced answer, a prose
//! continuation): `Y = X · Wᵀ`, with `W` read from its host copy (the model file's blocks, or
//! f32 rows).
//!
//! Why not burn's matmul: burn-ndarray multiplies through `matrixmultiply`, which wants f32
//! weights and packs the whole right-hand matrix on every call, so a ten-row forward pays for a
//! full copy of the weights; its kernels stop at AVX2. Here each task dequantises a few weight
//! rows into a k-major panel once, in cache, and reuses it for every input row through a
//! register tile: `MR` input rows × `NV` vectors of outputs, as wide as the register file
//! allows (12 × 32 on AVX-512, 6 × 16 on AVX2). The input rows are packed k-major once per
//! product, so the tile's inner loop is one broadcast per row and one load per vector.
use pulp::Simd;
use rayon::prelude::*;

/// A weight matrix the product can read: `rows` outputs of `inp` values each.
pub(crate) trait WeightRows: Sync {
    /// Values per row (the input width).
    fn inp(&self) -> usize;
    /// Number of rows (outputs).
    fn rows(&self) -> usize;
    /// Row `o` as f32 into `out` (`inp` values).
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
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(simd) = pulp::x86::V4::try_new() {
            return product::<_, _, 12, 2>(simd, w, x, t);
        }
        if let Some(simd) = pulp::x86::V3::try_new() {
            return product::<_, _, 6, 2>(simd, w, x, t);
        }
    }
    plain(w, x, t)
}

/// [`gemm`] without explicit SIMD: the tile over pulp's scalar "vectors" (every CPU, and
/// the reference the vector versions are tested against).
pub(crate) fn plain<W: WeightRows + ?Sized>(w: &W, x: &[f32], t: usize) -> Vec<f32> {
    product::<_, _, 4, 4>(pulp::Scalar::new(), w, x, t)
}

/// The input rows cut into blocks of `MR` rows (then 4, 2, 1 for the rest), each packed
/// k-major: `data[start + k·m + i] = x[r0 + i][k]`.
struct Packed {
    /// `(first row, rows m, offset into data)` per block.
    blocks: Vec<(usize, usize, usize)>,
    data: Vec<f32>,
}

impl Packed {
    fn new(x: &[f32], t: usize, inp: usize, mr: usize) -> Self {
        let mut blocks = Vec::new();
        let mut data = Vec::with_capacity(x.len());
        let mut r0 = 0;
        while r0 < t {
            let left = t - r0;
            let m = [mr, 4, 2, 1].into_iter().find(|&m| m <= left).unwrap_or(1);
            blocks.push((r0, m, data.len()));
            for k in 0..inp {
                for i in 0..m {
                    data.push(x[(r0 + i) * inp + k]);
                }
            }
            r0 += m;
        }
        Self { blocks, data }
    }
}

fn product<S: Simd, W: WeightRows + ?Sized, const MR: usize, const NV: usize>(
    simd: S,
    w: &W,
    x: &[f32],
    t: usize,
) -> Vec<f32> {
    let (inp, out) = (w.inp(), w.rows());
    let nr = NV * S::F32_LANES;
    if t == 0 || out == 0 || inp == 0 {
        return vec![0f32; t * out];
    }
    let groups = out.div_ceil(nr);
    let by_cache = (PANEL_BYTES / (inp * nr * 4)).max(1);
    let by_share = groups.div_ceil(4 * rayon::current_num_threads()).max(1);
    let per_task = by_cache.min(by_share);
    let packed = Packed::new(x, t, inp, MR);
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
            transpose(&rows, inp, &mut panel, nr);
            let (pv, _) = S::as_simd_f32s(&panel);
            let (pv, _) = pv.as_chunks::<NV>();
            for &(r0, m, at) in &packed.blocks {
                let a = &packed.data[at..at + m * inp];
                let ys = &mut ys[r0 * width..];
                let col = gi * nr;
                match m {
                    _ if m == MR => tile::<S, MR, NV>(simd, a, pv, ys, width, col),
                    4 => tile::<S, 4, NV>(simd, a, pv, ys, width, col),
                    2 => tile::<S, 2, NV>(simd, a, pv, ys, width, col),
                    _ => tile::<S, 1, NV>(simd, a, pv, ys, width, col),
                }
            }
        }
        ys
    }
}

/// `panel[k][j] = rows[j][k]` (`rows` is `[nr][inp]`), in tiles of 32 `k` so that the
/// lines written stay in L1 while every row is visited: element by element, the stores of a
/// whole row landed a panel row apart and missed the cache on each one (a quarter of the
/// product's time).
#[inline(always)]
fn transpose(rows: &[f32], inp: usize, panel: &mut [f32], nr: usize) {
    const TILE: usize = 32;
    for k0 in (0..inp).step_by(TILE) {
        let kn = (inp - k0).min(TILE);
        let dst = &mut panel[k0 * nr..(k0 + kn) * nr];
        for (kk, d) in dst.chunks_exact_mut(nr).enumerate() {
            for (j, d) in d.iter_mut().enumerate() {
                *d = rows[j * inp + k0 + kk];
            }
        }
    }
}

/// `M` packed input rows (`a`, k-major) times one panel (`[k][NV]` vectors) into columns
/// `col..col + NV·lanes` of `M` rows of `ys` (row stride `width`). The accumulators are a
/// fixed-size array indexed by constants, so they live in registers; the loops are plain
/// loops, not closures, so that they are compiled with the caller's target features.
#[inline(always)]
fn tile<S: Simd, const M: usize, const NV: usize>(
    simd: S,
    a: &[f32],
    panel: &[[S::f32s; NV]],
    ys: &mut [f32],
    width: usize,
    col: usize,
) {
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; NV]; M];
    let (a, _) = a.as_chunks::<M>();
    for (ak, pk) in a.iter().zip(panel) {
        for i in 0..M {
            let b = simd.splat_f32s(ak[i]);
            for v in 0..NV {
                acc[i][v] = simd.mul_add_e_f32s(b, pk[v], acc[i][v]);
            }
        }
    }
    let lanes = S::F32_LANES;
    for (i, acc) in acc.iter().enumerate() {
        let dst = &mut ys[i * width + col..i * width + col + NV * lanes];
        let (dst, _) = S::as_mut_simd_f32s(dst);
        dst.copy_from_slice(acc);
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
            let n = inp / ty.block_values() * out * ty.block_bytes();
            let mut bytes: Vec<u8> = (0..n).map(|i| seed[i % seed.len()].wrapping_add((i / 7) as u8)).collect();
            // Small finite f16 scales where each type keeps them.
            let at = match ty { GgmlType::Q6K => 208, _ => 0 };
            for (b, chunk) in bytes.chunks_exact_mut(ty.block_bytes()).enumerate() {
                let s = half::f16::from_f32(((b % 7) as f32 - 3.0) / 64.0).to_le_bytes();
                chunk[at..at + 2].copy_from_slice(&s);
                if ty == GgmlType::Q4_1 {
                    chunk[2..4].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
                }
            }
            let q = QuantRows::from_ggml(ty, &bytes, inp, out).expect("whole blocks");
            let mut w = vec![0f32; inp * out];
            ty.dequantize(&bytes, &mut w);
            let x: Vec<f32> = (0..t * inp).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let (want, mag) = reference(&w, &x, inp);
            check(&gemm(&q, &x, t), &want, &mag)?;
        }
    }
}
