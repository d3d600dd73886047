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

/// Values per ggml block (Q4_1 and Q8_0), and per repacked sub-block of the other types.
pub(crate) const BLOCK: usize = 32;

/// Values per half block: the granularity of [`QuantRows::block_sums`] (Q6_K's scales).
pub(crate) const HALF: usize = BLOCK / 2;

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
    /// Q5_0, Q5_1, Q4_K, Q5_K and Q6_K, unpacked at load to one unsigned byte per value in
    /// 32-value sub-blocks with a scale and a minimum per half (16 values): `w_j = d_h·q_j +
    /// m_h`, `h = j / 16` (Q6_K's scales cover 16 values). Exactly the file's weights, at 40
    /// bytes per 32 values instead of the file's 22–28: not the file's own bit layout, but
    /// 3.2× fewer bytes than the f32 rows these types had before.
    Unpacked {
        d: Vec<[f32; 2]>,
        m: Vec<[f32; 2]>,
        q: Vec<[u8; 32]>,
        blocks_per_row: usize,
    },
}

/// One repacked 32-value sub-block: scales, minimums (per half) and unsigned codes.
type Sub = ([f32; 2], [f32; 2], [u8; 32]);

/// The 6-bit scale and minimum of sub-block `j` in the 12 scale bytes of Q4_K / Q5_K.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        (f32::from(q[j] & 63), f32::from(q[j + 4] & 63))
    } else {
        let d = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (f32::from(d), f32::from(m))
    }
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Q5_0 (`w = d·(q − 16)`) or Q5_1 (`w = d·q + m`): one 32-value sub-block.
fn unpack_q5(b: &[u8], with_min: bool) -> Sub {
    let d = f16(&b[0..2]);
    let (m, at) = if with_min {
        (f16(&b[2..4]), 4)
    } else {
        (-16.0 * d, 2)
    };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 20];
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    ([d, d], [m, m], q)
}

/// Q4_K / Q5_K (`w = d·s·q − dmin·m` per 32 values): eight sub-blocks.
fn unpack_k45(b: &[u8], five: bool, out: &mut Vec<Sub>) {
    let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
    let scales = &b[4..16];
    let (qh, qs) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    for c in 0..4 {
        let ql = &qs[c * 32..c * 32 + 32];
        for (half_sel, shift) in [(0usize, 0u8), (1, 4)] {
            let (sc, mn) = scale_min_k4(2 * c + half_sel, scales);
            let mut q = [0u8; 32];
            for l in 0..32 {
                let high = if five && qh[l] & (1u8 << (2 * c + half_sel)) != 0 {
                    16
                } else {
                    0
                };
                q[l] = ((ql[l] >> shift) & 0x0F) + high;
            }
            out.push(([d * sc; 2], [-dmin * mn; 2], q));
        }
    }
}

/// Q6_K (`w = d·s·(q − 32)`, a scale per 16 values): eight sub-blocks.
fn unpack_q6k(b: &[u8], out: &mut Vec<Sub>) {
    let d = f16(&b[208..210]);
    for n in 0..2 {
        let ql = &b[n * 64..n * 64 + 64];
        let qh = &b[128 + n * 32..128 + n * 32 + 32];
        let sc = &b[192 + n * 8..192 + n * 8 + 8];
        for k in 0..4 {
            let mut q = [0u8; 32];
            for l in 0..32 {
                let src = ql[l + if k % 2 == 1 { 32 } else { 0 }];
                let nib = if k < 2 { src & 0x0F } else { src >> 4 };
                q[l] = nib | (((qh[l] >> (2 * k)) & 3) << 4);
            }
            let s = |i: usize| d * f32::from(sc[2 * k + i] as i8);
            let (d0, d1) = (s(0), s(1));
            out.push(([d0, d1], [-32.0 * d0, -32.0 * d1], q));
        }
    }
}

