//! Dense products of many rows on the host, in register tiles: the core of the model's
//! projections over a prefill chunk (`models`' tiled product) and of the host attention when a
//! prefill chunk's queries meet a run of keys.
//!
//! Why tiles: a dot product per output pair re-reads both operands and reduces every result
//! horizontally. Here the left rows are packed k-major in blocks of `MR`, the right operand is a
//! k-major panel `NV` vectors wide, and each step of `k` is one broadcast per row and one load
//! per vector into `MR × NV` accumulators that stay in registers (12 × 2 vectors of 16 on
//! AVX-512, 6 × 2 of 8 on AVX2: as wide as each register file allows).
use pulp::Simd;

/// Left rows cut into blocks of `mr` rows (then 4, 2, 1 for the rest), each packed k-major:
/// `data[at + k·m + i] = x[r0 + i][k]`.
#[derive(Debug, Default)]
pub struct Packed {
    /// `(first row, rows m, offset into data)` per block.
    blocks: Vec<(usize, usize, usize)>,
    data: Vec<f32>,
    inp: usize,
}

impl Packed {
    /// Packs the `t` rows of `x` (`[t][inp]`, row stride `stride ≥ inp`, only the first `inp`
    /// values of each row are read) in blocks of `mr` rows.
    #[inline(always)]
    pub fn new(x: &[f32], t: usize, inp: usize, stride: usize, mr: usize) -> Self {
        let mut blocks = Vec::new();
        let mut data = vec![0f32; t * inp];
        let mut r0 = 0;
        while r0 < t {
            let left = t - r0;
            let m = [mr, 4, 2, 1].into_iter().find(|&m| m <= left).unwrap_or(1);
            let at = r0 * inp;
            blocks.push((r0, m, at));
            let dst = &mut data[at..at + m * inp];
            for i in 0..m {
                let src = &x[(r0 + i) * stride..(r0 + i) * stride + inp];
                for (d, &v) in dst.iter_mut().skip(i).step_by(m).zip(src) {
                    *d = v;
                }
            }
            r0 += m;
        }
        Self { blocks, data, inp }
    }
}

/// `ys[r][col..col + NV·lanes] = a_r · panel` for every packed row `r` of `a`: `panel` is
/// k-major (`[inp][NV·lanes]`), `ys` has row stride `width`. `MR` must be the block height `a`
/// was packed with.
#[inline(always)]
pub fn panel_product<S: Simd, const MR: usize, const NV: usize>(
    simd: S,
    a: &Packed,
    panel: &[f32],
    ys: &mut [f32],
    width: usize,
    col: usize,
) {
    let (pv, _) = S::as_simd_f32s(panel);
    let (pv, _) = pv.as_chunks::<NV>();
    for &(r0, m, at) in &a.blocks {
        let x = &a.data[at..at + m * a.inp];
        let ys = &mut ys[r0 * width..];
        match m {
            _ if m == MR => tile::<S, MR, NV>(simd, x, pv, ys, width, col),
            4 => tile::<S, 4, NV>(simd, x, pv, ys, width, col),
            2 => tile::<S, 2, NV>(simd, x, pv, ys, width, col),
            _ => tile::<S, 1, NV>(simd, x, pv, ys, width, col),
        }
    }
}

/// `panel[k][j] = rows[j][k]` (`rows` is `[nr][inp]`), in tiles of 32 `k` so that the lines
/// written stay in L1 while every row is visited: element by element, the stores of a whole
/// row landed a panel row apart and missed the cache on each one.
#[inline(always)]
pub fn transpose(rows: &[f32], inp: usize, panel: &mut [f32], nr: usize) {
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

/// `M` packed rows (`a`, k-major) times one panel (`[k][NV]` vectors) into columns
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

/// Runs `op` with the widest tile this CPU has: `op.run::<S, MR, NV>(simd)` with 12 × 2
/// vectors on AVX-512, 6 × 2 on AVX2/FMA, 4 × 4 scalar "vectors" elsewhere.
pub fn dispatch<Op: TileOp>(op: Op) -> Op::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(simd) = pulp::x86::V4::try_new() {
            return Simd::vectorize(simd, OnTile::<Op, 12, 2>(op));
        }
        if let Some(simd) = pulp::x86::V3::try_new() {
            return Simd::vectorize(simd, OnTile::<Op, 6, 2>(op));
        }
    }
    plain(op)
}

/// [`dispatch`] to the scalar tile (every CPU; the reference the vector tiles are tested
/// against).
pub fn plain<Op: TileOp>(op: Op) -> Op::Output {
    op.run::<pulp::Scalar, 4, 4>(pulp::Scalar::new())
}

/// Work written once over any tile shape (see [`dispatch`]). `run` should be
/// `#[inline(always)]`, so that its body is compiled with the target's features.
pub trait TileOp {
    /// What the work returns.
    type Output;
    /// The work, with `MR × NV` tiles of `S`'s vectors.
    fn run<S: Simd, const MR: usize, const NV: usize>(self, simd: S) -> Self::Output;
}

struct OnTile<Op, const MR: usize, const NV: usize>(Op);

impl<Op: TileOp, const MR: usize, const NV: usize> pulp::WithSimd for OnTile<Op, MR, NV> {
    type Output = Op::Output;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Op::Output {
        self.0.run::<S, MR, NV>(simd)
    }
}

