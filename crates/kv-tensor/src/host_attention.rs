//! Attention over a layer held in host memory (decode steps and prefill chunks), reading every part in its stored form:
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
//! Rows of 2-, 4- and 8-bit codes that start on a word boundary unpack a word at a time
//! (`vpsrlvd` by lane offsets); 3-bit codes (ten to a word) and unaligned rows take a scalar
//! path. The row primitives are [`RowKernel`]s: AVX2/FMA where the CPU has it, plain loops
//! elsewhere.
//!
//! Work is split flash-decoding style: one task per KV head and run of at most
//! [`KEYS_PER_TASK`] keys of one part, each producing a partial softmax (row maximum, sum of
//! exponentials, unnormalised output) that [`merge`] combines exactly.
use crate::host::Prefetch;
use crate::host_kernels::{Plain, RowKernel};
use crate::host_segment::{HostQuant, HostSide, f16_to_f32};
use crate::{CodeBits, GroupAxis, Reduce};
use rayon::prelude::*;
use std::ops::Range;

/// Keys per task: enough work per task that scheduling and per-task set-up are noise (with the
/// sixteen-lane tiles, 256 keys left them a sixth of a decode layer's time), few enough that a
/// 2k-token layer over 3 KV heads still makes a dozen tasks for the cores to share.
pub(crate) const KEYS_PER_TASK: usize = 512;

/// The widest row a kernel buffers on the stack (head dimensions and ranks up to this).
pub(crate) const MAX_W: usize = 512;

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
            ..
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

    /// Rows `first..` as raw code floats, one `w`-wide row of `out` each, asking for the row
    /// eight ahead while converting one.
    #[inline(always)]
    fn codes_run<K: RowKernel>(&self, k: K, pf: Prefetch, first: usize, w: usize, out: &mut [f32]) {
        for (j, row) in out.chunks_exact_mut(w).enumerate() {
            let jj = first + j;
            pf.line(
                self.bytes,
                (self.first + (jj + 8) * w) * self.bits.get() as usize / 8,
            );
            self.codes(k, jj, w, row);
        }
    }

    /// Rows `rows`' packed bytes, when the kernels can read them in place: 2, 4 or 8 bits,
    /// every row starting on a word boundary.
    fn word_rows(&self, rows: Range<usize>, w: usize) -> Option<&'a [u8]> {
        let per = self.bits.codes_per_word();
        let start = self.first + rows.start * w;
        (self.bits.get() != 3 && w.is_multiple_of(per) && start.is_multiple_of(per))
            .then(|| &self.bytes[start / per * 4..(self.first + rows.end * w) / per * 4])
    }

    /// [`RowKernel::dots_codes`] at this part's width (`bytes` from [`QuantRows::word_rows`]).
    #[inline(always)]
    fn dots<K: RowKernel>(
        &self,
        k: K,
        q: &[f32],
        w: usize,
        bytes: &[u8],
        out: &mut [f32],
        n: usize,
    ) {
        match self.bits.get() {
            2 => k.dots_codes::<2>(q, w, bytes, out, n),
            4 => k.dots_codes::<4>(q, w, bytes, out, n),
            _ => k.dots_codes::<8>(q, w, bytes, out, n),
        }
    }

    /// [`RowKernel::weighted_sum_codes`] at this part's width.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn weighted_sum<K: RowKernel>(
        &self,
        k: K,
        p: &[f32],
        stride: usize,
        bytes: &[u8],
        w: usize,
        cols: Range<usize>,
        acc: &mut [f32],
    ) {
        match self.bits.get() {
            2 => k.weighted_sum_codes::<2>(p, stride, bytes, w, cols, acc),
            4 => k.weighted_sum_codes::<4>(p, stride, bytes, w, cols, acc),
            _ => k.weighted_sum_codes::<8>(p, stride, bytes, w, cols, acc),
        }
    }

    /// Row `j`'s codes as floats, in channel order.
    #[inline(always)]
    fn codes<K: RowKernel>(&self, k: K, j: usize, w: usize, out: &mut [f32]) {
        let bits = self.bits.get() as usize;
        let per = self.bits.codes_per_word();
        let start = self.first + j * w;
        if bits != 3 && w.is_multiple_of(per) && start.is_multiple_of(per) {
            let row = &self.bytes[start / per * 4..(start + w) / per * 4];
            let out = &mut out[..w];
            match bits {
                2 => k.codes_row::<2>(row, out),
                4 => k.codes_row::<4>(row, out),
                _ => k.codes_row::<8>(row, out),
            }
            return;
        }
        let mask = self.bits.max_code();
        for (c, o) in out[..w].iter_mut().enumerate() {
            let i = start + c;
            let at = i / per * 4;
            let word = u32::from_le_bytes([
                self.bytes[at],
                self.bytes[at + 1],
                self.bytes[at + 2],
                self.bytes[at + 3],
            ]);
            *o = ((word >> (bits * (i % per))) & mask) as i32 as f32;
        }
    }
}