impl QuantRows {
    /// Repacks `out` rows of `inp` values stored as ggml blocks of type `ty`. `None` when `ty`
    /// has no kernel here, `inp` is not a whole number of blocks, or `bytes` is not exactly
    /// that many blocks; the caller then keeps f32 rows.
    pub(crate) fn from_ggml(ty: GgmlType, bytes: &[u8], inp: usize, out: usize) -> Option<Self> {
        if inp == 0 || !inp.is_multiple_of(ty.block_values().max(BLOCK)) {
            return None;
        }
        let blocks_per_row = inp / BLOCK;
        let n = blocks_per_row.checked_mul(out)?;
        let file_blocks = (inp / ty.block_values()).checked_mul(out)?;
        if bytes.len() != file_blocks.checked_mul(ty.block_bytes())? {
            return None;
        }
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
            GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
                let mut subs: Vec<Sub> = Vec::with_capacity(n);
                for b in bytes.chunks_exact(ty.block_bytes()) {
                    match ty {
                        GgmlType::Q5_0 => subs.push(unpack_q5(b, false)),
                        GgmlType::Q5_1 => subs.push(unpack_q5(b, true)),
                        GgmlType::Q4K => unpack_k45(b, false, &mut subs),
                        GgmlType::Q5K => unpack_k45(b, true, &mut subs),
                        _ => unpack_q6k(b, &mut subs),
                    }
                }
                let (mut d, mut m, mut q) = (
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                );
                for (sd, sm, sq) in subs {
                    d.push(sd);
                    m.push(sm);
                    q.push(sq);
                }
                Some(Self::Unpacked {
                    d,
                    m,
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
            Self::Q4_1 { blocks_per_row, .. }
            | Self::Q8_0 { blocks_per_row, .. }
            | Self::Unpacked { blocks_per_row, .. } => blocks_per_row * BLOCK,
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
            Self::Unpacked {
                d, blocks_per_row, ..
            } => d.len() / blocks_per_row,
        }
    }

    /// Bytes held (what a decode step streams).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::Q4_1 { d, .. } => d.len() * (4 + 4 + 16),
            Self::Q8_0 { d, .. } => d.len() * (4 + 32),
            Self::Unpacked { d, .. } => d.len() * (8 + 8 + 32),
        }
    }

    /// Row `o` dequantised into `out` (`inp` values): what the many-row product
    /// ([`crate::gemm`]) packs, once per product, for every input row to reuse.
    #[inline(always)]
    pub(crate) fn row_into(&self, o: usize, out: &mut [f32]) {
        let nb = self.inp() / BLOCK;
        let blocks = o * nb..(o + 1) * nb;
        let (out, _) = out.as_chunks_mut::<BLOCK>();
        match self {
            Self::Q4_1 { d, m, q, .. } => {
                for (((o, q), &d), &m) in out
                    .iter_mut()
                    .zip(&q[blocks.clone()])
                    .zip(&d[blocks.clone()])
                    .zip(&m[blocks])
                {
                    for j in 0..HALF {
                        o[j] = d * f32::from(q[j] & 0x0F) + m;
                        o[j + HALF] = d * f32::from(q[j] >> 4) + m;
                    }
                }
            }
            Self::Q8_0 { d, q, .. } => {
                for ((o, q), &d) in out.iter_mut().zip(&q[blocks.clone()]).zip(&d[blocks]) {
                    for (o, &q) in o.iter_mut().zip(q) {
                        *o = d * f32::from(q as i8);
                    }
                }
            }
            Self::Unpacked { d, m, q, .. } => {
                for (((o, q), d), m) in out
                    .iter_mut()
                    .zip(&q[blocks.clone()])
                    .zip(&d[blocks.clone()])
                    .zip(&m[blocks])
                {
                    for (j, (o, &q)) in o.iter_mut().zip(q).enumerate() {
                        let h = j / HALF;
                        *o = d[h] * f32::from(q) + m[h];
                    }
                }
            }
        }
    }

    /// What [`QuantRows::dot_rows`] needs besides `x`: the sum of every half block of every
    /// input row (`[t][2 · blocks_per_row]`, for the minimums). Computed once per product.
    pub(crate) fn block_sums(x: &[f32]) -> Vec<f32> {
        x.chunks_exact(HALF).map(|c| c.iter().sum()).collect()
    }

    /// Dot products of rows `first..first + ys.len() / t` with each of the `t` input rows in
    /// `x` (`[t][inp]`), written output-major into `ys` (`[rows][t]`). `sums` is
    /// [`QuantRows::block_sums`] of `x`.
    pub(crate) fn dot_rows(&self, first: usize, x: &[f32], sums: &[f32], ys: &mut [f32]) {
        self.dot_rows_on(Isa::best(), first, x, sums, ys);
    }

    /// [`QuantRows::dot_rows`] with the kernels of `isa` (which the CPU must have: see
    /// [`Isa::available`]).
    fn dot_rows_on(&self, isa: Isa, first: usize, x: &[f32], sums: &[f32], ys: &mut [f32]) {
        let inp = self.inp();
        let t = x.len() / inp;
        let nb = inp / BLOCK;
        let rows = first..first + ys.len() / t;
        let (xs, _) = x.as_chunks::<BLOCK>();
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::V4
            && let Some(simd) = pulp::x86::V4::try_new()
        {
            simd.vectorize(v4::DotRows {
                simd,
                w: self,
                rows,
                xs,
                ys,
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Plain
            && let Some(simd) = pulp::x86::V3::try_new()
        {
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
                let (xr, sr) = (
                    &xs[r * nb..(r + 1) * nb],
                    &sums[2 * r * nb..2 * (r + 1) * nb],
                );
                *y = match self {
                    Self::Q4_1 { d, m, q, .. } => q4_1_dot(
                        &q[blocks.clone()],
                        &d[blocks.clone()],
                        &m[blocks.clone()],
                        xr,
                        sr,
                    ),
                    Self::Q8_0 { d, q, .. } => q8_0_dot(&q[blocks.clone()], &d[blocks.clone()], xr),
                    Self::Unpacked { d, m, q, .. } => unpacked_dot(
                        &q[blocks.clone()],
                        &d[blocks.clone()],
                        &m[blocks.clone()],
                        xr,
                        sr,
                    ),
                };
            }
        }
    }
}

/// The kernel families of [`QuantRows::dot_rows`]: AVX-512 (16 lanes, the nibbles widened by
/// one `vpmovzxbd` per block), AVX2/FMA, or plain loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    V4,
    V3,
    Plain,
}