/// `out[r·stride + j] = a_r · b_j` for the `rows` rows of `a` (`[rows][w]`) and the `n` rows
/// of `b` (`[n][w]`): attention scores of a block of queries against a run of keys.
pub(crate) struct ProductNt<'a> {
    pub(crate) a: &'a [f32],
    pub(crate) b: &'a [f32],
    pub(crate) w: usize,
    pub(crate) out: &'a mut [f32],
    pub(crate) stride: usize,
}

impl TileOp for ProductNt<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd, const MR: usize, const NV: usize>(self, simd: S) {
        let ProductNt {
            a,
            b,
            w,
            out,
            stride,
        } = self;
        let rows = a.len() / w;
        let n = b.len() / w;
        let nr = NV * S::F32_LANES;
        let packed = Packed::new(a, rows, w, w, MR);
        let mut panel = vec![0f32; w * nr];
        for j0 in (0..n).step_by(nr) {
            let cols = (n - j0).min(nr);
            if cols == nr && j0 + nr <= stride {
                // A whole group: transposed straight from the keys, written in place.
                transpose(&b[j0 * w..(j0 + nr) * w], w, &mut panel, nr);
                panel_product::<S, MR, NV>(simd, &packed, &panel, out, stride, j0);
                continue;
            }
            let mut group = vec![0f32; nr * w];
            group[..cols * w].copy_from_slice(&b[j0 * w..(j0 + cols) * w]);
            transpose(&group, w, &mut panel, nr);
            let mut ys = vec![0f32; rows * nr];
            panel_product::<S, MR, NV>(simd, &packed, &panel, &mut ys, nr, 0);
            for (r, y) in ys.chunks_exact(nr).enumerate() {
                out[r * stride + j0..r * stride + j0 + cols].copy_from_slice(&y[..cols]);
            }
        }
    }
}

/// `acc[r][..] += Σ_j p[r·stride + j] · v_j` for the `rows = acc.len() / w` rows of `acc`
/// and the `n = v.len() / w` rows of `v` (`[n][w]`): a block of queries' value sums.
pub(crate) struct ProductNn<'a> {
    pub(crate) p: &'a [f32],
    pub(crate) stride: usize,
    pub(crate) v: &'a [f32],
    pub(crate) w: usize,
    pub(crate) acc: &'a mut [f32],
}

impl TileOp for ProductNn<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd, const MR: usize, const NV: usize>(self, simd: S) {
        let ProductNn {
            p,
            stride,
            v,
            w,
            acc,
        } = self;
        let rows = acc.len() / w;
        let n = v.len() / w;
        let nr = NV * S::F32_LANES;
        let packed = Packed::new(p, rows, n, stride, MR);
        let mut panel = vec![0f32; n * nr];
        let mut ys = vec![0f32; rows * nr];
        for c0 in (0..w).step_by(nr) {
            let cols = (w - c0).min(nr);
            for (dst, src) in panel.chunks_exact_mut(nr).zip(v.chunks_exact(w)) {
                dst[..cols].copy_from_slice(&src[c0..c0 + cols]);
                dst[cols..].fill(0.0);
            }
            panel_product::<S, MR, NV>(simd, &packed, &panel, &mut ys, nr, 0);
            for (r, y) in ys.chunks_exact(nr).enumerate() {
                for (o, y) in acc[r * w + c0..r * w + c0 + cols].iter_mut().zip(y) {
                    *o += y;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn val(seed: u32, i: usize) -> f32 {
        ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0
    }

    proptest! {
        /// Both products equal their loops, with every tile (the widest this CPU has, and the
        /// scalar one), for row and column counts on every side of the tile sizes.
        #[test]
        fn products_match_their_loops(
            rows in 1usize..30,
            n in 1usize..70,
            w in 1usize..70,
            seed in 0u32..1000,
        ) {
            let a: Vec<f32> = (0..rows * w).map(|i| val(seed, i)).collect();
            let b: Vec<f32> = (0..n * w).map(|i| val(seed, i + 7919)).collect();
            let stride = n + 3;
            let p: Vec<f32> = (0..rows * stride).map(|i| val(seed, i + 104729)).collect();
            for vector in [true, false] {
                let mut out = vec![f32::NAN; rows * stride];
                let op = ProductNt { a: &a, b: &b, w, out: &mut out, stride };
                if vector { dispatch(op) } else { plain(op) }
                for r in 0..rows {
                    for j in 0..n {
                        let want: f32 = (0..w).map(|c| a[r * w + c] * b[j * w + c]).sum();
                        let got = out[r * stride + j];
                        prop_assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "nt {r},{j}: {got} vs {want}");
                    }
                }
                let mut acc = vec![0.5f32; rows * w];
                let op = ProductNn { p: &p, stride, v: &b, w, acc: &mut acc };
                if vector { dispatch(op) } else { plain(op) }
                for r in 0..rows {
                    for c in 0..w {
                        let want: f32 = 0.5 + (0..n).map(|j| p[r * stride + j] * b[j * w + c]).sum::<f32>();
                        let got = acc[r * w + c];
                        prop_assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "nn {r},{c}: {got} vs {want}");
                    }
                }
            }
        }
    }
}
