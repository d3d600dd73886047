//! The row primitives the host attention is built from, in two versions behind one trait:
//! AVX2/FMA written with pulp's safe intrinsics ([`Avx2`]), and plain loops ([`Plain`]) for
//! every other CPU (and as the reference the AVX2 version is tested against).
//!
//! Why explicit intrinsics: the compiler does not fuse `a * b + c` into an FMA, widens fp16 and
//! packed codes through generic code paths, and reduces every dot product horizontally; written
//! out, a 64-wide row is eight loads, conversions and FMAs per query row.
use crate::host_segment::f16_to_f32;
use std::ops::Range;

/// What the attention kernels do to one row (`w` values).
pub(crate) trait RowKernel: Copy {
    /// `dst[..w] ← src` (binary16 bits).
    fn f16_row(self, src: &[u16], dst: &mut [f32]);
    /// `dst[..w] ←` the `BITS`-bit codes packed little-endian in `bytes` (`BITS` 2, 4 or 8;
    /// `bytes` holds exactly `w · BITS / 8` bytes, whole words).
    fn codes_row<const BITS: usize>(self, bytes: &[u8], dst: &mut [f32]);
    /// `x ← x ⊙ s + m`.
    fn fma_row(self, x: &mut [f32], s: &[f32], m: &[f32]);
    /// `x ← x · s + m` (one scale and minimum for the slice).
    fn scale_add(self, x: &mut [f32], s: f32, m: f32);
    /// `Σ a ⊙ b`.
    fn dot(self, a: &[f32], b: &[f32]) -> f32;
    /// `o ← o + a · x`.
    fn axpy(self, o: &mut [f32], a: f32, x: &[f32]);
    /// `x ← exp(x − shift)`, returning `Σ x`.
    fn exp_shifted(self, x: &mut [f32], shift: f32) -> f32;
    /// Scores of `R = q.len() / w` query rows against the `keys.len() / w` rows of `keys`:
    /// `out[r·stride + j] = q_r · key_j`.
    fn dots(self, q: &[f32], w: usize, keys: &[f32], out: &mut [f32], stride: usize) {
        for (r, qr) in q.chunks_exact(w).enumerate() {
            for (j, kj) in keys.chunks_exact(w).enumerate() {
                out[r * stride + j] = self.dot(qr, kj);
            }
        }
    }
    /// `acc_r[cols] += Σ_j p[r·stride + j] · vals_j[cols]` for the `R = acc.len() / w` rows of
    /// `acc` and the `vals.len() / w` rows of `vals`.
    fn weighted_sum(
        self,
        p: &[f32],
        stride: usize,
        vals: &[f32],
        w: usize,
        cols: Range<usize>,
        acc: &mut [f32],
    ) {
        for (r, a) in acc.chunks_exact_mut(w).enumerate() {
            for (j, v) in vals.chunks_exact(w).enumerate() {
                self.axpy(&mut a[cols.clone()], p[r * stride + j], &v[cols.clone()]);
            }
        }
    }
    /// [`RowKernel::dots`] over binary16 keys.
    fn dots_f16(self, q: &[f32], w: usize, keys: &[u16], out: &mut [f32], stride: usize) {
        let mut k = vec![0f32; keys.len()];
        self.f16_row(keys, &mut k);
        self.dots(q, w, &k, out, stride);
    }
    /// [`RowKernel::dots`] over keys held as `BITS`-bit codes (2, 4 or 8), read as the codes'
    /// values: `bytes` holds whole words, each key's `w` codes starting on a word boundary.
    fn dots_codes<const BITS: usize>(
        self,
        q: &[f32],
        w: usize,
        bytes: &[u8],
        out: &mut [f32],
        stride: usize,
    ) {
        let mut k = vec![0f32; bytes.len() * 8 / BITS];
        self.codes_row::<BITS>(bytes, &mut k);
        self.dots(q, w, &k, out, stride);
    }
    /// [`RowKernel::weighted_sum`] over value rows held as codes (as in
    /// [`RowKernel::dots_codes`]).
    fn weighted_sum_codes<const BITS: usize>(
        self,
        p: &[f32],
        stride: usize,
        bytes: &[u8],
        w: usize,
        cols: Range<usize>,
        acc: &mut [f32],
    ) {
        let mut v = vec![0f32; bytes.len() * 8 / BITS];
        self.codes_row::<BITS>(bytes, &mut v);
        self.weighted_sum(p, stride, &v, w, cols, acc);
    }
    /// [`RowKernel::weighted_sum`] over binary16 values.
    fn weighted_sum_f16(
        self,
        p: &[f32],
        stride: usize,
        vals: &[u16],
        w: usize,
        cols: Range<usize>,
        acc: &mut [f32],
    ) {
        let mut v = vec![0f32; vals.len()];
        self.f16_row(vals, &mut v);
        self.weighted_sum(p, stride, &v, w, cols, acc);
    }
}

/// Plain loops: the portable version and the reference.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plain;