impl Isa {
    /// The widest this CPU has (every product asks, so no list is built).
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if pulp::x86::V4::try_new().is_some() {
                return Self::V4;
            }
            if pulp::x86::V3::try_new().is_some() {
                return Self::V3;
            }
        }
        Self::Plain
    }

    /// Every family this CPU can run, widest first (what the tests compare).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if pulp::x86::V4::try_new().is_some() {
                all.push(Self::V4);
            }
            if pulp::x86::V3::try_new().is_some() {
                all.push(Self::V3);
            }
        }
        all.push(Self::Plain);
        all
    }
}

/// One Q4_1 row · `x`, plain Rust (the reference the AVX2 kernel is tested against).
/// `sums` holds two half-block sums per block.
fn q4_1_dot(q: &[[u8; 16]], d: &[f32], m: &[f32], x: &[[f32; BLOCK]], sums: &[f32]) -> f32 {
    let mut acc = 0f32;
    for ((((q, d), m), x), s) in q.iter().zip(d).zip(m).zip(x).zip(sums.chunks_exact(2)) {
        let mut qx = 0f32;
        for j in 0..16 {
            qx += f32::from(q[j] & 0x0F) * x[j] + f32::from(q[j] >> 4) * x[j + 16];
        }
        acc += d * qx + m * (s[0] + s[1]);
    }
    acc
}

