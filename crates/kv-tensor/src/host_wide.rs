//! AVX-512 tiles for the decode attention's grouped query rows, sixteen channels to a vector.
//!
//! A decode step multiplies each stored key and value row with the few query rows of its
//! group (three for SmolLM2), so the AVX2 tiles of [`crate::host_kernels`] spend most of their
//! issue slots on eight-lane FMAs and on unpacking codes, not on waiting for memory. Here every
//! FMA covers sixteen lanes, and 2- and 4-bit codes are unpacked without an integer-to-float
//! conversion: each lane's code is rotated into the mantissa of 1.0 (`vprolvd`) and masked in
//! with one `vpternlogd`, so the lane holds `1 + c / 2^BITS`. The affine correction this
//! leaves is applied once per dot product (scores) or once per tile (value sums), never per
//! element.
use core::arch::x86_64::{__m512, __m512i};
use pulp::x86::V4;
use std::ops::Range;

/// Rows a tile reads sixteen lanes at a time, as lanes that hold `OFFSET + x / SCALE` for the
/// stored value `x`.
pub(crate) trait Lanes16: Copy {
    const SCALE: f32;
    const OFFSET: f32;
    /// Row `j` of rows `w` wide, alone (so a tile's loads are checked once per row).
    fn row(self, j: usize, w: usize) -> Self;
    /// The sixteen values from index `i` (a multiple of sixteen).
    fn at(self, simd: V4, i: usize) -> __m512;
}

/// A row width in vectors of sixteen: [`Fixed`] for the head dimensions and ranks the models
/// use, so the tiles' loops unroll and their index checks fold away, or [`Any`].
pub(crate) trait Width: Copy {
    fn vectors(self) -> usize;
}

#[derive(Clone, Copy)]
pub(crate) struct Fixed<const C: usize>;

impl<const C: usize> Width for Fixed<C> {
    #[inline(always)]
    fn vectors(self) -> usize {
        C
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Any(usize);

impl Width for Any {
    #[inline(always)]
    fn vectors(self) -> usize {
        self.0
    }
}

/// Binary16 rows, widened on load (`vcvtph2ps`).
#[derive(Clone, Copy)]
pub(crate) struct Half16<'a>(pub(crate) &'a [u16]);

impl Lanes16 for Half16<'_> {
    const SCALE: f32 = 1.0;
    const OFFSET: f32 = 0.0;

    #[inline(always)]
    fn row(self, j: usize, w: usize) -> Self {
        Self(&self.0[j * w..(j + 1) * w])
    }

    #[inline(always)]
    fn at(self, simd: V4, i: usize) -> __m512 {
        let a: [u16; 16] = self.0[i..i + 16].try_into().unwrap_or([0; 16]);
        simd.avx512f._mm512_cvtph_ps(pulp::cast(a))
    }
}

/// `BITS`-bit codes (2, 4 or 8) packed little-endian in words: 2- and 4-bit codes become
/// `1 + c / 2^BITS` by rotation and one bit-select, 8-bit codes their value (widened and
/// converted).
#[derive(Clone, Copy)]
pub(crate) struct Codes16<'a, const BITS: usize>(pub(crate) &'a [u8]);

/// The float 1.0, whose mantissa the codes are rotated into.
const ONE: i32 = 0x3F80_0000;

impl<const BITS: usize> Codes16<'_, BITS> {
    /// Per-lane left rotations that bring lane `i`'s code (index `i % per` of its word) to
    /// the top of the mantissa, bits `23 − BITS .. 23`.
    #[inline(always)]
    fn rotations() -> [i32; 16] {
        let per = 32 / BITS;
        let mut r = [0i32; 16];
        for (i, x) in r.iter_mut().enumerate() {
            *x = (23 - BITS as i32 - (BITS * (i % per)) as i32).rem_euclid(32);
        }
        r
    }
}