/// Per-channel scales and minimums of the token group last used (grouping along tokens), so a
/// run of rows converts them once per group.
struct GroupCache {
    group: usize,
    s: [f32; MAX_W],
    m: [f32; MAX_W],
}

impl GroupCache {
    fn new() -> Self {
        Self {
            group: usize::MAX,
            s: [0.0; MAX_W],
            m: [0.0; MAX_W],
        }
    }

    /// Loads the scales of row `j`'s token group unless they are loaded; true when they changed.
    #[inline(always)]
    fn load<K: RowKernel>(&mut self, k: K, q: &QuantRows<'_>, j: usize, w: usize) -> bool {
        let g = j / q.group;
        if g == self.group {
            return false;
        }
        self.group = g;
        k.f16_row(&q.scales[g * w..(g + 1) * w], &mut self.s[..w]);
        k.f16_row(&q.mins[g * w..(g + 1) * w], &mut self.m[..w]);
        true
    }
}

impl SideView<'_> {
    /// Row `j` dequantised (not projected) into `out[..w]`, in channel order.
    #[inline(always)]
    fn row<K: RowKernel>(&self, k: K, j: usize, cache: &mut GroupCache, out: &mut [f32]) {
        let w = self.w;
        match self.rows {
            Rows::F32(x) => out[..w].copy_from_slice(&x[j * w..(j + 1) * w]),
            Rows::F16(x) => k.f16_row(&x[j * w..(j + 1) * w], &mut out[..w]),
            Rows::Quant(q) => {
                q.codes(k, j, w, out);
                match q.along {
                    GroupAxis::Tokens => {
                        cache.load(k, &q, j, w);
                        k.fma_row(&mut out[..w], &cache.s[..w], &cache.m[..w]);
                    }
                    GroupAxis::Channels => {
                        let per = w / q.group;
                        for (gi, o) in out[..w].chunks_exact_mut(q.group).enumerate() {
                            let s = f16_to_f32(q.scales[j * per + gi]);
                            let m = f16_to_f32(q.mins[j * per + gi]);
                            k.scale_add(o, s, m);
                        }
                    }
                }
            }
        }
    }

    /// Every row decoded to `d` channels (`out`: `n × d`).
    pub(crate) fn decode(&self, out: &mut [f32]) {
        let (w, d) = (self.w, self.d);
        let mut cache = GroupCache::new();
        let mut buf = [0f32; MAX_W];
        for (j, o) in out.chunks_exact_mut(d).take(self.n).enumerate() {
            self.row(Plain, j, &mut cache, &mut buf);
            match self.basis {
                Some(b) => {
                    for (c, x) in o.iter_mut().enumerate() {
                        *x = Plain.dot(&b[c * w..(c + 1) * w], &buf[..w]);
                    }
                }
                None => o.copy_from_slice(&buf[..d]),
            }
        }
    }
}