/// One unpacked row · `x`, plain Rust: per half, `d_h · Σ q·x + m_h · Σ x`.
fn unpacked_dot(
    q: &[[u8; 32]],
    d: &[[f32; 2]],
    m: &[[f32; 2]],
    x: &[[f32; BLOCK]],
    sums: &[f32],
) -> f32 {
    let mut acc = 0f32;
    for ((((q, d), m), x), s) in q.iter().zip(d).zip(m).zip(x).zip(sums.chunks_exact(2)) {
        for h in 0..2 {
            let qx: f32 = (h * HALF..(h + 1) * HALF)
                .map(|j| f32::from(q[j]) * x[j])
                .sum();
            acc += d[h] * qx + m[h] * s[h];
        }
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
    use super::{BLOCK, Q41, Q80, QuantRows, RowSimd, Unp, Widen, many_rows};
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
            if t > 1 {
                return many_rows(simd, w, rows, xs, ys);
            }
            for (o, yo) in rows.zip(ys.chunks_exact_mut(t.max(1))) {
                let b = o * nb..(o + 1) * nb;
                for (r, y) in yo.iter_mut().enumerate() {
                    let xr = &xs[r * nb..(r + 1) * nb];
                    *y = match w {
                        QuantRows::Q4_1 { d, m, q, .. } => {
                            let s = &sums[2 * r * nb..2 * (r + 1) * nb];
                            q4_1_dot(simd, &q[b.clone()], &d[b.clone()], xr)
                                + m[b.clone()]
                                    .iter()
                                    .zip(s.chunks_exact(2))
                                    .map(|(m, s)| m * (s[0] + s[1]))
                                    .sum::<f32>()
                        }
                        QuantRows::Q8_0 { d, q, .. } => {
                            q8_0_dot(simd, &q[b.clone()], &d[b.clone()], xr)
                        }
                        QuantRows::Unpacked { d, m, q, .. } => {
                            let s = &sums[2 * r * nb..2 * (r + 1) * nb];
                            unpacked_dot(simd, &q[b.clone()], &d[b.clone()], xr)
                                + kv_tensor::dot(m[b.clone()].as_flattened(), s)
                        }
                    };
                }
            }
        }
    }

    impl RowSimd for V3 {
        /// Four vectors of eight.
        type Block = [__m256; 4];
        /// One accumulator per input row: with eight rows and a block in flight, AVX2's
        /// sixteen registers hold no more.
        type Acc = __m256;

        #[inline(always)]
        fn zero(self) -> __m256 {
            self.avx._mm256_setzero_ps()
        }

        #[inline(always)]
        fn fma(self, w: [__m256; 4], x: &[f32; BLOCK], mut acc: __m256) -> __m256 {
            let x: [__m256; 4] = pulp::cast(*x);
            for (w, x) in w.iter().zip(&x) {
                acc = self.fma._mm256_fmadd_ps(*w, *x, acc);
            }
            acc
        }

        #[inline(always)]
        fn sum(self, acc: __m256) -> f32 {
            hsum(acc)
        }
    }

    impl Widen<V3> for Q41<'_> {
        #[inline(always)]
        fn widen(self, simd: V3, b: usize) -> [__m256; 4] {
            let (sse2, avx, avx2, fma) = (simd.sse2, simd.avx, simd.avx2, simd.fma);
            prefetch(simd, &self.q[b]);
            let q: __m128i = pulp::cast(self.q[b]);
            let low = sse2._mm_set1_epi8(0x0F);
            let lo = sse2._mm_and_si128(q, low);
            let hi = sse2._mm_and_si128(sse2._mm_srli_epi16::<4>(q), low);
            let (d, m) = (avx._mm256_set1_ps(self.d[b]), avx._mm256_set1_ps(self.m[b]));
            let f = |v: __m128i| {
                fma._mm256_fmadd_ps(avx._mm256_cvtepi32_ps(avx2._mm256_cvtepu8_epi32(v)), d, m)
            };
            [
                f(lo),
                f(sse2._mm_srli_si128::<8>(lo)),
                f(hi),
                f(sse2._mm_srli_si128::<8>(hi)),
            ]
        }
    }

    impl Widen<V3> for Q80<'_> {
        #[inline(always)]
        fn widen(self, simd: V3, b: usize) -> [__m256; 4] {
            let (sse2, avx, avx2) = (simd.sse2, simd.avx, simd.avx2);
            prefetch(simd, &self.q[b]);
            let q: [__m128i; 2] = pulp::cast(self.q[b]);
            let d = avx._mm256_set1_ps(self.d[b]);
            let f = |v: __m128i| {
                avx._mm256_mul_ps(avx._mm256_cvtepi32_ps(avx2._mm256_cvtepi8_epi32(v)), d)
            };
            [
                f(q[0]),
                f(sse2._mm_srli_si128::<8>(q[0])),
                f(q[1]),
                f(sse2._mm_srli_si128::<8>(q[1])),
            ]
        }
    }

    impl Widen<V3> for Unp<'_> {
        #[inline(always)]
        fn widen(self, simd: V3, b: usize) -> [__m256; 4] {
            let (sse2, avx, avx2, fma) = (simd.sse2, simd.avx, simd.avx2, simd.fma);
            prefetch(simd, &self.q[b]);
            let q: [__m128i; 2] = pulp::cast(self.q[b]);
            let [d0, d1] = self.d[b];
            let [m0, m1] = self.m[b];
            let f = |v: __m128i, d: f32, m: f32| {
                fma._mm256_fmadd_ps(
                    avx._mm256_cvtepi32_ps(avx2._mm256_cvtepu8_epi32(v)),
                    avx._mm256_set1_ps(d),
                    avx._mm256_set1_ps(m),
                )
            };
            [
                f(q[0], d0, m0),
                f(sse2._mm_srli_si128::<8>(q[0]), d0, m0),
                f(q[1], d1, m1),
                f(sse2._mm_srli_si128::<8>(q[1]), d1, m1),
            ]
        }
    }

    /// Asks for the quants ~2 KiB past `block` (the rest of the row, then the next rows of
    /// the task). The hardware prefetcher alone left this kernel waiting on memory: on a
    /// 100 MB Q4_1 matrix one core went from 6.0 to 2.7 ns per block with it. A prefetch
    /// never faults, so an address past the end is harmless.
    #[inline(always)]
    pub(super) fn prefetch<T>(simd: V3, block: &T) {
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

    /// `Σ_b Σ_h d_bh · Σ_{j in h} q_bj · x_bj` with unsigned byte quants (the minimums are
    /// added by the caller).
    #[inline(always)]
    fn unpacked_dot(simd: V3, q: &[[u8; 32]], d: &[[f32; 2]], x: &[[f32; BLOCK]]) -> f32 {
        let (sse2, avx, avx2, fma) = (simd.sse2, simd.avx, simd.avx2, simd.fma);
        let mut acc = avx._mm256_setzero_ps();
        for ((q, d), x) in q.iter().zip(d).zip(x) {
            prefetch(simd, q);
            let x: [__m256; 4] = pulp::cast(*x);
            let q: [__m128i; 2] = pulp::cast(*q);
            let f = |v: __m128i| avx._mm256_cvtepi32_ps(avx2._mm256_cvtepu8_epi32(v));
            let s0 = fma._mm256_fmadd_ps(
                f(sse2._mm_srli_si128::<8>(q[0])),
                x[1],
                avx._mm256_mul_ps(f(q[0]), x[0]),
            );
            let s1 = fma._mm256_fmadd_ps(
                f(sse2._mm_srli_si128::<8>(q[1])),
                x[3],
                avx._mm256_mul_ps(f(q[1]), x[2]),
            );
            acc = fma._mm256_fmadd_ps(avx._mm256_set1_ps(d[0]), s0, acc);
            acc = fma._mm256_fmadd_ps(avx._mm256_set1_ps(d[1]), s1, acc);
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

/// The AVX-512 kernels: a block's 32 weights widened to two 16-lane vectors (`vpmovzxbd`
/// of its 16 bytes, then a mask and a shift for the two nibbles: a quarter of the AVX2 path's
/// shuffles, which were its limit) with `d·q + m` applied, then multiplied with up to eight
/// input rows in registers. One row (decode) takes the same path.
#[cfg(target_arch = "x86_64")]
mod v4 {
    use super::{BLOCK, Q41, Q80, QuantRows, RowSimd, Unp, Widen, many_rows};
    use core::arch::x86_64::{__m128i, __m512};
    use pulp::x86::V4;
    use std::ops::Range;

    pub(super) struct DotRows<'a> {
        pub(super) simd: V4,
        pub(super) w: &'a QuantRows,
        pub(super) rows: Range<usize>,
        pub(super) xs: &'a [[f32; BLOCK]],
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
                ys,
            } = self;
            many_rows(simd, w, rows, xs, ys);
        }
    }

    impl RowSimd for V4 {
        /// Two vectors of sixteen.
        type Block = [__m512; 2];
        /// Two accumulators per input row (one per half block), so that one row's chain of
        /// dependent FMAs is not the limit.
        type Acc = [__m512; 2];

        #[inline(always)]
        fn zero(self) -> [__m512; 2] {
            [self.avx512f._mm512_setzero_ps(); 2]
        }

        #[inline(always)]
        fn fma(self, w: [__m512; 2], x: &[f32; BLOCK], acc: [__m512; 2]) -> [__m512; 2] {
            let f = self.avx512f;
            let x: [__m512; 2] = pulp::cast(*x);
            [
                f._mm512_fmadd_ps(w[0], x[0], acc[0]),
                f._mm512_fmadd_ps(w[1], x[1], acc[1]),
            ]
        }

        #[inline(always)]
        fn sum(self, acc: [__m512; 2]) -> f32 {
            let f = self.avx512f;
            f._mm512_reduce_add_ps(f._mm512_add_ps(acc[0], acc[1]))
        }
    }

    impl Widen<V4> for Q41<'_> {
        #[inline(always)]
        fn widen(self, simd: V4, b: usize) -> [__m512; 2] {
            let f = simd.avx512f;
            super::v3::prefetch(*simd, &self.q[b]);
            let v = f._mm512_cvtepu8_epi32(pulp::cast::<[u8; 16], __m128i>(self.q[b]));
            let lo = f._mm512_and_si512(v, f._mm512_set1_epi32(0x0F));
            let hi = f._mm512_srli_epi32::<4>(v);
            let (d, m) = (f._mm512_set1_ps(self.d[b]), f._mm512_set1_ps(self.m[b]));
            [
                f._mm512_fmadd_ps(f._mm512_cvtepi32_ps(lo), d, m),
                f._mm512_fmadd_ps(f._mm512_cvtepi32_ps(hi), d, m),
            ]
        }
    }

    impl Widen<V4> for Q80<'_> {
        #[inline(always)]
        fn widen(self, simd: V4, b: usize) -> [__m512; 2] {
            let f = simd.avx512f;
            super::v3::prefetch(*simd, &self.q[b]);
            let q: [__m128i; 2] = pulp::cast(self.q[b]);
            let d = f._mm512_set1_ps(self.d[b]);
            [
                f._mm512_mul_ps(f._mm512_cvtepi32_ps(f._mm512_cvtepi8_epi32(q[0])), d),
                f._mm512_mul_ps(f._mm512_cvtepi32_ps(f._mm512_cvtepi8_epi32(q[1])), d),
            ]
        }
    }

    impl Widen<V4> for Unp<'_> {
        #[inline(always)]
        fn widen(self, simd: V4, b: usize) -> [__m512; 2] {
            let f = simd.avx512f;
            super::v3::prefetch(*simd, &self.q[b]);
            let q: [__m128i; 2] = pulp::cast(self.q[b]);
            let ([d0, d1], [m0, m1]) = (self.d[b], self.m[b]);
            let half = |q: __m128i, d: f32, m: f32| {
                let v = f._mm512_cvtepi32_ps(f._mm512_cvtepu8_epi32(q));
                f._mm512_fmadd_ps(v, f._mm512_set1_ps(d), f._mm512_set1_ps(m))
            };
            [half(q[0], d0, m0), half(q[1], d1, m1)]
        }
    }
}