impl RowKernel for Plain {
    #[inline(always)]
    fn f16_row(self, src: &[u16], dst: &mut [f32]) {
        for (o, &h) in dst.iter_mut().zip(src) {
            *o = f16_to_f32(h);
        }
    }

    #[inline(always)]
    fn codes_row<const BITS: usize>(self, bytes: &[u8], dst: &mut [f32]) {
        let mask = (1u32 << BITS) - 1;
        let per = 32 / BITS;
        for (word, o) in bytes.chunks_exact(4).zip(dst.chunks_exact_mut(per)) {
            let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            for (i, o) in o.iter_mut().enumerate() {
                *o = ((w >> (BITS * i)) & mask) as i32 as f32;
            }
        }
    }

    #[inline(always)]
    fn fma_row(self, x: &mut [f32], s: &[f32], m: &[f32]) {
        for ((x, s), m) in x.iter_mut().zip(s).zip(m) {
            *x = *x * s + m;
        }
    }

    #[inline(always)]
    fn scale_add(self, x: &mut [f32], s: f32, m: f32) {
        for x in x.iter_mut() {
            *x = *x * s + m;
        }
    }

    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        crate::host::dot(a, b)
    }

    #[inline(always)]
    fn axpy(self, o: &mut [f32], a: f32, x: &[f32]) {
        crate::host::axpy(o, a, x);
    }

    #[inline(always)]
    fn exp_shifted(self, x: &mut [f32], shift: f32) -> f32 {
        for v in x.iter_mut() {
            *v = exp(*v - shift);
        }
        // Eight partial sums: a single running sum would keep the loop above from vectorising.
        let mut lanes = [0f32; 8];
        let chunks = x.chunks_exact(8);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l += v;
            }
        }
        lanes.iter().sum::<f32>() + tail
    }
}