/// A buffer a task decodes rows into, reused across the tasks a thread runs: allocating and
/// zeroing 64 KiB per task cost a tenth of the kernel's time. Callers overwrite what they read.
struct Scratch(Vec<f32>, usize);

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    /// A buffer of `len` floats (contents unspecified). The thread's smallest pooled buffer
    /// that is long enough is reused as it is (a buffer is never shortened, so it is zeroed
    /// only where it grows); failing that, the longest one grows.
    fn take(len: usize) -> Self {
        let mut v = SCRATCH
            .with(|s| {
                let mut pool = s.borrow_mut();
                let fit = (0..pool.len())
                    .filter(|&i| pool[i].len() >= len)
                    .min_by_key(|&i| pool[i].len())
                    .or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].len()));
                fit.map(|i| pool.swap_remove(i))
            })
            .unwrap_or_default();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        Scratch(v, len)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        SCRATCH.with(|s| s.borrow_mut().push(v));
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0[..self.1]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0[..self.1]
    }
}

/// One task's partial softmax over its keys (see the module doc): per query row the maximum
/// score over its visible keys, `Σ exp(score − max)` and `Σ exp(score − max)·v` (unnormalised,
/// `d` channels). A row that sees no key of the task has sum 0.
pub(crate) struct Partial {
    pub(crate) max: Vec<f32>,
    pub(crate) sum: Vec<f32>,
    pub(crate) out: Vec<f32>,
    /// With [`Task::mass`]: `exp(score − max)` of every row and key (`rows × n`, keys a row
    /// may not see 0), from which the merge derives each key's attention mass.
    pub(crate) weights: Option<Vec<f32>>,
}

/// One task: query rows `q` (`rows × d`) over rows `range` of one head's part.
pub(crate) struct Task<'a> {
    pub(crate) k: SideView<'a>,
    pub(crate) v: SideView<'a>,
    pub(crate) q: &'a [f32],
    pub(crate) range: Range<usize>,
    /// Keys of `range` each query row sees (causality), at most `range.len()`.
    pub(crate) visible: Vec<usize>,
    pub(crate) scale: f32,
    /// Whether to keep the task's softmax weights for the attention mass.
    pub(crate) mass: bool,
}

/// A task bound to SIMD kernels `K`: as a `NullaryFnOnce` with an `#[inline(always)]` call,
/// its body is compiled inside pulp's target-feature function (a closure's body would not be,
/// and every intrinsic would become a call).
struct OnSimd<'a, K>(Task<'a>, K);

impl<K: RowKernel> pulp::NullaryFnOnce for OnSimd<'_, K> {
    type Output = Partial;

    #[inline(always)]
    fn call(self) -> Partial {
        self.0.body(self.1)
    }
}

impl Task<'_> {
    /// Runs the task with the best kernels this CPU has: AVX2/FMA, with the hardware fp16
    /// conversion where the CPU has AVX-512.
    fn run(self) -> Partial {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::host_kernels::{Avx2, HardHalf, SoftHalf};
            if let Some(simd) = pulp::x86::V4::try_new() {
                return simd.vectorize(OnSimd(self, Avx2(*simd, HardHalf(simd))));
            }
            if let Some(simd) = pulp::x86::V3::try_new() {
                return simd.vectorize(OnSimd(self, Avx2(simd, SoftHalf)));
            }
        }
        self.body(Plain)
    }

    #[inline(always)]
    fn body<K: RowKernel>(self, k: K) -> Partial {
        let d = self.k.d;
        let rows = self.q.len() / d;
        let n = self.range.len();
        let mut scores = Scratch::take(rows * n);
        key_scores(k, &self, &mut scores);
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        for r in 0..rows {
            let s = &mut scores[r * n..r * n + self.visible[r]];
            max[r] = max_of(s);
            sum[r] = k.exp_shifted(s, max[r]);
            // Keys the row may not see weigh nothing in the value sums.
            scores[r * n + self.visible[r]..(r + 1) * n].fill(0.0);
        }
        let out = value_sums(k, &self, &scores);
        let weights = self.mass.then(|| scores.to_vec());
        Partial {
            max,
            sum,
            out,
            weights,
        }
    }
}

/// The largest value, over eight lanes (one running maximum would be a chain of dependent
/// comparisons that does not vectorise).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    lanes.iter().fold(tail, |a, &b| a.max(b))
}