/// The many-row kernel, written once over the SIMD level ([`RowSimd`]) and the block type
/// ([`Widen`]): each weight block is widened once (`d·q + m` applied) and multiplied with up
/// to eight input rows in registers. The one-row kernel would widen it again for every input
/// row, which made each extra row cost nearly a whole decode step.
#[cfg(target_arch = "x86_64")]
trait RowSimd: Copy {
    /// A block's 32 weights, widened.
    type Block: Copy;
    /// One input row's running sum.
    type Acc: Copy;
    fn zero(self) -> Self::Acc;
    /// `acc + w ⊙ x`, lane-wise.
    fn fma(self, w: Self::Block, x: &[f32; BLOCK], acc: Self::Acc) -> Self::Acc;
    /// The lanes of `acc` added up.
    fn sum(self, acc: Self::Acc) -> f32;
}

/// A block type as the many-row kernel reads it: block `b` of the matrix widened.
#[cfg(target_arch = "x86_64")]
trait Widen<S: RowSimd>: Copy {
    fn widen(self, simd: S, b: usize) -> S::Block;
}

/// Q4_1 blocks (see [`QuantRows::Q4_1`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Q41<'a> {
    d: &'a [f32],
    m: &'a [f32],
    q: &'a [[u8; 16]],
}

/// Q8_0 blocks.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Q80<'a> {
    d: &'a [f32],
    q: &'a [[u8; 32]],
}

