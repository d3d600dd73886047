//! Few-query attention over a layer held in host memory, reading every part in its stored form:
//! packed KIVI codes, fp16 rows, low-rank coefficients, ragged heads, the fp16 residual window.
//!
//! Why it reads codes in place: decode attention is bound by the bytes it streams, so a cache k
//! times smaller can only attend up to k times faster if nothing widens it first. Per part:
//! - keys grouped along tokens (KIVI's per-channel keys) fold the group's scale into the query
//!   and its minimum into one constant, `q·(s⊙c + m) = (q⊙s)·c + q·m`, so a key row costs one
//!   dot product against its codes;
//! - values (and keys grouped along channels) are dequantised one row at a time into a buffer
//!   that lives in L1, then added in with the row's softmax weight;
//! - projected keys are scored in the reduced space, `q·(B c) = (Bᵀq)·c`, and projected values
//!   are summed in the reduced space and mapped back once per task;
//! - ragged heads read only their own rows (no padding exists to skip).
//!
//! 2-, 4- and 8-bit codes are read in *plane order*: byte `k` of a row holds the codes of
//! channels `k·P .. k·P + P` (`P = 8 / bits`), so extracting bit-plane `p` of every byte gives
//! the channels `p, P + p, 2P + p, …` as one contiguous run. Instead of shuffling codes back
//! into channel order, the kernels permute the query (and the value accumulator) into plane
//! order once per task, so every inner loop is a contiguous shift-mask-convert-multiply that
//! vectorises. 3-bit codes (ten to a word) and rows that do not start on a word boundary take
//! a scalar path in channel order.
//!
//! Work is split flash-decoding style: one task per KV head and run of at most
//! [`KEYS_PER_TASK`] keys of one part, each producing a partial softmax (row maximum, sum of
//! exponentials, unnormalised output) that [`merge`] combines exactly.
use crate::host::{Prefetch, axpy, dot};
use crate::host_segment::{HostQuant, HostSide, f16_to_f32};
use crate::{CodeBits, GroupAxis};
use rayon::prelude::*;
use std::ops::Range;

/// Keys per task: enough work per task that scheduling is noise, few enough that a 2k-token
/// layer over 3 KV heads makes a couple of dozen tasks for the cores to share.
pub(crate) const KEYS_PER_TASK: usize = 256;

/// How a part's rows are stored (one head's rows, `n × w`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Quant(QuantRows<'a>),
}

/// One head's packed codes: rows `0..n` start at flat code index `first`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuantRows<'a> {
    bytes: &'a [u8],
    first: usize,
    bits: CodeBits,
    /// This head's scales and minimums (see [`HostQuant`]).
    scales: &'a [u16],
    mins: &'a [u16],
    group: usize,
    along: GroupAxis,
}

/// One head's side of one part: `n` rows of width `w` and, when projected, the head's basis
/// `[d][w]` mapping a row back to `d` channels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SideView<'a> {
    pub(crate) rows: Rows<'a>,
    pub(crate) n: usize,
    pub(crate) w: usize,
    pub(crate) basis: Option<&'a [f32]>,
    pub(crate) d: usize,
}

/// Head `bh` (of `h` KV heads per sequence) of a host side holding `n` rows per head.
pub(crate) fn side_view(side: &HostSide, bh: usize, n: usize, h: usize, d: usize) -> SideView<'_> {
    view(side, bh, bh % h, n, d, d)
}

fn view(side: &HostSide, head: usize, kv: usize, n: usize, w: usize, d: usize) -> SideView<'_> {
    let rows = match side {
        HostSide::F32(x) => Rows::F32(&x[head * n * w..(head + 1) * n * w]),
        HostSide::F16(x) => Rows::F16(&x[head * n * w..(head + 1) * n * w]),
        HostSide::Quant(q) => Rows::Quant(QuantRows::head(q, head, n, w)),
        HostSide::Projected {
            coeffs,
            basis,
            d,
            r,
        } => {
            let per = d * r;
            let mut v = view(coeffs, head, kv, n, *r, *d);
            v.basis = Some(&basis[kv * per..(kv + 1) * per]);
            return v;
        }
        HostSide::Ragged(heads) => return view(&heads[head], 0, kv, n, w, d),
    };
    SideView {
        rows,
        n,
        w,
        basis: None,
        d,
    }
}