/// `scores[r·n + j]` = scaled dot product of query row `r` with key `range.start + j`.
#[inline(always)]
fn key_scores<K: RowKernel>(kern: K, t: &Task<'_>, scores: &mut [f32]) {
    let k = &t.k;
    let (d, w) = (k.d, k.w);
    let rows = t.q.len() / d;
    let n = t.range.len();
    // Queries in the rows' space (projected: `Bᵀq`), scaled once.
    let mut qs = Scratch::take(rows * w);
    for (qr, dst) in t.q.chunks_exact(d).zip(qs.chunks_exact_mut(w)) {
        match k.basis {
            Some(b) => {
                dst.fill(0.0);
                for (c, &x) in qr.iter().enumerate() {
                    kern.axpy(dst, x * t.scale, &b[c * w..(c + 1) * w]);
                }
            }
            None => {
                for (o, &x) in dst.iter_mut().zip(qr) {
                    *o = x * t.scale;
                }
            }
        }
    }
    // The run's keys, decoded into a scratch buffer that stays in cache (at most
    // `KEYS_PER_TASK` rows): the bytes read from memory are the stored ones.
    let pf = Prefetch::new();
    let mut scratch = Scratch::take(n * w);
    let mut cache = GroupCache::new();
    match k.rows {
        Rows::Quant(q) if q.along == GroupAxis::Tokens => {
            // Codes the kernels cannot read in place (3 bits, unaligned rows) are unpacked
            // into the scratch buffer first.
            let in_place = q.word_rows(t.range.clone(), w).is_some();
            if !in_place {
                q.codes_run(kern, pf, t.range.start, w, &mut scratch);
            }
            // Fold each token group's scale into the queries and its minimum into a constant.
            let mut folded = Scratch::take(rows * w);
            let mut j = 0;
            while j < n {
                let jj = t.range.start + j;
                let end = ((jj / q.group + 1) * q.group - t.range.start).min(n);
                cache.load(kern, &q, jj, w);
                for r in 0..rows {
                    let qr = &qs[r * w..(r + 1) * w];
                    let f = &mut folded[r * w..(r + 1) * w];
                    f.copy_from_slice(qr);
                    kern.fma_row(f, &cache.s[..w], &ZEROS[..w]);
                }
                match q.word_rows(jj..t.range.start + end, w).filter(|_| in_place) {
                    Some(bytes) => q.dots(kern, &folded, w, bytes, &mut scores[j..], n),
                    None => kern.dots(&folded, w, &scratch[j * w..end * w], &mut scores[j..], n),
                }
                for r in 0..rows {
                    let m = kern.dot(&qs[r * w..(r + 1) * w], &cache.m[..w]);
                    for x in &mut scores[r * n + j..r * n + end] {
                        *x += m;
                    }
                }
                j = end;
            }
        }
        Rows::F16(x) if rows < TILE_ROWS => {
            kern.dots_f16(&qs, w, &x[t.range.start * w..t.range.end * w], scores, n);
        }
        Rows::F16(x) => {
            kern.f16_row(&x[t.range.start * w..t.range.end * w], &mut scratch);
            dots_tiled(&qs, w, &scratch, scores, n);
        }
        _ => {
            for (j, row) in scratch.chunks_exact_mut(w).enumerate() {
                let jj = t.range.start + j;
                prefetch_row(pf, &k.rows, jj + AHEAD, w);
                k.row(kern, jj, &mut cache, row);
            }
            if rows < TILE_ROWS {
                kern.dots(&qs, w, &scratch, scores, n);
            } else {
                dots_tiled(&qs, w, &scratch, scores, n);
            }
        }
    }
}

/// Query rows from which a task's scores and value sums run as register-tiled products
/// ([`crate::host_gemm`]) over rows widened to f32, instead of the row kernels: a prefill
/// chunk's block of queries against a run of keys is a small dense product, and the tiles
/// reach several times the row kernels' FLOP rate (AVX-512 where the CPU has it). Decode
/// steps (a few grouped query rows) keep the row kernels, which read fp16 and codes in place.
const TILE_ROWS: usize = 16;