/// Unpacked sub-blocks (scale and minimum per half).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Unp<'a> {
    d: &'a [[f32; 2]],
    m: &'a [[f32; 2]],
    q: &'a [[u8; 32]],
}

/// Rows `rows` of `w` times the `t` input rows `xs`, output-major into `ys` (`[rows][t]`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn many_rows<S: RowSimd>(
    simd: S,
    w: &QuantRows,
    rows: std::ops::Range<usize>,
    xs: &[[f32; BLOCK]],
    ys: &mut [f32],
) where
    for<'a> Q41<'a>: Widen<S>,
    for<'a> Q80<'a>: Widen<S>,
    for<'a> Unp<'a>: Widen<S>,
{
    let nb = w.inp() / BLOCK;
    match w {
        QuantRows::Q4_1 { d, m, q, .. } => tiles(simd, Q41 { d, m, q }, nb, rows, xs, ys),
        QuantRows::Q8_0 { d, q, .. } => tiles(simd, Q80 { d, q }, nb, rows, xs, ys),
        QuantRows::Unpacked { d, m, q, .. } => tiles(simd, Unp { d, m, q }, nb, rows, xs, ys),
    }
}

/// [`many_rows`] for one block type, in tiles of 8, 4, 2 and 1 input rows.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn tiles<S: RowSimd, W: Widen<S>>(
    simd: S,
    w: W,
    nb: usize,
    rows: std::ops::Range<usize>,
    xs: &[[f32; BLOCK]],
    ys: &mut [f32],
) {
    let t = ys.len() / rows.len().max(1);
    for (o, yo) in rows.zip(ys.chunks_exact_mut(t.max(1))) {
        let mut r0 = 0;
        while r0 < t {
            let xr = &xs[r0 * nb..];
            let yr = &mut yo[r0..];
            r0 += match t - r0 {
                8.. => row_tile::<S, W, 8>(simd, w, o * nb, nb, xr, yr),
                4.. => row_tile::<S, W, 4>(simd, w, o * nb, nb, xr, yr),
                2.. => row_tile::<S, W, 2>(simd, w, o * nb, nb, xr, yr),
                _ => row_tile::<S, W, 1>(simd, w, o * nb, nb, xr, yr),
            };
        }
    }
}