impl<'a> QuantRows<'a> {
    fn head(q: &'a HostQuant, head: usize, n: usize, w: usize) -> Self {
        let per_head = match q.along {
            GroupAxis::Tokens => n / q.group * w,
            GroupAxis::Channels => n * (w / q.group),
        };
        Self {
            bytes: &q.bytes,
            first: head * n * w,
            bits: q.bits,
            scales: &q.scales[head * per_head..(head + 1) * per_head],
            mins: &q.mins[head * per_head..(head + 1) * per_head],
            group: q.group,
            along: q.along,
        }
    }

    /// Bit-planes per byte when rows can be read in plane order (2, 4 or 8 bits and rows that
    /// start on a word boundary), else 1 with [`QuantRows::aligned`] false.
    fn planes(&self, w: usize) -> Option<usize> {
        let per = self.bits.codes_per_word();
        match self.bits {
            CodeBits::B3 => None,
            b if w.is_multiple_of(per) && self.first.is_multiple_of(per) => {
                Some(8 / b.get() as usize)
            }
            _ => None,
        }
    }

    /// Row `j`'s codes as floats: in plane order (`planes`), or channel order (`None`).
    #[inline(always)]
    fn codes(&self, j: usize, w: usize, planes: Option<usize>, out: &mut [f32]) {
        let bits = self.bits.get() as usize;
        let mask = self.bits.max_code();
        match planes {
            Some(p) => {
                let per_plane = w / p;
                let start = (self.first + j * w) * bits / 8;
                let row = &self.bytes[start..start + per_plane];
                for (plane, dst) in out[..w].chunks_exact_mut(per_plane).enumerate() {
                    let shift = plane * bits;
                    for (o, &byte) in dst.iter_mut().zip(row) {
                        *o = ((u32::from(byte) >> shift) & mask) as f32;
                    }
                }
            }
            None => {
                let per = self.bits.codes_per_word();
                for (c, o) in out[..w].iter_mut().enumerate() {
                    let i = self.first + j * w + c;
                    let at = i / per * 4;
                    let word = u32::from_le_bytes([
                        self.bytes[at],
                        self.bytes[at + 1],
                        self.bytes[at + 2],
                        self.bytes[at + 3],
                    ]);
                    *o = ((word >> (bits * (i % per))) & mask) as f32;
                }
            }
        }
    }

    /// Scale and minimum of row `j` in channel order (`w` values each), as f32.
    fn scale_min(&self, j: usize, w: usize, s: &mut [f32], m: &mut [f32]) {
        match self.along {
            GroupAxis::Tokens => {
                let at = j / self.group * w;
                for c in 0..w {
                    s[c] = f16_to_f32(self.scales[at + c]);
                    m[c] = f16_to_f32(self.mins[at + c]);
                }
            }
            GroupAxis::Channels => {
                let per = w / self.group;
                for c in 0..w {
                    s[c] = f16_to_f32(self.scales[j * per + c / self.group]);
                    m[c] = f16_to_f32(self.mins[j * per + c / self.group]);
                }
            }
        }
    }
}

/// Channel order → plane order (`dst[p·(w/P) + k] = src[k·P + p]`); a copy when `planes` is
/// `None` or 1.
#[inline(always)]
fn to_planes(src: &[f32], planes: Option<usize>, dst: &mut [f32]) {
    match planes {
        Some(p) if p > 1 => {
            let per = src.len() / p;
            for (k, chunk) in src.chunks_exact(p).enumerate() {
                for (plane, &x) in chunk.iter().enumerate() {
                    dst[plane * per + k] = x;
                }
            }
        }
        _ => dst[..src.len()].copy_from_slice(src),
    }
}

/// Plane order → channel order, added into `dst`.
#[inline(always)]
fn add_from_planes(src: &[f32], planes: Option<usize>, dst: &mut [f32]) {
    match planes {
        Some(p) if p > 1 => {
            let per = src.len() / p;
            for (k, chunk) in dst[..src.len()].chunks_exact_mut(p).enumerate() {
                for (plane, x) in chunk.iter_mut().enumerate() {
                    *x += src[plane * per + k];
                }
            }
        }
        _ => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        }
    }
}