impl<const BITS: usize> Lanes16 for Codes16<'_, BITS> {
    const SCALE: f32 = if BITS == 8 {
        1.0
    } else {
        (1u32 << BITS) as f32
    };
    const OFFSET: f32 = if BITS == 8 { 0.0 } else { 1.0 };

    #[inline(always)]
    fn row(self, j: usize, w: usize) -> Self {
        let n = w * BITS / 8;
        Self(&self.0[j * n..(j + 1) * n])
    }

    #[inline(always)]
    fn at(self, simd: V4, i: usize) -> __m512 {
        let f = simd.avx512f;
        let at = i * BITS / 8;
        let word = match BITS {
            8 => {
                let a: [u8; 16] = self.0[at..at + 16].try_into().unwrap_or([0; 16]);
                return f._mm512_cvtepi32_ps(f._mm512_cvtepu8_epi32(pulp::cast(a)));
            }
            // Sixteen codes, one word: every lane gets the word.
            2 => {
                let a: [u8; 4] = self.0[at..at + 4].try_into().unwrap_or([0; 4]);
                f._mm512_set1_epi32(i32::from_le_bytes(a))
            }
            // Two words: lanes 0–7 get the first, 8–15 the second.
            _ => {
                let a: [u8; 8] = self.0[at..at + 8].try_into().unwrap_or([0; 8]);
                let both = f._mm512_set1_epi64(i64::from_le_bytes(a));
                let halves = [0i32, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
                f._mm512_permutexvar_epi32(pulp::cast(halves), both)
            }
        };
        let rotated = f._mm512_rolv_epi32(word, pulp::cast(Self::rotations()));
        let mask = f._mm512_set1_epi32(((1 << BITS) - 1) << (23 - BITS));
        // (rotated & mask) | 1.0
        let x = f._mm512_ternarylogic_epi32::<0xEA>(rotated, mask, f._mm512_set1_epi32(ONE));
        pulp::cast::<__m512i, __m512>(x)
    }
}

#[inline(always)]
fn load16(x: &[f32]) -> [f32; 16] {
    let (a, _) = x.split_first_chunk::<16>().unwrap_or((&[0.0; 16], &[]));
    *a
}

/// `Σ x`, sixteen lanes at a time (a single running sum is a chain of dependent adds).
#[inline(always)]
fn sum(simd: V4, x: &[f32]) -> f32 {
    let f = simd.avx512f;
    let mut acc = f._mm512_setzero_ps();
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        acc = f._mm512_add_ps(acc, pulp::cast(load16(c)));
    }
    f._mm512_reduce_add_ps(acc) + tail
}

/// Whether rows of `w` fall on whole vectors.
#[inline(always)]
pub(crate) fn fits(w: usize) -> bool {
    w.is_multiple_of(16)
}

/// Whether rows of `w` and the columns `cols` of a value sum fall on whole vectors.
#[inline(always)]
pub(crate) fn fits_cols(w: usize, cols: &Range<usize>) -> bool {
    fits(w) && cols.start.is_multiple_of(16) && cols.end.is_multiple_of(16)
}

/// Scores of the `q.len() / w` query rows against `m` keys read through `keys`:
/// `out[r·stride + j] = q_r · key_j` (`w` a multiple of sixteen).
#[inline(always)]
pub(crate) fn dots<L: Lanes16>(
    simd: V4,
    q: &[f32],
    w: usize,
    keys: L,
    m: usize,
    out: &mut [f32],
    stride: usize,
) {
    let rows = q.len() / w;
    let at = Dots { m, stride };
    for r0 in (0..rows).step_by(4) {
        let rr = (rows - r0).min(4);
        let qr = &q[r0 * w..(r0 + rr) * w];
        let out = &mut out[r0 * stride..];
        match (rr, w / 16) {
            (4, 4) => dot_rows::<4, _, L>(simd, qr, Fixed::<4>, keys, out, at),
            (3, 4) => dot_rows::<3, _, L>(simd, qr, Fixed::<4>, keys, out, at),
            (2, 4) => dot_rows::<2, _, L>(simd, qr, Fixed::<4>, keys, out, at),
            (1, 4) => dot_rows::<1, _, L>(simd, qr, Fixed::<4>, keys, out, at),
            (4, 2) => dot_rows::<4, _, L>(simd, qr, Fixed::<2>, keys, out, at),
            (3, 2) => dot_rows::<3, _, L>(simd, qr, Fixed::<2>, keys, out, at),
            (2, 2) => dot_rows::<2, _, L>(simd, qr, Fixed::<2>, keys, out, at),
            (1, 2) => dot_rows::<1, _, L>(simd, qr, Fixed::<2>, keys, out, at),
            (4, c) => dot_rows::<4, _, L>(simd, qr, Any(c), keys, out, at),
            (3, c) => dot_rows::<3, _, L>(simd, qr, Any(c), keys, out, at),
            (2, c) => dot_rows::<2, _, L>(simd, qr, Any(c), keys, out, at),
            (_, c) => dot_rows::<1, _, L>(simd, qr, Any(c), keys, out, at),
        }
    }
}