/// One weight row (blocks `first..first + nb`) dotted with the `R` input rows at the start of
/// `xs` into `ys[..R]`; returns `R`. The accumulators are an array filled by loops, not
/// closures, so that they stay in registers (see `kv_tensor`'s host kernels).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn row_tile<S: RowSimd, W: Widen<S>, const R: usize>(
    simd: S,
    w: W,
    first: usize,
    nb: usize,
    xs: &[[f32; BLOCK]],
    ys: &mut [f32],
) -> usize {
    let mut acc = [simd.zero(); R];
    for i in 0..nb {
        let v = w.widen(simd, first + i);
        for r in 0..R {
            acc[r] = simd.fma(v, &xs[r * nb + i], acc[r]);
        }
    }
    for r in 0..R {
        ys[r] = simd.sum(acc[r]);
    }
    R
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Random ggml blocks of `ty` for `out` rows of `inp` values, with small finite scales
    /// (also the blocks the tiled product's and `Linear`'s tests read).
    pub(crate) fn blocks(ty: GgmlType, inp: usize, out: usize, seed: &[u8]) -> Vec<u8> {
        let n = inp / ty.block_values() * out;
        let mut bytes = Vec::with_capacity(n * ty.block_bytes());
        for i in 0..n * ty.block_bytes() {
            bytes.push(seed[i % seed.len()].wrapping_add((i / seed.len()) as u8));
        }
        // Overwrite the f16 scale fields with small finite values so sums stay well
        // conditioned (k-quants multiply them by 6-bit sub-block scales).
        for (b, chunk) in bytes.chunks_exact_mut(ty.block_bytes()).enumerate() {
            let f = |x: f32| half::f16::from_f32(x).to_le_bytes();
            let s = f(((b % 7) as f32 - 3.0) / 1.5);
            let m = f(((b % 5) as f32 - 2.0) / 4.0);
            let small = f(((b % 7) as f32 - 3.0) / 64.0);
            match ty {
                GgmlType::Q4_1 | GgmlType::Q5_1 => {
                    chunk[0..2].copy_from_slice(&s);
                    chunk[2..4].copy_from_slice(&m);
                }
                GgmlType::Q4K | GgmlType::Q5K => {
                    chunk[0..2].copy_from_slice(&small);
                    chunk[2..4].copy_from_slice(&f(((b % 5) as f32) / 64.0));
                }
                GgmlType::Q6K => chunk[208..210].copy_from_slice(&small),
                _ => chunk[0..2].copy_from_slice(&s),
            }
        }
        bytes
    }

    const TYPES: [GgmlType; 7] = [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The product of the dequantised weights in f64, and `Σ |w·x|` (the scale of the
    /// rounding error).
    fn reference(
        ty: GgmlType,
        bytes: &[u8],
        x: &[f32],
        inp: usize,
        out: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut w = vec![0f32; inp * out];
        ty.dequantize(bytes, &mut w);
        let t = x.len() / inp;
        let (mut y, mut mag) = (vec![0f32; out * t], vec![0f32; out * t]);
        for o in 0..out {
            for r in 0..t {
                let terms = (0..inp).map(|i| f64::from(w[o * inp + i]) * f64::from(x[r * inp + i]));
                y[o * t + r] = terms.clone().sum::<f64>() as f32;
                mag[o * t + r] = terms.map(f64::abs).sum::<f64>() as f32;
            }
        }
        (y, mag)
    }

    proptest! {
        /// Every kernel family the CPU has (AVX-512, AVX2, plain loops) and the scalar
        /// per-block loops equal the f32 product of the dequantised weights, for every row range and up to twelve input rows (the
        /// many-row tiles of 8, 4, 2 and 1 rows).
        #[test]
        fn kernels_match_dequantised_product(
            ty in prop::sample::select(TYPES.to_vec()),
            nb in 1usize..3,
            out in 1usize..9,
            t in 1usize..13,
            seed in proptest::collection::vec(any::<u8>(), 1..40),
            xs in proptest::collection::vec(-2f32..2.0, 512 * 12),
            first in 0usize..8,
        ) {
            let inp = nb * ty.block_values().max(BLOCK);
            let nb = inp / BLOCK;
            let bytes = blocks(ty, inp, out, &seed);
            let w = QuantRows::from_ggml(ty, &bytes, inp, out).expect("whole blocks");
            prop_assert_eq!((w.inp(), w.rows()), (inp, out));
            let x = &xs[..t * inp];
            let (want, mag) = reference(ty, &bytes, x, inp, out);
            let first = first % out;
            let n = out - first;
            let sums = QuantRows::block_sums(x);
            let (xs_blocks, _) = x.as_chunks::<BLOCK>();
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; n * t];
                w.dot_rows_on(isa, first, x, &sums, &mut got);
                for (k, g) in got.iter().enumerate() {
                    let (o, r) = (first + k / t, k % t);
                    let e = want[o * t + r];
                    let tol = 1e-5 * mag[o * t + r] + 1e-4;
                    prop_assert!((g - e).abs() <= tol, "{ty:?} {isa:?} row {o} input {r}: {g} vs {e}");
                }
            }
            for k in 0..n * t {
                let (o, r) = (first + k / t, k % t);
                let e = want[o * t + r];
                let tol = 1e-5 * mag[o * t + r] + 1e-4;
                let (xr, sr) = (
                    &xs_blocks[r * nb..(r + 1) * nb],
                    &sums[2 * r * nb..2 * (r + 1) * nb],
                );
                let b = o * nb..(o + 1) * nb;
                let scalar = match &w {
                    QuantRows::Q4_1 { d, m, q, .. } => {
                        q4_1_dot(&q[b.clone()], &d[b.clone()], &m[b], xr, sr)
                    }
                    QuantRows::Q8_0 { d, q, .. } => q8_0_dot(&q[b.clone()], &d[b], xr),
                    QuantRows::Unpacked { d, m, q, .. } => {
                        unpacked_dot(&q[b.clone()], &d[b.clone()], &m[b], xr, sr)
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
        // A k-quant row must be whole 256-value super-blocks.
        let q4k = blocks(GgmlType::Q4K, 256, 1, &[5]);
        assert!(QuantRows::from_ggml(GgmlType::Q4K, &q4k, 256, 1).is_some());
        assert!(QuantRows::from_ggml(GgmlType::Q4K, &q4k, 128, 2).is_none());
        assert!(QuantRows::from_ggml(GgmlType::Q4_1, &[], 0, 0).is_none());
    }
}