impl SideView<'_> {
    /// The order rows are produced in: plane order for fast-path codes.
    fn planes(&self) -> Option<usize> {
        match self.rows {
            Rows::Quant(q) => q.planes(self.w),
            _ => None,
        }
    }

    /// Row `j` dequantised (not projected) into `out[..w]`, in [`SideView::planes`] order;
    /// `s`, `m` are scratch of `w` floats, already holding row `j`'s scale/minimum in that order
    /// when `ready` (keys of one token group share them).
    #[inline(always)]
    fn row(&self, j: usize, s: &mut [f32], m: &mut [f32], out: &mut [f32]) {
        let w = self.w;
        match self.rows {
            Rows::F32(x) => out[..w].copy_from_slice(&x[j * w..(j + 1) * w]),
            Rows::F16(x) => {
                for (o, &h) in out[..w].iter_mut().zip(&x[j * w..(j + 1) * w]) {
                    *o = f16_to_f32(h);
                }
            }
            Rows::Quant(q) => {
                let planes = q.planes(w);
                let mut sn = [0f32; MAX_W];
                let mut mn = [0f32; MAX_W];
                q.scale_min(j, w, &mut sn, &mut mn);
                to_planes(&sn[..w], planes, s);
                to_planes(&mn[..w], planes, m);
                q.codes(j, w, planes, out);
                for c in 0..w {
                    out[c] = out[c] * s[c] + m[c];
                }
            }
        }
    }

    /// Every row decoded to `d` channels (`out`: `n × d`), in channel order.
    pub(crate) fn decode(&self, out: &mut [f32]) {
        let (w, d) = (self.w, self.d);
        let planes = self.planes();
        let (mut s, mut m, mut buf, mut nat) =
            ([0f32; MAX_W], [0f32; MAX_W], [0f32; MAX_W], [0f32; MAX_W]);
        for (j, o) in out.chunks_exact_mut(d).take(self.n).enumerate() {
            self.row(j, &mut s, &mut m, &mut buf);
            nat[..w].fill(0.0);
            add_from_planes(&buf[..w], planes, &mut nat);
            match self.basis {
                Some(b) => {
                    for (c, x) in o.iter_mut().enumerate() {
                        *x = dot(&b[c * w..(c + 1) * w], &nat[..w]);
                    }
                }
                None => o.copy_from_slice(&nat[..d]),
            }
        }
    }
}

/// The widest row a kernel buffers on the stack (head dimensions and ranks up to this).
pub(crate) const MAX_W: usize = 512;

/// One task's partial softmax over its keys (see the module doc): per query row the maximum
/// score over its visible keys, `Σ exp(score − max)` and `Σ exp(score − max)·v` (unnormalised,
/// `d` channels). A row that sees no key of the task has sum 0.
pub(crate) struct Partial {
    pub(crate) max: Vec<f32>,
    pub(crate) sum: Vec<f32>,
    pub(crate) out: Vec<f32>,
}

/// One task: query rows `q` (`rows × d`, channel order) over rows `range` of one head's part.
pub(crate) struct Task<'a> {
    pub(crate) k: SideView<'a>,
    pub(crate) v: SideView<'a>,
    pub(crate) q: &'a [f32],
    pub(crate) range: Range<usize>,
    /// Keys of `range` each query row sees (causality), at most `range.len()`.
    pub(crate) visible: Vec<usize>,
    pub(crate) scale: f32,
}

impl pulp::WithSimd for Task<'_> {
    type Output = Partial;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Partial {
        let d = self.k.d;
        let rows = self.q.len() / d;
        let n = self.range.len();
        let mut scores = vec![0f32; rows * n];
        key_scores(&self, &mut scores);
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        for r in 0..rows {
            let s = &mut scores[r * n..r * n + self.visible[r]];
            max[r] = s.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            for x in s.iter_mut() {
                *x = (*x - max[r]).exp();
                sum[r] += *x;
            }
        }
        let out = value_sums(&self, &scores);
        Partial { max, sum, out }
    }
}