/// `scores[r·stride + j] = q_r · key_j` by the tiled product.
#[inline(always)]
fn dots_tiled(q: &[f32], w: usize, keys: &[f32], scores: &mut [f32], stride: usize) {
    crate::host_gemm::dispatch(crate::host_gemm::ProductNt {
        a: q,
        b: keys,
        w,
        out: scores,
        stride,
    });
}

/// Zeros, for [`RowKernel::fma_row`] used as a plain product.
const ZEROS: [f32; MAX_W] = [0.0; MAX_W];

/// Rows ahead of use that a run asks for.
const AHEAD: usize = 16;

/// Asks for row `j` of a side ahead of its use.
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
        Rows::Quant(q) => pf.line(q.bytes, (q.first + j * w) * q.bits.get() as usize / 8),
    }
}

/// `acc_r += Σ_j p[r·stride + j] · vals_j` by the tiled product.
#[inline(always)]
fn weighted_tiled(p: &[f32], stride: usize, vals: &[f32], w: usize, acc: &mut [f32]) {
    crate::host_gemm::dispatch(crate::host_gemm::ProductNn {
        p,
        stride,
        v: vals,
        w,
        acc,
    });
}

/// `Σ_j p[r][j] · v_j` over the visible keys of each row (`rows × d`).
#[inline(always)]
fn value_sums<K: RowKernel>(kern: K, t: &Task<'_>, p: &[f32]) -> Vec<f32> {
    let v = &t.v;
    let (d, w) = (v.d, v.w);
    let rows = t.q.len() / d;
    let n = t.range.len();
    let mut acc = vec![0f32; rows * w];
    let mut cache = GroupCache::new();
    let pf = Prefetch::new();
    let seen = t.visible.iter().copied().max().unwrap_or(0);
    let mut scratch = Scratch::take(seen * w);
    match v.rows {
        // Per-token scales: the codes are summed as they are, each group's scale folded into
        // the row weights and its minimum into one sum per row and group.
        Rows::Quant(q) if q.along == GroupAxis::Channels => {
            let in_place = q.word_rows(t.range.start..t.range.start + seen, w);
            if in_place.is_none() {
                q.codes_run(kern, pf, t.range.start, w, &mut scratch);
            }
            let groups = w / q.group;
            // Every visible row's scales and minimums, `[j][group]`, widened once.
            let span = t.range.start * groups..(t.range.start + seen) * groups;
            let (mut sc, mut mn) = (Scratch::take(seen * groups), Scratch::take(seen * groups));
            kern.f16_row(&q.scales[span.clone()], &mut sc);
            kern.f16_row(&q.mins[span], &mut mn);
            // Group-major, so each group's scales and minimums are contiguous.
            let (mut sg, mut mg) = (Scratch::take(seen * groups), Scratch::take(seen * groups));
            group_major(&sc, groups, &mut sg);
            group_major(&mn, groups, &mut mg);
            let mut weights = Scratch::take(rows * seen);
            for gi in 0..groups {
                let (s, m) = (
                    &sg[gi * seen..(gi + 1) * seen],
                    &mg[gi * seen..(gi + 1) * seen],
                );
                for r in 0..rows {
                    let pr = &p[r * n..r * n + seen];
                    for ((x, &pj), &sj) in
                        weights[r * seen..(r + 1) * seen].iter_mut().zip(pr).zip(s)
                    {
                        *x = pj * sj;
                    }
                    let min_sum = kern.dot(pr, m);
                    let cols = gi * q.group..(gi + 1) * q.group;
                    for x in &mut acc[r * w + cols.start..r * w + cols.end] {
                        *x += min_sum;
                    }
                }
                let cols = gi * q.group..(gi + 1) * q.group;
                match in_place {
                    Some(bytes) => q.weighted_sum(kern, &weights, seen, bytes, w, cols, &mut acc),
                    None => kern.weighted_sum(&weights, seen, &scratch, w, cols, &mut acc),
                }
            }
        }
        Rows::F16(x) if rows < TILE_ROWS => {
            let rows = &x[t.range.start * w..(t.range.start + seen) * w];
            kern.weighted_sum_f16(p, n, rows, w, 0..w, &mut acc);
        }
        Rows::F16(x) => {
            kern.f16_row(
                &x[t.range.start * w..(t.range.start + seen) * w],
                &mut scratch,
            );
            weighted_tiled(p, n, &scratch, w, &mut acc);
        }
        _ => {
            for (j, row) in scratch.chunks_exact_mut(w).enumerate() {
                let jj = t.range.start + j;
                prefetch_row(pf, &v.rows, jj + AHEAD, w);
                v.row(kern, jj, &mut cache, row);
            }
            if rows < TILE_ROWS {
                kern.weighted_sum(p, n, &scratch, w, 0..w, &mut acc);
            } else {
                weighted_tiled(p, n, &scratch, w, &mut acc);
            }
        }
    }
    match v.basis {
        None => acc,
        Some(b) => {
            let mut out = vec![0f32; rows * d];
            for (a, o) in acc.chunks_exact(w).zip(out.chunks_exact_mut(d)) {
                for (c, x) in o.iter_mut().enumerate() {
                    *x = kern.dot(&b[c * w..(c + 1) * w], a);
                }
            }
            out
        }
    }
}

