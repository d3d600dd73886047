//! Decode-time matrix–vector products straight from ggml's 32-value blocks (Q4_1 and Q8_0).
//!
//! Why: a decode step reads every weight once, so on a CPU its speed is the weights' bytes over
//! memory bandwidth. Dequantised to f32 the 135M SmolLM2 streams 0.54 GB per token; its
//! Q4_1/Q8_0 blocks are 0.1 GB, five times fewer bytes. Dequantising inside
//! the dot product loses nothing: `Σ (d·q_i + m)·x_i = d·Σ q_i·x_i + m·Σ x_i`, the same weights
//! as the f32 copy, summed in another order. Plain Rust loops over nibbles vectorise poorly
//! (compute-bound, no faster than streaming f32), so x86-64 CPUs with AVX2/FMA get an explicit
//! kernel written with pulp's safe intrinsics; every other CPU runs a scalar loop with the same
//! arithmetic.
use crate::GgmlType;

/// Values per ggml block (Q4_1 and Q8_0).
pub(crate) const BLOCK: usize = 32;

/// A weight matrix as rows of ggml blocks (`[out][in]`, GGUF row order), repacked for the
/// kernels: the f16 scales (and Q4_1 minimums) widened to f32 once at load, the quants kept as
/// they are. Only the block types whose kernels exist are representable.
#[derive(Debug)]
pub(crate) enum QuantRows {
    /// `w = d·q + m`, `q` 4-bit: byte `j` holds value `j` (low nibble) and `j + 16` (high).
    Q4_1 {
        d: Vec<f32>,
        m: Vec<f32>,
        q: Vec<[u8; 16]>,
        blocks_per_row: usize,
    },
    /// `w = d·q`, `q` a signed byte (stored as its bits in a `u8`).
    Q8_0 {
        d: Vec<f32>,
        q: Vec<[u8; 32]>,
        blocks_per_row: usize,
    },
}

impl QuantRows {
    /// Repacks `out` rows of `inp` values stored as ggml blocks of type `ty`. `None` when `ty`
    /// has no kernel here, `inp` is not a whole number of blocks, or `bytes` is not exactly
    /// that many blocks; the caller then keeps f32 rows.
    pub(crate) fn from_ggml(ty: GgmlType, bytes: &[u8], inp: usize, out: usize) -> Option<Self> {
        if inp == 0 || !inp.is_multiple_of(BLOCK) {
            return None;
        }
        let blocks_per_row = inp / BLOCK;
        let n = blocks_per_row.checked_mul(out)?;
        if bytes.len() != n.checked_mul(ty.block_bytes())? {
            return None;
        }
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        match ty {
            GgmlType::Q4_1 => {
                let (mut d, mut m, mut q) = (
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                );
                for b in bytes.chunks_exact(20) {
                    d.push(f16(&b[0..2]));
                    m.push(f16(&b[2..4]));
                    let mut qs = [0u8; 16];
                    qs.copy_from_slice(&b[4..20]);
                    q.push(qs);
                }
                Some(Self::Q4_1 {
                    d,
                    m,
                    q,
                    blocks_per_row,
                })
            }
            GgmlType::Q8_0 => {
                let (mut d, mut q) = (Vec::with_capacity(n), Vec::with_capacity(n));
                for b in bytes.chunks_exact(34) {
                    d.push(f16(&b[0..2]));
                    let mut qs = [0u8; 32];
                    qs.copy_from_slice(&b[2..34]);
                    q.push(qs);
                }
                Some(Self::Q8_0 {
                    d,
                    q,
                    blocks_per_row,
                })
            }
            _ => None,
        }
    }

    /// Input width of a row.
    pub(crate) fn inp(&self) -> usize {
        match self {
            Self::Q4_1 { blocks_per_row, .. } | Self::Q8_0 { blocks_per_row, .. } => {
                blocks_per_row * BLOCK
            }
        }
    }

    /// Number of rows (outputs).
    pub(crate) fn rows(&self) -> usize {
        match self {
            Self::Q4_1 {
                d, blocks_per_row, ..
            }
            | Self::Q8_0 {
                d, blocks_per_row, ..
            } => d.len() / blocks_per_row,
        }
    }