/// `scores[r·n + j]` = scaled dot product of query row `r` with key `range.start + j`.
#[inline(always)]
fn key_scores(t: &Task<'_>, scores: &mut [f32]) {
    let k = &t.k;
    let (d, w) = (k.d, k.w);
    let rows = t.q.len() / d;
    let n = t.range.len();
    let planes = k.planes();
    // Queries in the rows' space (projected: `Bᵀq`) and order (planes), scaled once.
    let mut qs = vec![0f32; rows * w];
    let mut tmp = [0f32; MAX_W];
    for (qr, dst) in t.q.chunks_exact(d).zip(qs.chunks_exact_mut(w)) {
        match k.basis {
            Some(b) => {
                tmp[..w].fill(0.0);
                for (c, &x) in qr.iter().enumerate() {
                    axpy(&mut tmp[..w], x * t.scale, &b[c * w..(c + 1) * w]);
                }
            }
            None => {
                for (o, &x) in tmp[..w].iter_mut().zip(qr) {
                    *o = x * t.scale;
                }
            }
        }
        to_planes(&tmp[..w], planes, dst);
    }
    let pf = Prefetch::new();
    let mut buf = [0f32; MAX_W];
    match k.rows {
        Rows::Quant(q) if q.along == GroupAxis::Tokens => {
            // Fold each token group's scale into the queries and its minimum into a constant.
            let mut folded = vec![0f32; rows * w];
            let mut consts = vec![0f32; rows];
            let (mut s, mut m) = ([0f32; MAX_W], [0f32; MAX_W]);
            let (mut sp, mut mp) = ([0f32; MAX_W], [0f32; MAX_W]);
            let mut group = usize::MAX;
            for j in 0..n {
                let jj = t.range.start + j;
                if jj / q.group != group {
                    group = jj / q.group;
                    q.scale_min(jj, w, &mut s, &mut m);
                    to_planes(&s[..w], planes, &mut sp);
                    to_planes(&m[..w], planes, &mut mp);
                    for r in 0..rows {
                        let qr = &qs[r * w..(r + 1) * w];
                        for c in 0..w {
                            folded[r * w + c] = qr[c] * sp[c];
                        }
                        consts[r] = dot(qr, &mp[..w]);
                    }
                }
                pf.line(
                    q.bytes,
                    (q.first + (jj + 4) * w) * q.bits.get() as usize / 8,
                );
                q.codes(jj, w, planes, &mut buf);
                for r in 0..rows {
                    scores[r * n + j] = dot(&folded[r * w..(r + 1) * w], &buf[..w]) + consts[r];
                }
            }
        }
        _ => {
            let (mut s, mut m) = ([0f32; MAX_W], [0f32; MAX_W]);
            for j in 0..n {
                let jj = t.range.start + j;
                prefetch_row(pf, &k.rows, jj + 4, w);
                k.row(jj, &mut s, &mut m, &mut buf);
                for r in 0..rows {
                    scores[r * n + j] = dot(&qs[r * w..(r + 1) * w], &buf[..w]);
                }
            }
        }
    }
}

/// Asks for row `j` of a float side ahead of its use.
#[inline(always)]
fn prefetch_row(pf: Prefetch, rows: &Rows<'_>, j: usize, w: usize) {
    match rows {
        Rows::F32(x) => {
            for l in (0..w).step_by(16) {
                pf.line(x, j * w + l);
            }
        }
        Rows::F16(x) => {
            for l in (0..w).step_by(32) {
                pf.line(x, j * w + l);
            }
        }
        Rows::Quant(_) => {}
    }
}