/// The keys a [`dots`] call scores and the row stride of its output.
#[derive(Clone, Copy)]
struct Dots {
    m: usize,
    stride: usize,
}

/// [`dots`] for `R` query rows, four keys at a time and then one.
#[inline(always)]
fn dot_rows<const R: usize, W: Width, L: Lanes16>(
    simd: V4,
    q: &[f32],
    width: W,
    keys: L,
    out: &mut [f32],
    at: Dots,
) {
    let Dots { m, stride } = at;
    let w = 16 * width.vectors();
    let q = &q[..R * w];
    // q · key = SCALE · (q · lanes − OFFSET · Σ q).
    let mut bias = [0f32; R];
    if L::OFFSET != 0.0 {
        for (b, row) in bias.iter_mut().zip(q.chunks_exact(w)) {
            *b = L::OFFSET * sum(simd, row);
        }
    }
    let mut j = 0;
    while j < m {
        let (sums, kk) = if m - j >= 4 {
            let mut k = [keys; 4];
            for (i, x) in k.iter_mut().enumerate() {
                *x = keys.row(j + i, w);
            }
            (dot_tile::<R, 4, W, L>(simd, q, width, k), 4)
        } else {
            (dot_tile::<R, 1, W, L>(simd, q, width, [keys.row(j, w)]), 1)
        };
        for (r, s) in sums.iter().enumerate() {
            let o = r * stride + j;
            for (x, &y) in out[o..o + kk].iter_mut().zip(s) {
                *x = L::SCALE * (y - bias[r]);
            }
        }
        j += kk;
    }
}

/// Lane sums of `R` query rows with the `K` (1 or 4) key rows `k`.
#[inline(always)]
fn dot_tile<const R: usize, const K: usize, W: Width, L: Lanes16>(
    simd: V4,
    q: &[f32],
    width: W,
    k: [L; K],
) -> [[f32; 4]; R] {
    let f = simd.avx512f;
    let w = 16 * width.vectors();
    let mut acc = [[f._mm512_setzero_ps(); K]; R];
    for c in 0..width.vectors() {
        // Loops, not `array::from_fn`: a closure's body is compiled outside the target-feature
        // function, and every intrinsic in it would become a call.
        let mut kv = [f._mm512_setzero_ps(); K];
        for (x, row) in kv.iter_mut().zip(k) {
            *x = row.at(simd, 16 * c);
        }
        for (i, a) in acc.iter_mut().enumerate() {
            let qv = pulp::cast(load16(&q[i * w + 16 * c..]));
            for (x, y) in a.iter_mut().zip(kv) {
                *x = f._mm512_fmadd_ps(qv, y, *x);
            }
        }
    }
    let mut out = [[0f32; 4]; R];
    for (o, a) in out.iter_mut().zip(acc) {
        if K == 4 {
            *o = hsum4(simd, [a[0], a[1 % K], a[2 % K], a[3 % K]]);
        } else {
            o[0] = f._mm512_reduce_add_ps(a[0]);
        }
    }
    out
}

/// The four lane sums of four vectors: each folded to eight lanes, then reduced together as
/// the AVX2 tiles reduce theirs.
#[inline(always)]
fn hsum4(simd: V4, a: [__m512; 4]) -> [f32; 4] {
    let (f, dq) = (simd.avx512f, simd.avx512dq);
    let mut h = [simd.avx._mm256_setzero_ps(); 4];
    for (x, v) in h.iter_mut().zip(a) {
        *x = simd.avx._mm256_add_ps(
            f._mm512_castps512_ps256(v),
            dq._mm512_extractf32x8_ps::<1>(v),
        );
    }
    crate::host_kernels::hsum4(*simd, h)
}

/// `acc_r[cols] += Σ_j p[r·stride + j] · vals_j[cols]` over `m` value rows of width `w` read
/// through `vals`, for the `acc.len() / w` rows of `acc` ([`fits`] holds).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn weighted_sum<L: Lanes16>(
    simd: V4,
    p: &[f32],
    stride: usize,
    vals: L,
    m: usize,
    w: usize,
    cols: Range<usize>,
    acc: &mut [f32],
) {
    match w / 16 {
        4 => weighted_on(simd, p, stride, vals, m, Fixed::<4>, cols, acc),
        2 => weighted_on(simd, p, stride, vals, m, Fixed::<2>, cols, acc),
        c => weighted_on(simd, p, stride, vals, m, Any(c), cols, acc),
    }
}