    /// Bytes held (what a decode step streams).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::Q4_1 { d, .. } => d.len() * (4 + 4 + 16),
            Self::Q8_0 { d, .. } => d.len() * (4 + 32),
        }
    }

    /// What [`QuantRows::dot_rows`] needs besides `x`: the sum of every block of every input
    /// row (`[t][blocks_per_row]`, for the Q4_1 minimums). Computed once per product.
    pub(crate) fn block_sums(x: &[f32]) -> Vec<f32> {
        x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect()
    }

    /// Dot products of rows `first..first + ys.len() / t` with each of the `t` input rows in
    /// `x` (`[t][inp]`), written output-major into `ys` (`[rows][t]`). `sums` is
    /// [`QuantRows::block_sums`] of `x`.
    pub(crate) fn dot_rows(&self, first: usize, x: &[f32], sums: &[f32], ys: &mut [f32]) {
        let inp = self.inp();
        let t = x.len() / inp;
        let nb = inp / BLOCK;
        let rows = first..first + ys.len() / t;
        let (xs, _) = x.as_chunks::<BLOCK>();
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            simd.vectorize(v3::DotRows {
                simd,
                w: self,
                rows,
                xs,
                sums,
                ys,
            });
            return;
        }
        for (o, yo) in rows.zip(ys.chunks_exact_mut(t)) {
            let blocks = o * nb..(o + 1) * nb;
            for (r, y) in yo.iter_mut().enumerate() {
                let (xr, sr) = (&xs[r * nb..(r + 1) * nb], &sums[r * nb..(r + 1) * nb]);
                *y = match self {
                    Self::Q4_1 { d, m, q, .. } => q4_1_dot(
                        &q[blocks.clone()],
                        &d[blocks.clone()],
                        &m[blocks.clone()],
                        xr,
                        sr,
                    ),
                    Self::Q8_0 { d, q, .. } => q8_0_dot(&q[blocks.clone()], &d[blocks.clone()], xr),
                };
            }
        }
    }
}

/// One Q4_1 row · `x`, plain Rust (the reference the AVX2 kernel is tested against).
fn q4_1_dot(q: &[[u8; 16]], d: &[f32], m: &[f32], x: &[[f32; BLOCK]], sums: &[f32]) -> f32 {
    let mut acc = 0f32;
    for ((((q, d), m), x), s) in q.iter().zip(d).zip(m).zip(x).zip(sums) {
        let mut qx = 0f32;
        for j in 0..16 {
            qx += f32::from(q[j] & 0x0F) * x[j] + f32::from(q[j] >> 4) * x[j + 16];
        }
        acc += d * qx + m * s;
    }
    acc
}

/// One Q8_0 row · `x`, plain Rust.
fn q8_0_dot(q: &[[u8; 32]], d: &[f32], x: &[[f32; BLOCK]]) -> f32 {
    let mut acc = 0f32;
    for ((q, d), x) in q.iter().zip(d).zip(x) {
        let qx: f32 = q.iter().zip(x).map(|(&q, x)| f32::from(q as i8) * x).sum();
        acc += d * qx;
    }
    acc
}

/// The AVX2/FMA kernels. Per block: widen 8 quants at a time to i32 (`vpmovzxbd` /
/// `vpmovsxbd`), convert to f32, multiply-add with 8 inputs into a block sum, then scale the
/// block sum by `d` into the row's accumulator: every weight is touched once, in registers.
#[cfg(target_arch = "x86_64")]
mod v3 {
    use super::{BLOCK, QuantRows};
    use core::arch::x86_64::{__m128i, __m256};
    use pulp::x86::V3;
    use std::ops::Range;