/// `Σ_j p[r][j] · v_j` over the visible keys of each row, in channel order (`rows × d`).
#[inline(always)]
fn value_sums(t: &Task<'_>, p: &[f32]) -> Vec<f32> {
    let v = &t.v;
    let (d, w) = (v.d, v.w);
    let rows = t.q.len() / d;
    let n = t.range.len();
    let planes = v.planes();
    let mut acc = vec![0f32; rows * w];
    let (mut s, mut m, mut buf) = ([0f32; MAX_W], [0f32; MAX_W], [0f32; MAX_W]);
    let pf = Prefetch::new();
    let seen = t.visible.iter().copied().max().unwrap_or(0);
    for j in 0..seen {
        let jj = t.range.start + j;
        prefetch_row(pf, &v.rows, jj + 4, w);
        v.row(jj, &mut s, &mut m, &mut buf);
        for r in 0..rows {
            if j < t.visible[r] {
                axpy(&mut acc[r * w..(r + 1) * w], p[r * n + j], &buf[..w]);
            }
        }
    }
    let mut out = vec![0f32; rows * d];
    let mut nat = [0f32; MAX_W];
    for (a, o) in acc.chunks_exact(w).zip(out.chunks_exact_mut(d)) {
        match v.basis {
            Some(b) => {
                nat[..w].fill(0.0);
                add_from_planes(a, planes, &mut nat);
                for (c, x) in o.iter_mut().enumerate() {
                    *x = dot(&b[c * w..(c + 1) * w], &nat[..w]);
                }
            }
            None => add_from_planes(a, planes, o),
        }
    }
    out
}

/// One KV head's part: keys and values of `n` rows, the first at index `offset` of the head's
/// sequence (oldest first).
pub(crate) struct Part<'a> {
    pub(crate) k: SideView<'a>,
    pub(crate) v: SideView<'a>,
    pub(crate) offset: usize,
}

/// Attention of `tq` newest tokens' queries over every head's parts. `q` is `[b·kvh][group ×
/// tq][d]` (the grouped query heads of each KV head, contiguous); `heads[bh]` lists head
/// `bh`'s parts oldest first and `lens[bh]` its total rows. Query `i` of `tq` sees the rows
/// `0 ..= len − tq + i` of its head. Returns the output in `q`'s layout.
pub(crate) fn attend(
    q: &[f32],
    tq: usize,
    d: usize,
    heads: &[Vec<Part<'_>>],
    lens: &[usize],
) -> Vec<f32> {
    let rows = q.len() / d / heads.len();
    let scale = 1.0 / (d as f32).sqrt();
    let mut jobs = Vec::new();
    for (bh, parts) in heads.iter().enumerate() {
        let qh = &q[bh * rows * d..(bh + 1) * rows * d];
        for part in parts {
            let mut start = 0;
            while start < part.k.n {
                let end = (start + KEYS_PER_TASK).min(part.k.n);
                let first = part.offset + start;
                let visible: Vec<usize> = (0..rows)
                    .map(|r| {
                        (lens[bh] - tq + r % tq + 1)
                            .saturating_sub(first)
                            .min(end - start)
                    })
                    .collect();
                if visible.iter().any(|&v| v > 0) {
                    jobs.push((
                        bh,
                        Task {
                            k: part.k,
                            v: part.v,
                            q: qh,
                            range: start..end,
                            visible,
                            scale,
                        },
                    ));
                }
                start = end;
            }
        }
    }
    let partials: Vec<(usize, Partial)> = jobs
        .into_par_iter()
        .map(|(bh, task)| (bh, pulp::Arch::new().dispatch(task)))
        .collect();
    let mut out = vec![0f32; q.len()];
    let mut i = 0;
    for (bh, o) in out.chunks_exact_mut(rows * d).enumerate() {
        let from = i;
        while i < partials.len() && partials[i].0 == bh {
            i += 1;
        }
        merge(partials[from..i].iter().map(|(_, p)| p), o, d);
    }
    out
}

/// Combines partial softmaxes of the same query rows over disjoint keys into the normalised
/// output (`out`: `rows × d`), exactly: each part is rescaled by `exp(max_part − max)`.
pub(crate) fn merge<'p>(
    parts: impl Iterator<Item = &'p Partial> + Clone,
    out: &mut [f32],
    d: usize,
) {
    for (r, o) in out.chunks_exact_mut(d).enumerate() {
        let max = parts
            .clone()
            .fold(f32::NEG_INFINITY, |m, p| m.max(p.max[r]));
        let mut total = 0f32;
        for p in parts.clone() {
            if p.sum[r] > 0.0 {
                let w = (p.max[r] - max).exp();
                total += w * p.sum[r];
                axpy(o, w, &p.out[r * d..(r + 1) * d]);
            }
        }
        let inv = 1.0 / total;
        for x in o.iter_mut() {
            *x *= inv;
        }
    }
}