/// [`weighted_sum`] at a row width known to the compiler where it can be.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weighted_on<L: Lanes16, W: Width>(
    simd: V4,
    p: &[f32],
    stride: usize,
    vals: L,
    m: usize,
    width: W,
    cols: Range<usize>,
    acc: &mut [f32],
) {
    let w = 16 * width.vectors();
    let rows = acc.len() / w;
    for r0 in (0..rows).step_by(4) {
        let rr = (rows - r0).min(4);
        let mut c = cols.start;
        while c < cols.end {
            let span = ((cols.end - c) / 16).min(4);
            let at = Tile { r0, c, m, stride };
            match (rr, span) {
                (4, 4) => tile::<4, 4, L, W>(simd, p, vals, width, acc, at),
                (3, 4) => tile::<3, 4, L, W>(simd, p, vals, width, acc, at),
                (2, 4) => tile::<2, 4, L, W>(simd, p, vals, width, acc, at),
                (1, 4) => tile::<1, 4, L, W>(simd, p, vals, width, acc, at),
                (4, 2 | 3) => tile::<4, 2, L, W>(simd, p, vals, width, acc, at),
                (3, 2 | 3) => tile::<3, 2, L, W>(simd, p, vals, width, acc, at),
                (2, 2 | 3) => tile::<2, 2, L, W>(simd, p, vals, width, acc, at),
                (1, 2 | 3) => tile::<1, 2, L, W>(simd, p, vals, width, acc, at),
                (4, _) => tile::<4, 1, L, W>(simd, p, vals, width, acc, at),
                (3, _) => tile::<3, 1, L, W>(simd, p, vals, width, acc, at),
                (2, _) => tile::<2, 1, L, W>(simd, p, vals, width, acc, at),
                _ => tile::<1, 1, L, W>(simd, p, vals, width, acc, at),
            }
            c += 16 * if span == 3 { 2 } else { span };
        }
    }
}

/// Where a value-sum tile sits: first row `r0`, first channel `c`, over `m` value rows, with
/// the weights' row stride.
#[derive(Clone, Copy)]
struct Tile {
    r0: usize,
    c: usize,
    m: usize,
    stride: usize,
}

/// Rows `r0..r0 + R` × channels `c..c + 16V` of [`weighted_sum`], summed in registers over
/// every value row and added to `acc` once.
#[inline(always)]
fn tile<const R: usize, const V: usize, L: Lanes16, W: Width>(
    simd: V4,
    p: &[f32],
    vals: L,
    width: W,
    acc: &mut [f32],
    at: Tile,
) {
    let f = simd.avx512f;
    let Tile { r0, c, m, stride } = at;
    let w = 16 * width.vectors();
    let mut pr = [&p[..0]; R];
    for (i, x) in pr.iter_mut().enumerate() {
        *x = &p[(r0 + i) * stride..(r0 + i) * stride + m];
    }
    let mut a = [[f._mm512_setzero_ps(); V]; R];
    for j in 0..m {
        let row = vals.row(j, w);
        let mut x = [f._mm512_setzero_ps(); V];
        for (v, xv) in x.iter_mut().enumerate() {
            *xv = row.at(simd, c + 16 * v);
        }
        for (ai, pi) in a.iter_mut().zip(pr) {
            let pj = f._mm512_set1_ps(pi[j]);
            for (y, xv) in ai.iter_mut().zip(x) {
                *y = f._mm512_fmadd_ps(pj, xv, *y);
            }
        }
    }
    // Σ_j p·x = SCALE · (Σ_j p·lanes − OFFSET · Σ_j p).
    let scale = f._mm512_set1_ps(L::SCALE);
    for (i, (ai, pi)) in a.iter().zip(pr).enumerate() {
        let bias = if L::OFFSET != 0.0 {
            L::OFFSET * sum(simd, pi)
        } else {
            0.0
        };
        let shift = f._mm512_set1_ps(-L::SCALE * bias);
        for (v, x) in ai.iter().enumerate() {
            let o = (r0 + i) * w + c + 16 * v;
            let old = f._mm512_add_ps(pulp::cast(load16(&acc[o..])), shift);
            let new: [f32; 16] = pulp::cast(f._mm512_fmadd_ps(*x, scale, old));
            acc[o..o + 16].copy_from_slice(&new);
        }
    }
}