/// `dst[g·n + j] = src[j·groups + g]` for `n = dst.len() / groups`: values stored per token and
/// group, laid out group by group. The common group counts have fixed-width loops, which
/// compile to shuffles; a strided iterator cost a tenth of a KIVI layer's attention.
#[inline(always)]
fn group_major(src: &[f32], groups: usize, dst: &mut [f32]) {
    match groups {
        1 => dst.copy_from_slice(&src[..dst.len()]),
        2 => group_major_fixed::<2>(src, dst),
        4 => group_major_fixed::<4>(src, dst),
        _ => {
            let n = dst.len() / groups.max(1);
            for (j, row) in src.chunks_exact(groups).take(n).enumerate() {
                for (g, &x) in row.iter().enumerate() {
                    dst[g * n + j] = x;
                }
            }
        }
    }
}

/// [`group_major`] for `G` groups.
#[inline(always)]
fn group_major_fixed<const G: usize>(src: &[f32], dst: &mut [f32]) {
    let n = dst.len() / G;
    if n == 0 {
        return;
    }
    let (rows, _) = src[..n * G].as_chunks::<G>();
    for (g, out) in dst.chunks_exact_mut(n).enumerate() {
        for (o, r) in out.iter_mut().zip(rows) {
            *o = r[g];
        }
    }
}

/// One KV head's part: keys and values of `n` rows, the first at index `offset` of the head's
/// sequence (oldest first).
pub(crate) struct Part<'a> {
    pub(crate) k: SideView<'a>,
    pub(crate) v: SideView<'a>,
    pub(crate) offset: usize,
    /// The mass column of the part's first row ([`attend`]).
    pub(crate) column: usize,
}

/// Query rows per task when many queries attend at once (a prefill chunk): the task's score
/// matrix (rows × [`KEYS_PER_TASK`]) and partial output then stay in L2, and a query block
/// skips the key runs it cannot see (causality) instead of masking them.
pub(crate) const ROWS_PER_TASK: usize = 96;