    pub(super) struct DotRows<'a> {
        pub(super) simd: V3,
        pub(super) w: &'a QuantRows,
        pub(super) rows: Range<usize>,
        pub(super) xs: &'a [[f32; BLOCK]],
        pub(super) sums: &'a [f32],
        pub(super) ys: &'a mut [f32],
    }

    impl pulp::NullaryFnOnce for DotRows<'_> {
        type Output = ();

        #[inline(always)]
        fn call(self) {
            let DotRows {
                simd,
                w,
                rows,
                xs,
                sums,
                ys,
            } = self;
            let t = ys.len() / rows.len().max(1);
            let nb = w.inp() / BLOCK;
            for (o, yo) in rows.zip(ys.chunks_exact_mut(t.max(1))) {
                let b = o * nb..(o + 1) * nb;
                for (r, y) in yo.iter_mut().enumerate() {
                    let xr = &xs[r * nb..(r + 1) * nb];
                    *y = match w {
                        QuantRows::Q4_1 { d, m, q, .. } => {
                            q4_1_dot(simd, &q[b.clone()], &d[b.clone()], xr)
                                + kv_tensor::dot(&m[b.clone()], &sums[r * nb..(r + 1) * nb])
                        }
                        QuantRows::Q8_0 { d, q, .. } => {
                            q8_0_dot(simd, &q[b.clone()], &d[b.clone()], xr)
                        }
                    };
                }
            }
        }
    }

    /// Asks for the quants ~2 KiB past `block` (the rest of the row, then the next rows of
    /// the task). The hardware prefetcher alone left this kernel waiting on memory: on a
    /// 100 MB Q4_1 matrix one core went from 6.0 to 2.7 ns per block with it. A prefetch
    /// never faults, so an address past the end is harmless.
    #[inline(always)]
    fn prefetch<T>(simd: V3, block: &T) {
        const AHEAD: usize = 2048;
        simd.sse
            ._mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                (block as *const T).cast::<i8>().wrapping_add(AHEAD),
            );
    }

    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        let a: [f32; 8] = pulp::cast(v);
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }

    /// `Σ_b d_b · Σ_j q_bj · x_bj` (the minimums are added by the caller).
    #[inline(always)]
    fn q4_1_dot(simd: V3, q: &[[u8; 16]], d: &[f32], x: &[[f32; BLOCK]]) -> f32 {
        let (sse2, avx, avx2, fma) = (simd.sse2, simd.avx, simd.avx2, simd.fma);
        let low = sse2._mm_set1_epi8(0x0F);
        let mut acc = avx._mm256_setzero_ps();
        for ((q, &d), x) in q.iter().zip(d).zip(x) {
            prefetch(simd, q);
            let x: [__m256; 4] = pulp::cast(*x);
            let q: __m128i = pulp::cast(*q);
            let lo = sse2._mm_and_si128(q, low);
            let hi = sse2._mm_and_si128(sse2._mm_srli_epi16::<4>(q), low);
            let f = |v: __m128i| avx._mm256_cvtepi32_ps(avx2._mm256_cvtepu8_epi32(v));
            let mut s = avx._mm256_mul_ps(f(lo), x[0]);
            s = fma._mm256_fmadd_ps(f(sse2._mm_srli_si128::<8>(lo)), x[1], s);
            s = fma._mm256_fmadd_ps(f(hi), x[2], s);
            s = fma._mm256_fmadd_ps(f(sse2._mm_srli_si128::<8>(hi)), x[3], s);
            acc = fma._mm256_fmadd_ps(avx._mm256_set1_ps(d), s, acc);
        }
        hsum(acc)
    }

    /// `Σ_b d_b · Σ_j q_bj · x_bj` with signed byte quants.
    #[inline(always)]
    fn q8_0_dot(simd: V3, q: &[[u8; 32]], d: &[f32], x: &[[f32; BLOCK]]) -> f32 {
        let (sse2, avx, avx2, fma) = (simd.sse2, simd.avx, simd.avx2, simd.fma);
        let mut acc = avx._mm256_setzero_ps();
        for ((q, &d), x) in q.iter().zip(d).zip(x) {
            prefetch(simd, q);
            let x: [__m256; 4] = pulp::cast(*x);
            let q: [__m128i; 2] = pulp::cast(*q);
            let f = |v: __m128i| avx._mm256_cvtepi32_ps(avx2._mm256_cvtepi8_epi32(v));
            let mut s = avx._mm256_mul_ps(f(q[0]), x[0]);
            s = fma._mm256_fmadd_ps(f(sse2._mm_srli_si128::<8>(q[0])), x[1], s);
            s = fma._mm256_fmadd_ps(f(q[1]), x[2], s);
            s = fma._mm256_fmadd_ps(f(sse2._mm_srli_si128::<8>(q[1])), x[3], s);
            acc = fma._mm256_fmadd_ps(avx._mm256_set1_ps(d), s, acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Random ggml blocks of `ty` for `out` rows of `inp` values, with small finite scales.
    fn blocks(ty: GgmlType, inp: usize, out: usize, seed: &[u8]) -> Vec<u8> {
        let n = inp / BLOCK * out;
        let mut bytes = Vec::with_capacity(n * ty.block_bytes());
        for i in 0..n * ty.block_bytes() {
            bytes.push(seed[i % seed.len()].wrapping_add((i / seed.len()) as u8));
        }
        // Overwrite the f16 scale fields with values in ±2 so sums stay well conditioned.
        for (b, chunk) in bytes.chunks_exact_mut(ty.block_bytes()).enumerate() {
            let s = half::f16::from_f32(((b % 7) as f32 - 3.0) / 1.5).to_le_bytes();
            chunk[0..2].copy_from_slice(&s);
            if ty == GgmlType::Q4_1 {
                let m = half::f16::from_f32(((b % 5) as f32 - 2.0) / 4.0).to_le_bytes();
                chunk[2..4].copy_from_slice(&m);
            }
        }
        bytes
    }

    fn reference(ty: GgmlType, bytes: &[u8], x: &[f32], inp: usize, out: usize) -> Vec<f32> {
        let mut w = vec![0f32; inp * out];
        ty.dequantize(bytes, &mut w);
        let t = x.len() / inp;
        let mut y = vec![0f32; out * t];
        for o in 0..out {
            for r in 0..t {
                y[o * t + r] = (0..inp)
                    .map(|i| f64::from(w[o * inp + i]) * f64::from(x[r * inp + i]))
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    proptest! {
        /// Both kernels (AVX2 where the CPU has it, and the scalar loop) equal the f32 product
        /// of the dequantised weights, for every row range and up to four input rows.
        #[test]
        fn kernels_match_dequantised_product(
            q8 in any::<bool>(),
            nb in 1usize..6,
            out in 1usize..9,
            t in 1usize..5,
            seed in proptest::collection::vec(any::<u8>(), 1..40),
            xs in proptest::collection::vec(-2f32..2.0, 32 * 5 * 4),
            first in 0usize..8,
        ) {
            let ty = if q8 { GgmlType::Q8_0 } else { GgmlType::Q4_1 };
            let inp = nb * BLOCK;
            let bytes = blocks(ty, inp, out, &seed);
            let w = QuantRows::from_ggml(ty, &bytes, inp, out).expect("whole blocks");
            prop_assert_eq!((w.inp(), w.rows()), (inp, out));
            let x = &xs[..t * inp];
            let want = reference(ty, &bytes, x, inp, out);
            let first = first % out;
            let n = out - first;
            let sums = QuantRows::block_sums(x);
            let mut got = vec![f32::NAN; n * t];
            w.dot_rows(first, x, &sums, &mut got);
            let (xs_blocks, _) = x.as_chunks::<BLOCK>();
            for (k, g) in got.iter().enumerate() {
                let (o, r) = (first + k / t, k % t);
                let e = want[o * t + r];
                let tol = 1e-4 * (1.0 + e.abs()) * inp as f32;
                prop_assert!((g - e).abs() <= tol, "row {o} input {r}: {g} vs {e}");
                let (xr, sr) = (&xs_blocks[r * nb..(r + 1) * nb], &sums[r * nb..(r + 1) * nb]);
                let scalar = match &w {
                    QuantRows::Q4_1 { d, m, q, .. } => q4_1_dot(
                        &q[o * nb..(o + 1) * nb], &d[o * nb..(o + 1) * nb],
                        &m[o * nb..(o + 1) * nb], xr, sr),
                    QuantRows::Q8_0 { d, q, .. } => {
                        q8_0_dot(&q[o * nb..(o + 1) * nb], &d[o * nb..(o + 1) * nb], xr)
                    }
                };
                prop_assert!((scalar - e).abs() <= tol, "scalar row {o}: {scalar} vs {e}");
            }
        }
    }

    #[test]
    fn unsupported_or_misfit_blocks_are_refused() {
        let q41 = blocks(GgmlType::Q4_1, 64, 2, &[1, 2, 3]);
        assert!(QuantRows::from_ggml(GgmlType::Q4_1, &q41, 64, 2).is_some());
        // Wrong byte count, width not a whole number of blocks, a type without a kernel.
        assert!(QuantRows::from_ggml(GgmlType::Q4_1, &q41[..39], 64, 2).is_none());
        assert!(QuantRows::from_ggml(GgmlType::Q4_1, &q41, 48, 2).is_none());
        assert!(QuantRows::from_ggml(GgmlType::Q4_0, &q41, 64, 2).is_none());
        assert!(QuantRows::from_ggml(GgmlType::Q4_1, &[], 0, 0).is_none());
    }
}