/// `e^x` for softmax arguments (`x ≤ 0`; below −87 it is 0): Cephes' `expf` reduction
/// `2^k · e^r` with `|r| ≤ ln2/2` and a degree-6 polynomial (relative error ~1e-7), written
/// as straight-line float code so loops over it vectorise.
#[inline(always)]
pub fn exp(x0: f32) -> f32 {
    let x = x0.max(-87.0);
    // Round to nearest by adding and subtracting 1.5·2^23 (no libm call, vectorises). The
    // sum's low mantissa bits hold k itself, so 2^k is built by integer arithmetic: an `as
    // i32` cast would saturate, which compiles to one scalar conversion per lane.
    let biased = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let k = biased - 12_582_912.0;
    let r = x - k * 0.693_359_4 + k * 2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    let k_bits = biased.to_bits().wrapping_sub(0x4B40_0000);
    let e = f32::from_bits(e.to_bits().wrapping_add(k_bits << 23));
    if x0 < -87.0 { 0.0 } else { e }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::{Avx2, HardHalf, SoftHalf, hsum4};

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Plain, RowKernel};
    use crate::host_wide as wide;
    use core::arch::x86_64::{__m128i, __m256, __m256i};
    use pulp::x86::{V3, V4};
    use std::ops::Range;

    /// AVX2/FMA kernels (x86-64 CPUs that have them, detected at run time), widening fp16
    /// with `H`.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx2<H = SoftHalf>(pub(crate) V3, pub(crate) H);

    /// How eight binary16 values become f32 (exactly).
    pub(crate) trait WidenHalf: Copy {
        fn f16x8(self, simd: V3, h: &[u16]) -> __m256;
        /// The AVX-512 token, where the CPU has it: the decode tiles then run sixteen lanes
        /// wide ([`crate::host_wide`]).
        #[inline(always)]
        fn wide(self) -> Option<V4> {
            None
        }
    }

    /// Integer arithmetic: normal numbers rebias their exponent, zero and subnormals are
    /// `mantissa · 2^-24`. For AVX2 CPUs, where pulp offers no F16C token.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct SoftHalf;

    impl WidenHalf for SoftHalf {
        #[inline(always)]
        fn f16x8(self, simd: V3, h: &[u16]) -> __m256 {
            let V3 { avx, avx2, .. } = simd;
            let a: [u16; 8] = h[..8].try_into().unwrap_or([0; 8]);
            let x = avx2._mm256_cvtepu16_epi32(pulp::cast::<[u16; 8], __m128i>(a));
            let c = |v: i32| avx._mm256_set1_epi32(v);
            let sign = avx2._mm256_slli_epi32::<16>(avx2._mm256_and_si256(x, c(0x8000)));
            let em = avx2._mm256_and_si256(x, c(0x7fff));
            let normal = avx2._mm256_add_epi32(avx2._mm256_slli_epi32::<13>(em), c(112 << 23));
            let sub = avx._mm256_mul_ps(
                avx._mm256_cvtepi32_ps(avx2._mm256_and_si256(x, c(0x3ff))),
                avx._mm256_set1_ps(5.960_464_5e-8),
            );
            let is_sub = avx2._mm256_cmpeq_epi32(avx2._mm256_and_si256(x, c(0x7c00)), c(0));
            let mag = avx._mm256_blendv_ps(
                pulp::cast::<__m256i, __m256>(normal),
                sub,
                pulp::cast::<__m256i, __m256>(is_sub),
            );
            avx._mm256_or_ps(mag, pulp::cast::<__m256i, __m256>(sign))
        }
    }

    /// The hardware conversion (`vcvtph2ps`), reached through pulp's AVX-512 token: one
    /// instruction for eight values where [`SoftHalf`] takes ten, and fp16 rows are what the
    /// full cache and every scale are stored as.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct HardHalf(pub(crate) V4);

    impl WidenHalf for HardHalf {
        #[inline(always)]
        fn f16x8(self, _simd: V3, h: &[u16]) -> __m256 {
            let a: [u16; 8] = h[..8].try_into().unwrap_or([0; 8]);
            self.0
                .avx512f
                ._mm256_maskz_cvtph_ps(0xff, pulp::cast::<[u16; 8], __m128i>(a))
        }

        #[inline(always)]
        fn wide(self) -> Option<V4> {
            Some(self.0)
        }
    }

    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        let a: [f32; 8] = pulp::cast(v);
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }

    /// The four horizontal sums of four vectors, reduced together.
    #[inline(always)]
    pub(crate) fn hsum4(simd: V3, a: [__m256; 4]) -> [f32; 4] {
        let V3 { sse, avx, .. } = simd;
        let t0 = avx._mm256_hadd_ps(a[0], a[1]);
        let t1 = avx._mm256_hadd_ps(a[2], a[3]);
        let t = avx._mm256_hadd_ps(t0, t1);
        let s = sse._mm_add_ps(
            avx._mm256_castps256_ps128(t),
            avx._mm256_extractf128_ps::<1>(t),
        );
        pulp::cast(s)
    }

    #[inline(always)]
    fn load8(x: &[f32]) -> __m256 {
        let (a, _) = x.split_first_chunk::<8>().unwrap_or((&[0.0; 8], &[]));
        pulp::cast(*a)
    }

    #[inline(always)]
    fn store8(v: __m256, x: &mut [f32]) {
        if let Some((a, _)) = x.split_first_chunk_mut::<8>() {
            *a = pulp::cast(v);
        }
    }

    impl<H: WidenHalf> Avx2<H> {
        #[inline(always)]
        fn f16x8(self, h: &[u16]) -> __m256 {
            self.1.f16x8(self.0, h)
        }
    }

    impl<H: WidenHalf> RowKernel for Avx2<H> {
        #[inline(always)]
        fn f16_row(self, src: &[u16], dst: &mut [f32]) {
            let n = dst.len().min(src.len());
            let whole = n / 8 * 8;
            for (s, d) in src[..whole]
                .chunks_exact(8)
                .zip(dst[..whole].chunks_exact_mut(8))
            {
                store8(self.f16x8(s), d);
            }
            Plain.f16_row(&src[whole..n], &mut dst[whole..n]);
        }

        #[inline(always)]
        fn codes_row<const BITS: usize>(self, bytes: &[u8], dst: &mut [f32]) {
            let V3 { avx, avx2, .. } = self.0;
            if BITS == 8 {
                let whole = dst.len() / 8 * 8;
                for (b, d) in bytes[..whole]
                    .chunks_exact(8)
                    .zip(dst[..whole].chunks_exact_mut(8))
                {
                    let mut a = [0u8; 16];
                    a[..8].copy_from_slice(b);
                    let x = avx2._mm256_cvtepu8_epi32(pulp::cast::<[u8; 16], __m128i>(a));
                    store8(avx._mm256_cvtepi32_ps(x), d);
                }
                Plain.codes_row::<8>(&bytes[whole..], &mut dst[whole..]);
                return;
            }
            // 2 or 4 bits: a word holds 16 or 8 codes; each run of 8 lanes shifts the
            // broadcast word by its lanes' offsets.
            let mask = avx._mm256_set1_epi32((1 << BITS) - 1);
            let shifts = |first: i32| {
                let s: [i32; 8] = core::array::from_fn(|i| first + (BITS * i) as i32);
                pulp::cast::<[i32; 8], __m256i>(s)
            };
            let (lo, hi) = (shifts(0), shifts(8 * BITS as i32));
            let per = 32 / BITS;
            for (word, d) in bytes.chunks_exact(4).zip(dst.chunks_exact_mut(per)) {
                let w = i32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                let x = avx._mm256_set1_epi32(w);
                let a = avx2._mm256_and_si256(avx2._mm256_srlv_epi32(x, lo), mask);
                store8(avx._mm256_cvtepi32_ps(a), &mut d[..8]);
                if per == 16 {
                    let b = avx2._mm256_and_si256(avx2._mm256_srlv_epi32(x, hi), mask);
                    store8(avx._mm256_cvtepi32_ps(b), &mut d[8..]);
                }
            }
        }

        #[inline(always)]
        fn fma_row(self, x: &mut [f32], s: &[f32], m: &[f32]) {
            let V3 { fma, .. } = self.0;
            let whole = x.len() / 8 * 8;
            for ((x, s), m) in x[..whole]
                .chunks_exact_mut(8)
                .zip(s.chunks_exact(8))
                .zip(m.chunks_exact(8))
            {
                store8(fma._mm256_fmadd_ps(load8(x), load8(s), load8(m)), x);
            }
            Plain.fma_row(&mut x[whole..], &s[whole..], &m[whole..]);
        }

        #[inline(always)]
        fn scale_add(self, x: &mut [f32], s: f32, m: f32) {
            let V3 { avx, fma, .. } = self.0;
            let (sv, mv) = (avx._mm256_set1_ps(s), avx._mm256_set1_ps(m));
            let whole = x.len() / 8 * 8;
            for x in x[..whole].chunks_exact_mut(8) {
                store8(fma._mm256_fmadd_ps(load8(x), sv, mv), x);
            }
            Plain.scale_add(&mut x[whole..], s, m);
        }

        #[inline(always)]
        fn dot(self, a: &[f32], b: &[f32]) -> f32 {
            let V3 { avx, fma, .. } = self.0;
            let n = a.len().min(b.len());
            let whole = n / 16 * 16;
            let (mut s0, mut s1) = (avx._mm256_setzero_ps(), avx._mm256_setzero_ps());
            for (x, y) in a[..whole].chunks_exact(16).zip(b[..whole].chunks_exact(16)) {
                s0 = fma._mm256_fmadd_ps(load8(x), load8(y), s0);
                s1 = fma._mm256_fmadd_ps(load8(&x[8..]), load8(&y[8..]), s1);
            }
            let mut s = hsum(avx._mm256_add_ps(s0, s1));
            for (x, y) in a[whole..n].iter().zip(&b[whole..n]) {
                s += x * y;
            }
            s
        }

        #[inline(always)]
        fn axpy(self, o: &mut [f32], a: f32, x: &[f32]) {
            let V3 { avx, fma, .. } = self.0;
            let av = avx._mm256_set1_ps(a);
            let whole = o.len().min(x.len()) / 8 * 8;
            for (o, x) in o[..whole].chunks_exact_mut(8).zip(x.chunks_exact(8)) {
                store8(fma._mm256_fmadd_ps(av, load8(x), load8(o)), o);
            }
            Plain.axpy(&mut o[whole..], a, &x[whole..]);
        }

        #[inline(always)]
        fn exp_shifted(self, x: &mut [f32], shift: f32) -> f32 {
            // The plain polynomial vectorises inside the AVX2 dispatch.
            Plain.exp_shifted(x, shift)
        }

        /// Tiles of four keys × up to three query rows: twelve independent accumulators per
        /// chunk of eight channels (a single dot product would wait on its own FMA chain),
        /// and four keys' sums reduced together.
        #[inline(always)]
        fn dots(self, q: &[f32], w: usize, keys: &[f32], out: &mut [f32], stride: usize) {
            if !w.is_multiple_of(8) {
                return Plain.dots(q, w, keys, out, stride);
            }
            self.dots_on(q, w, F32Rows(keys), keys.len() / w, out, stride);
        }

        /// As [`RowKernel::dots`], each key widened as it is loaded: no f32 copy of a key is
        /// written and read back.
        #[inline(always)]
        fn dots_f16(self, q: &[f32], w: usize, keys: &[u16], out: &mut [f32], stride: usize) {
            if let Some(v4) = self.1.wide().filter(|_| wide::fits(w)) {
                return wide::dots(v4, q, w, wide::Half16(keys), keys.len() / w, out, stride);
            }
            if !w.is_multiple_of(8) {
                return Plain.dots_f16(q, w, keys, out, stride);
            }
            self.dots_on(q, w, F16Rows(keys, self), keys.len() / w, out, stride);
        }

        /// Accumulators for three rows × 16 channels live in registers across every value row
        /// (six accumulators, two value vectors and three weights: wider tiles spill to the
        /// stack and chain every row through a store and a load).
        #[inline(always)]
        fn weighted_sum(
            self,
            p: &[f32],
            stride: usize,
            vals: &[f32],
            w: usize,
            cols: Range<usize>,
            acc: &mut [f32],
        ) {
            if !aligned(w, &cols) {
                return Plain.weighted_sum(p, stride, vals, w, cols, acc);
            }
            self.weighted_on(p, stride, F32Rows(vals), vals.len() / w, w, cols, acc);
        }

        /// As [`RowKernel::weighted_sum`], each value row widened as it is loaded.
        #[inline(always)]
        fn weighted_sum_f16(
            self,
            p: &[f32],
            stride: usize,
            vals: &[u16],
            w: usize,
            cols: Range<usize>,
            acc: &mut [f32],
        ) {
            if let Some(v4) = self.1.wide().filter(|_| wide::fits_cols(w, &cols)) {
                let m = vals.len() / w;
                return wide::weighted_sum(v4, p, stride, wide::Half16(vals), m, w, cols, acc);
            }
            if !aligned(w, &cols) {
                return Plain.weighted_sum_f16(p, stride, vals, w, cols, acc);
            }
            self.weighted_on(p, stride, F16Rows(vals, self), vals.len() / w, w, cols, acc);
        }

        /// As [`RowKernel::dots`], each key's codes unpacked as they are loaded.
        #[inline(always)]
        fn dots_codes<const BITS: usize>(
            self,
            q: &[f32],
            w: usize,
            bytes: &[u8],
            out: &mut [f32],
            stride: usize,
        ) {
            let m = bytes.len() * 8 / BITS / w;
            if let Some(v4) = self.1.wide().filter(|_| wide::fits(w)) {
                let keys = wide::Codes16::<BITS>(bytes);
                return wide::dots(v4, q, w, keys, m, out, stride);
            }
            if !w.is_multiple_of(8) {
                return Plain.dots_codes::<BITS>(q, w, bytes, out, stride);
            }
            self.dots_on(q, w, CodeRows::<BITS>(bytes, self.0), m, out, stride);
        }

        /// As [`RowKernel::weighted_sum`], each value row's codes unpacked as they are loaded.
        #[inline(always)]
        fn weighted_sum_codes<const BITS: usize>(
            self,
            p: &[f32],
            stride: usize,
            bytes: &[u8],
            w: usize,
            cols: Range<usize>,
            acc: &mut [f32],
        ) {
            let m = bytes.len() * 8 / BITS / w;
            if let Some(v4) = self.1.wide().filter(|_| wide::fits_cols(w, &cols)) {
                let vals = wide::Codes16::<BITS>(bytes);
                return wide::weighted_sum(v4, p, stride, vals, m, w, cols, acc);
            }
            if !aligned(w, &cols) {
                return Plain.weighted_sum_codes::<BITS>(p, stride, bytes, w, cols, acc);
            }
            let vals = CodeRows::<BITS>(bytes, self.0);
            self.weighted_on(p, stride, vals, m, w, cols, acc);
        }
    }

    /// Whether rows of `w` and the columns `cols` fall on whole vectors of eight.
    fn aligned(w: usize, cols: &Range<usize>) -> bool {
        w.is_multiple_of(8) && cols.start.is_multiple_of(8) && cols.end.is_multiple_of(8)
    }

    /// Rows a tile reads eight lanes at a time, flat (`row · w + channel`).
    trait Lanes: Copy {
        fn at(self, i: usize) -> __m256;
    }

    #[derive(Clone, Copy)]
    struct F32Rows<'a>(&'a [f32]);

    impl Lanes for F32Rows<'_> {
        #[inline(always)]
        fn at(self, i: usize) -> __m256 {
            load8(&self.0[i..])
        }
    }

    /// Binary16 rows, widened on load.
    #[derive(Clone, Copy)]
    struct F16Rows<'a, H>(&'a [u16], Avx2<H>);

    impl<H: WidenHalf> Lanes for F16Rows<'_, H> {
        #[inline(always)]
        fn at(self, i: usize) -> __m256 {
            self.1.f16x8(&self.0[i..])
        }
    }

    /// `BITS`-bit codes (2, 4 or 8) packed little-endian in words, unpacked on load: eight
    /// codes from a broadcast word shifted by each lane's offset (`vpsrlvd`), or from eight
    /// bytes widened (`vpmovzxbd`).
    #[derive(Clone, Copy)]
    struct CodeRows<'a, const BITS: usize>(&'a [u8], V3);

    impl<const BITS: usize> Lanes for CodeRows<'_, BITS> {
        #[inline(always)]
        fn at(self, i: usize) -> __m256 {
            let V3 { avx, avx2, .. } = self.1;
            if BITS == 8 {
                let mut a = [0u8; 16];
                a[..8].copy_from_slice(&self.0[i..i + 8]);
                let x = avx2._mm256_cvtepu8_epi32(pulp::cast::<[u8; 16], __m128i>(a));
                return avx._mm256_cvtepi32_ps(x);
            }
            let per = 32 / BITS;
            let at = i / per * 4;
            let b = &self.0[at..at + 4];
            // Eight codes start at the word's first code or, for 2-bit codes (sixteen to a
            // word), possibly at its ninth: the word is shifted there as a scalar, so the lane
            // offsets stay one constant vector.
            let word = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> ((i % per) * BITS);
            let word = avx._mm256_set1_epi32(word as i32);
            let bb = BITS as i32;
            let shifts = [0, bb, 2 * bb, 3 * bb, 4 * bb, 5 * bb, 6 * bb, 7 * bb];
            let mask = avx._mm256_set1_epi32((1 << BITS) - 1);
            let x = avx2._mm256_srlv_epi32(word, pulp::cast::<[i32; 8], __m256i>(shifts));
            avx._mm256_cvtepi32_ps(avx2._mm256_and_si256(x, mask))
        }
    }

    impl<H: WidenHalf> Avx2<H> {
        /// [`RowKernel::dots`] over `m` keys read through `keys`.
        #[inline(always)]
        fn dots_on<L: Lanes>(
            self,
            q: &[f32],
            w: usize,
            keys: L,
            m: usize,
            out: &mut [f32],
            stride: usize,
        ) {
            let rows = q.len() / w;
            for r0 in (0..rows).step_by(3) {
                let rr = (rows - r0).min(3);
                let qr = &q[r0 * w..];
                let mut j = 0;
                while j < m {
                    let kk = (m - j).min(4);
                    let sums = match (rr, kk) {
                        (3, 4) => self.dot_tile::<3, 4, L>(qr, keys, j, w),
                        (2, 4) => self.dot_tile::<2, 4, L>(qr, keys, j, w),
                        (1, 4) => self.dot_tile::<1, 4, L>(qr, keys, j, w),
                        (3, _) => self.dot_tile::<3, 1, L>(qr, keys, j, w),
                        (2, _) => self.dot_tile::<2, 1, L>(qr, keys, j, w),
                        _ => self.dot_tile::<1, 1, L>(qr, keys, j, w),
                    };
                    let kk = if kk == 4 { 4 } else { 1 };
                    for (i, s) in sums.iter().enumerate().take(rr) {
                        let o = (r0 + i) * stride + j;
                        out[o..o + kk].copy_from_slice(&s[..kk]);
                    }
                    j += kk;
                }
            }
        }

        /// [`RowKernel::weighted_sum`] over `m` value rows read through `vals`.
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        fn weighted_on<L: Lanes>(
            self,
            p: &[f32],
            stride: usize,
            vals: L,
            m: usize,
            w: usize,
            cols: Range<usize>,
            acc: &mut [f32],
        ) {
            let rows = acc.len() / w;
            for r0 in (0..rows).step_by(3) {
                let mut c = cols.start;
                while c < cols.end {
                    let span = if cols.end - c >= 16 { 16 } else { 8 };
                    let at = Tile { r0, c, m, w };
                    match ((rows - r0).min(3), span) {
                        (3, 16) => self.tile::<3, 2, L>(p, stride, vals, acc, at),
                        (2, 16) => self.tile::<2, 2, L>(p, stride, vals, acc, at),
                        (1, 16) => self.tile::<1, 2, L>(p, stride, vals, acc, at),
                        (3, _) => self.tile::<3, 1, L>(p, stride, vals, acc, at),
                        (2, _) => self.tile::<2, 1, L>(p, stride, vals, acc, at),
                        _ => self.tile::<1, 1, L>(p, stride, vals, acc, at),
                    }
                    c += span;
                }
            }
        }
    }

    /// Where a weighted-sum tile sits: first row `r0`, first channel `c`, over `m` value rows
    /// of width `w`.
    #[derive(Clone, Copy)]
    struct Tile {
        r0: usize,
        c: usize,
        m: usize,
        w: usize,
    }

    impl<H: WidenHalf> Avx2<H> {
        /// Dot products of `R` query rows (`q`, rows of `w`) with the `K` (1 or 4) keys from
        /// key `j` of `k`.
        #[inline(always)]
        fn dot_tile<const R: usize, const K: usize, L: Lanes>(
            self,
            q: &[f32],
            k: L,
            j: usize,
            w: usize,
        ) -> [[f32; 4]; 3] {
            let V3 { avx, fma, .. } = self.0;
            let mut acc = [[avx._mm256_setzero_ps(); 4]; R];
            for c in (0..w).step_by(8) {
                // Loops, not `array::from_fn`: a closure's body is compiled outside pulp's
                // target-feature function, and every intrinsic in it would become a call.
                let mut kv = [avx._mm256_setzero_ps(); K];
                for (i, x) in kv.iter_mut().enumerate() {
                    *x = k.at((j + i) * w + c);
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let qv = load8(&q[i * w + c..]);
                    for (x, y) in a.iter_mut().zip(kv) {
                        *x = fma._mm256_fmadd_ps(qv, y, *x);
                    }
                }
            }
            let mut out = [[0f32; 4]; 3];
            for (o, a) in out.iter_mut().zip(acc) {
                *o = hsum4(self.0, a);
            }
            out
        }

        /// Rows `r0..r0 + R` × channels `c..c + 8V` of [`RowKernel::weighted_sum`], the
        /// accumulators held in registers over every value row.
        #[inline(always)]
        fn tile<const R: usize, const V: usize, L: Lanes>(
            self,
            p: &[f32],
            stride: usize,
            vals: L,
            acc: &mut [f32],
            at: Tile,
        ) {
            let V3 { avx, fma, .. } = self.0;
            let Tile { r0, c, m, w } = at;
            let mut a = [[avx._mm256_setzero_ps(); V]; R];
            for (i, ai) in a.iter_mut().enumerate() {
                for (v, x) in ai.iter_mut().enumerate() {
                    *x = load8(&acc[(r0 + i) * w + c + 8 * v..]);
                }
            }
            for j in 0..m {
                let mut x = [avx._mm256_setzero_ps(); V];
                for (v, xv) in x.iter_mut().enumerate() {
                    *xv = vals.at(j * w + c + 8 * v);
                }
                for (i, ai) in a.iter_mut().enumerate() {
                    let pj = avx._mm256_set1_ps(p[(r0 + i) * stride + j]);
                    for (v, y) in ai.iter_mut().enumerate() {
                        *y = fma._mm256_fmadd_ps(pj, x[v], *y);
                    }
                }
            }
            for (i, ai) in a.iter().enumerate() {
                for (v, x) in ai.iter().enumerate() {
                    store8(*x, &mut acc[(r0 + i) * w + c + 8 * v..]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small deterministic generator for the kernel checks.
    #[cfg(target_arch = "x86_64")]
    struct Lcg(u64);

    #[cfg(target_arch = "x86_64")]
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }

        /// `n` values in `[-0.5, 0.5]`.
        fn floats(&mut self, n: usize) -> Vec<f32> {
            (0..n)
                .map(|_| self.next() as f32 / u32::MAX as f32 - 0.5)
                .collect()
        }
    }

    /// Every element of `a` within `tol · (1 + |b|)` of `b`'s.
    #[cfg(target_arch = "x86_64")]
    fn close(a: &[f32], b: &[f32], tol: f32) -> Result<(), TestCaseError> {
        prop_assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            prop_assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{} vs {}", x, y);
        }
        Ok(())
    }

    /// The checks of `avx2_matches_plain` for one SIMD kernel `k`.
    #[cfg(target_arch = "x86_64")]
    fn matches_plain<K: RowKernel>(k: K, seed: u64, w: usize) -> Result<(), TestCaseError> {
        let mut rng = Lcg(seed);
        row_ops_match(k, &mut rng, w)?;
        // Tiles over several query rows and key counts that are not multiples of the tiles.
        let rows = 1 + (seed % 7) as usize;
        let keys = (seed / 7 % 11) as usize;
        let ws = if w.is_multiple_of(2) {
            w / 2 * 8 % 80 + 8
        } else {
            w
        };
        tiles_match(k, &mut rng, rows, keys, ws)
    }

    /// Conversions (exactly) and the one-row primitives (to summation order).
    #[cfg(target_arch = "x86_64")]
    fn row_ops_match<K: RowKernel>(k: K, rng: &mut Lcg, w: usize) -> Result<(), TestCaseError> {
        let halves: Vec<u16> = (0..w)
            .map(|_| rng.next() as u16)
            .filter(|h| h & 0x7c00 != 0x7c00)
            .collect();
        let (mut a, mut b) = (vec![0f32; halves.len()], vec![0f32; halves.len()]);
        k.f16_row(&halves, &mut a);
        Plain.f16_row(&halves, &mut b);
        prop_assert_eq!(&a, &b);
        for (h, x) in halves.iter().zip(&a) {
            prop_assert_eq!(*x, half::f16::from_bits(*h).to_f32());
        }
        let words = w.div_ceil(4) * 4;
        let bytes: Vec<u8> = (0..words).map(|_| rng.next() as u8).collect();
        for bits in [2usize, 4, 8] {
            let n = words * 8 / bits;
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            match bits {
                2 => k.codes_row::<2>(&bytes, &mut a),
                4 => k.codes_row::<4>(&bytes, &mut a),
                _ => k.codes_row::<8>(&bytes, &mut a),
            }
            codes_any(bits, &bytes, &mut b);
            prop_assert_eq!(&a, &b, "{} bits", bits);
        }
        let (x, y) = (rng.floats(w), rng.floats(w));
        close(&[k.dot(&x, &y)], &[Plain.dot(&x, &y)], 1e-5)?;
        let (mut o1, mut o2) = (y.clone(), y.clone());
        k.axpy(&mut o1, 0.3, &x);
        Plain.axpy(&mut o2, 0.3, &x);
        close(&o1, &o2, 1e-6)?;
        let (mut f1, mut f2) = (x.clone(), x.clone());
        k.fma_row(&mut f1, &y, &x);
        Plain.fma_row(&mut f2, &y, &x);
        k.scale_add(&mut f1, 0.7, -0.1);
        Plain.scale_add(&mut f2, 0.7, -0.1);
        close(&f1, &f2, 1e-6)
    }

    /// Tiled dot products and weighted sums of `rows` queries over `keys` rows of width `ws`,
    /// from f32 rows, binary16 rows and packed codes, against the plain loops over f32.
    #[cfg(target_arch = "x86_64")]
    fn tiles_match<K: RowKernel>(
        k: K,
        rng: &mut Lcg,
        rows: usize,
        keys: usize,
        ws: usize,
    ) -> Result<(), TestCaseError> {
        let (q, kv) = (rng.floats(rows * ws), rng.floats(keys * ws));
        // Column ranges on eight-lane and sixteen-lane boundaries (the AVX-512 tiles take
        // only the latter).
        let cols = match (ws % 8, keys % 3) {
            (0, 1) => 8..ws,
            (0, 2) if ws > 16 => 16..ws,
            _ => 0..ws,
        };
        let scores = || vec![0f32; rows * keys];
        let (mut s1, mut s2) = (scores(), scores());
        k.dots(&q, ws, &kv, &mut s1, keys);
        Plain.dots(&q, ws, &kv, &mut s2, keys);
        close(&s1, &s2, 1e-5)?;
        let (mut a1, mut a2) = (q.clone(), q.clone());
        k.weighted_sum(&s1, keys, &kv, ws, cols.clone(), &mut a1);
        Plain.weighted_sum(&s1, keys, &kv, ws, cols.clone(), &mut a2);
        close(&a1, &a2, 1e-5)?;
        // Binary16 keys and values, widened as they are read.
        let kh: Vec<u16> = kv
            .iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect();
        let kw: Vec<f32> = kh
            .iter()
            .map(|&h| half::f16::from_bits(h).to_f32())
            .collect();
        let (mut s3, mut s4) = (scores(), scores());
        k.dots_f16(&q, ws, &kh, &mut s3, keys);
        Plain.dots(&q, ws, &kw, &mut s4, keys);
        close(&s3, &s4, 1e-5)?;
        let (mut a3, mut a4) = (q.clone(), q.clone());
        k.weighted_sum_f16(&s3, keys, &kh, ws, cols.clone(), &mut a3);
        Plain.weighted_sum(&s3, keys, &kw, ws, cols.clone(), &mut a4);
        close(&a3, &a4, 1e-5)?;
        // Packed codes, unpacked as they are read (rows on word boundaries only).
        for bits in [2usize, 4, 8] {
            let m = if ws.is_multiple_of(32 / bits) {
                keys
            } else {
                0
            };
            let packed: Vec<u8> = (0..m * ws * bits / 8).map(|_| rng.next() as u8).collect();
            let mut kw = vec![0f32; m * ws];
            codes_any(bits, &packed, &mut kw);
            let (mut s5, mut s6) = (scores(), scores());
            let (mut a5, mut a6) = (q.clone(), q.clone());
            let c = cols.clone();
            match bits {
                2 => {
                    k.dots_codes::<2>(&q, ws, &packed, &mut s5, keys);
                    k.weighted_sum_codes::<2>(&s3, keys, &packed, ws, c, &mut a5);
                }
                4 => {
                    k.dots_codes::<4>(&q, ws, &packed, &mut s5, keys);
                    k.weighted_sum_codes::<4>(&s3, keys, &packed, ws, c, &mut a5);
                }
                _ => {
                    k.dots_codes::<8>(&q, ws, &packed, &mut s5, keys);
                    k.weighted_sum_codes::<8>(&s3, keys, &packed, ws, c, &mut a5);
                }
            }
            Plain.dots(&q, ws, &kw, &mut s6, keys);
            Plain.weighted_sum(&s3, keys, &kw, ws, cols.clone(), &mut a6);
            // Codes up to 255 scale the summation error.
            let tol = 1e-5 * (1 << bits) as f32;
            close(&s5, &s6, tol)?;
            close(&a5, &a6, tol)?;
        }
        Ok(())
    }

    /// `codes_row` for a run-time width, through the plain loops.
    #[cfg(target_arch = "x86_64")]
    fn codes_any(bits: usize, bytes: &[u8], out: &mut [f32]) {
        match bits {
            2 => Plain.codes_row::<2>(bytes, out),
            4 => Plain.codes_row::<4>(bytes, out),
            _ => Plain.codes_row::<8>(bytes, out),
        }
    }

    proptest! {
        /// The AVX2 kernels, with either fp16 widening, compute what the plain loops compute
        /// (exactly for conversions, to float-summation order for dot products).
        #[test]
        fn avx2_matches_plain(seed in 0u64..10_000, w in 1usize..100) {
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = pulp::x86::V3::try_new() {
                matches_plain(Avx2(simd, SoftHalf), seed, w)?;
            }
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = pulp::x86::V4::try_new() {
                matches_plain(Avx2(*simd, HardHalf(simd)), seed, w)?;
            }
        }

        /// The polynomial `exp` is within 2e-7 relative of the library's over softmax arguments
        /// (below e^-87 it flushes to 0).
        #[test]
        fn exp_is_accurate(x in -100f32..0.0) {
            let (got, want) = (exp(x), x.exp());
            prop_assert!((got - want).abs() <= 2e-7 * want + 1e-37, "{} vs {}", got, want);
        }
    }
}