/// Attention of `tq` newest tokens' queries over every head's parts. `q` is `[b·kvh][group ×
/// tq][d]` (the grouped query heads of each KV head, contiguous); `heads[bh]` lists head
/// `bh`'s parts oldest first and `lens[bh]` its total rows. Query `i` of `tq` sees the rows
/// `0 ..= len − tq + i` of its head. Returns the output in `q`'s layout.
///
/// Work is split by KV head, block of query tokens (all grouped heads of a token together)
/// and run of keys; a block's partials are merged exactly and its rows scattered back.
///
/// Given the column where each part starts (`columns`: one per part, the same for every head,
/// then the total) and a reduction, also returns the attention every stored row received
/// (`[head][column]`, summed or maximised over query rows; columns no row of a head fills stay
/// 0): the softmax weights each task kept, rescaled by its rows' merged maximum and sum.
pub(crate) fn attend(
    q: &[f32],
    tq: usize,
    d: usize,
    heads: &[Vec<Part<'_>>],
    lens: &[usize],
    columns: Option<(&[usize], Reduce)>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let rows = q.len() / d / heads.len();
    let group = rows / tq;
    let per_block = (ROWS_PER_TASK / group.max(1)).max(1).min(tq);
    let blocks: Vec<Range<usize>> = (0..tq)
        .step_by(per_block)
        .map(|i| i..(i + per_block).min(tq))
        .collect();
    // Each block's query rows, gathered `[group][block]` (one block: a copy of `q`).
    let gathered: Vec<Vec<f32>> = (0..heads.len())
        .flat_map(|bh| blocks.iter().map(move |b| (bh, b.clone())))
        .map(|(bh, b)| {
            let qh = &q[bh * rows * d..(bh + 1) * rows * d];
            let mut block = Vec::with_capacity(group * b.len() * d);
            for g in 0..group {
                block.extend_from_slice(&qh[(g * tq + b.start) * d..(g * tq + b.end) * d]);
            }
            block
        })
        .collect();
    // In slot order, so each batch below is a prefix.
    let mut jobs = tasks(&gathered, &blocks, heads, lens, tq, d, columns.is_some());
    // With the mass, every task keeps its softmax weights until its slot is merged: run whole
    // slots in batches that hold at most `MASS_BYTES` of them (all at once, a pass over a long
    // context would hold rows × keys floats, the attention matrix KVzip's pass is meant to avoid).
    let batch = match columns {
        Some(_) => {
            let keys = lens.iter().copied().max().unwrap_or(0);
            let per_slot = (group * per_block * keys * 4).max(1);
            (MASS_BYTES / per_slot).max(2)
        }
        None => gathered.len().max(1),
    };
    let total = columns.and_then(|(c, _)| c.last().copied()).unwrap_or(0);
    let mut mass = columns.map(|_| vec![0f32; heads.len() * total]);
    let mut out = vec![0f32; q.len()];
    for first in (0..gathered.len()).step_by(batch) {
        let end = (first + batch).min(gathered.len());
        let n = jobs.partition_point(|j| j.0 < end);
        let partials: Vec<(usize, usize, Partial)> = jobs
            .par_drain(..n)
            .map(|(slot, column, task)| (slot, column, task.run()))
            .collect();
        let mut i = 0;
        for slot in first..end {
            let from = i;
            while i < partials.len() && partials[i].0 == slot {
                i += 1;
            }
            let (bh, b) = (slot / blocks.len(), &blocks[slot % blocks.len()]);
            let mut o = vec![0f32; group * b.len() * d];
            let slot_parts = &partials[from..i];
            let (max, total_sum) = merge(slot_parts.iter().map(|(_, _, p)| p), &mut o, d);
            if let (Some(m), Some((_, reduce))) = (mass.as_mut(), columns) {
                let head = &mut m[bh * total..(bh + 1) * total];
                for (_, column, p) in slot_parts {
                    add_weights(p, &max, &total_sum, reduce, &mut head[*column..]);
                }
            }
            let oh = &mut out[bh * rows * d..(bh + 1) * rows * d];
            for (g, src) in o.chunks_exact(b.len() * d).enumerate() {
                oh[(g * tq + b.start) * d..(g * tq + b.end) * d].copy_from_slice(src);
            }
        }
    }
    (out, mass)
}

/// Softmax weights one batch of [`attend`]'s slots may hold when the mass is asked for (tiny
/// under test, so that the property tests cross batch boundaries).
const MASS_BYTES: usize = if cfg!(test) { 1 << 12 } else { 16 << 20 };

/// Folds one task's softmax weights into `acc`: `weights[r][j] · exp(max_r(part) − max_r) /
/// sum_r` is row `r`'s normalised weight on key `j`, summed over rows (the mass) or maximised
/// (the peak).
fn add_weights(p: &Partial, max: &[f32], sum: &[f32], reduce: Reduce, acc: &mut [f32]) {
    let Some(weights) = &p.weights else { return };
    let n = weights.len() / max.len().max(1);
    for (r, w) in weights.chunks_exact(n.max(1)).enumerate() {
        if p.sum[r] == 0.0 || sum[r] == 0.0 {
            continue;
        }
        let f = (p.max[r] - max[r]).exp() / sum[r];
        match reduce {
            Reduce::Sum => acc.iter_mut().zip(w).for_each(|(m, &x)| *m += f * x),
            Reduce::Max => acc.iter_mut().zip(w).for_each(|(m, &x)| *m = m.max(f * x)),
        }
    }
}

/// The tasks of [`attend`], in slot order (slot = head × blocks + block): every run of at most
/// [`KEYS_PER_TASK`] keys of every part that some row of the block sees.
fn tasks<'a>(
    gathered: &'a [Vec<f32>],
    blocks: &[Range<usize>],
    heads: &[Vec<Part<'a>>],
    lens: &[usize],
    tq: usize,
    d: usize,
    mass: bool,
) -> Vec<(usize, usize, Task<'a>)> {
    let scale = 1.0 / (d as f32).sqrt();
    let mut jobs = Vec::new();
    for (slot, qb) in gathered.iter().enumerate() {
        let bh = slot / blocks.len();
        let block = &blocks[slot % blocks.len()];
        let rows = qb.len() / d;
        for part in &heads[bh] {
            let mut start = 0;
            while start < part.k.n {
                let end = (start + KEYS_PER_TASK).min(part.k.n);
                let first = part.offset + start;
                let visible: Vec<usize> = (0..rows)
                    .map(|r| {
                        (lens[bh] - tq + block.start + r % block.len() + 1)
                            .saturating_sub(first)
                            .min(end - start)
                    })
                    .collect();
                if visible.iter().any(|&v| v > 0) {
                    jobs.push((
                        slot,
                        part.column + start,
                        Task {
                            k: part.k,
                            v: part.v,
                            q: qb,
                            range: start..end,
                            visible,
                            scale,
                            mass,
                        },
                    ));
                }
                start = end;
            }
        }
    }
    jobs
}

/// Combines partial softmaxes of the same query rows over disjoint keys into the normalised
/// output (`out`: `rows × d`), exactly: each part is rescaled by `exp(max_part − max)`.
/// Returns every row's maximum and softmax denominator.
pub(crate) fn merge<'p>(
    parts: impl Iterator<Item = &'p Partial> + Clone,
    out: &mut [f32],
    d: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rows = out.len() / d;
    let (mut maxes, mut sums) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
    for (r, o) in out.chunks_exact_mut(d).enumerate() {
        let max = parts
            .clone()
            .fold(f32::NEG_INFINITY, |m, p| m.max(p.max[r]));
        let mut total = 0f32;
        for p in parts.clone() {
            if p.sum[r] > 0.0 {
                let w = (p.max[r] - max).exp();
                total += w * p.sum[r];
                Plain.axpy(o, w, &p.out[r * d..(r + 1) * d]);
            }
        }
        let inv = 1.0 / total;
        for x in o.iter_mut() {
            *x *= inv;
        }
        (maxes[r], sums[r]) = (max, total);
    }
    (maxes, sums)
}

#[cfg(test)]
mod tests {
    use super::group_major;
    use proptest::prelude::*;

    proptest! {
        /// Every group count, fixed-width or not, lays row `j`'s value of group `g` at
        /// `g·n + j`.
        #[test]
        fn group_major_transposes(groups in 1usize..7, n in 0usize..40) {
            let src: Vec<f32> = (0..n * groups).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; n * groups];
            group_major(&src, groups, &mut dst);
            for g in 0..groups {
                for j in 0..n {
                    prop_assert_eq!(dst[g * n + j], src[j * groups + g]);
                }
            }
        }
    }
}
