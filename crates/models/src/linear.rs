//! Weight matrices of the decoder and the two ways they are applied: burn's matmul, and host
//! products on CPU backends (matrix–vector kernels for a few rows, a tiled product for more).
//!
//! Why a second path: burn-ndarray multiplies through `matrixmultiply`, which packs the whole
//! right-hand matrix before every product, from f32 weights. For one decode row that triples
//! the memory traffic, and decode on a CPU is nothing but memory traffic (the 135M model
//! reads 0.54 GB of f32 weights per token); a ten-row forward (a question, a teacher-forced
//! answer) pays for a full copy of the weights. A row-major `[out][in]` host copy of each
//! matrix lets every output be one contiguous dot product, split over the rayon pool: the
//! weights stream through once. The path is generic (it goes through `into_data`/`from_data`),
//! so it is correct on every backend; it is only *fast* where the backend's memory is the
//! host's, hence on by default for `ndarray` only.
//!
//! Where the model file stores a matrix as ggml blocks with a kernel here, the host copy is
//! those blocks ([`QuantRows`]) instead of f32: a fifth of the bytes to stream, the same weights.
use crate::gemm;
use crate::quant_rows::QuantRows;
use burn::tensor::{Tensor, TensorData};
use kv_tensor::KvBackend;
use kv_tensor::{Prefetch, dot};
use rayon::prelude::*;
use std::sync::Arc;

/// Inputs with at most this many rows take the matrix–vector kernels, more rows the tiled
/// product ([`crate::gemm`]). The tiled product first dequantises and transposes the whole
/// matrix into panels, a fixed cost of about three single-row products, which pays from
/// about 16 rows on (measured with `decode_profile … rows`, see README).
pub(crate) const MATVEC_MAX_ROWS: usize = 16;

/// Weight bytes per rayon task: large enough that scheduling costs nothing next to the dot
/// products and each task streams long enough for the hardware prefetcher to ramp up, small
/// enough that both cores get work on the narrowest matrix.
const TASK_BYTES: usize = 1 << 17;

/// A weight applied as `x · W`, `W` of shape `[in, out]`: held either as burn tensors (for
/// burn's matmul) or as a host copy (for the host products), never both. The host products
/// serve every row count, so a second, f32 copy of the weights for burn would only cost memory
/// (0.54 GB for the 135M model beside 0.1 GB of blocks).
#[derive(Debug, Clone)]
pub(crate) struct Linear<B: KvBackend> {
    /// `W` for burn's matmul, split into contiguous column blocks (one block unless the matrix
    /// is very wide: the 49k-column output head multiplies ~2× faster in blocks of ~3k columns,
    /// because matrixmultiply's packing working set then stays in cache). Empty while the host
    /// copy exists.
    blocks: Vec<Tensor<B, 2>>,
    /// `W` transposed, row-major `[out][in]` on the host, when the host path is enabled.
    host: Option<HostRows>,
    inp: usize,
    out: usize,
    /// Column-block width of `blocks`, and the device they live on (to rebuild them when the
    /// host path is turned off).
    block: usize,
    device: B::Device,
}

impl<B: KvBackend> Linear<B> {
    /// Builds the weight from GGUF row order (`rows_out[o * inp + i]` = `W[i][o]`, one row per
    /// output): as the host copy when `host`, else as burn tensors in column blocks of at most
    /// `block` columns.
    pub(crate) fn from_rows(
        rows_out: Vec<f32>,
        inp: usize,
        out: usize,
        block: usize,
        host: bool,
        device: &B::Device,
    ) -> Self {
        let block = block.max(1);
        let mut lin = Self {
            blocks: Vec::new(),
            host: None,
            inp,
            out,
            block,
            device: device.clone(),
        };
        if host {
            lin.host = Some(HostRows::F32(Arc::from(rows_out)));
        } else {
            lin.blocks = lin.tensors(&rows_out);
        }
        lin
    }

    /// `rows_out` (GGUF order) as burn's column blocks.
    fn tensors(&self, rows_out: &[f32]) -> Vec<Tensor<B, 2>> {
        let (inp, block) = (self.inp, self.block);
        (0..self.out)
            .step_by(block)
            .map(|start| {
                let end = (start + block).min(self.out);
                transposed(
                    &rows_out[start * inp..end * inp],
                    inp,
                    end - start,
                    &self.device,
                )
            })
            .collect()
    }

    /// Several GGUF-order weights with the same input width fused into one `[in, Σ out]`
    /// matrix (q/k/v, gate/up): fewer, larger products.
    pub(crate) fn fused(
        parts: Vec<(Vec<f32>, usize)>,
        inp: usize,
        host: bool,
        device: &B::Device,
    ) -> Self {
        let out = parts.iter().map(|(_, o)| o).sum();
        let mut rows = Vec::with_capacity(out * inp);
        for (p, _) in parts {
            rows.extend(p);
        }
        Self::from_rows(rows, inp, out, out, host, device)
    }

    /// Turns the host copy on (built from the backend tensors, which are then dropped; stays
    /// off if the backend cannot hand its values over as f32) or off (burn's tensors are
    /// rebuilt from it, dequantised where it holds blocks).
    pub(crate) fn set_host(&mut self, on: bool) {
        match (&self.host, on) {
            (Some(host), false) => {
                let mut rows = vec![0f32; self.out * self.inp];
                for (o, row) in rows.chunks_exact_mut(self.inp).enumerate() {
                    match host {
                        HostRows::F32(r) => {
                            row.copy_from_slice(&r[o * self.inp..(o + 1) * self.inp]);
                        }
                        HostRows::Blocks(b) => b.row_into(o, row),
                    }
                }
                self.blocks = self.tensors(&rows);
                self.host = None;
            }
            (None, true) => {
                let mut rows = vec![0f32; self.out * self.inp];
                let mut col = 0;
                for b in &self.blocks {
                    let n = b.dims()[1];
                    let Ok(vals) = b.clone().into_data().convert::<f32>().into_vec::<f32>() else {
                        return;
                    };
                    for i in 0..self.inp {
                        for o in 0..n {
                            rows[(col + o) * self.inp + i] = vals[i * n + o];
                        }
                    }
                    col += n;
                }
                self.host = Some(HostRows::F32(Arc::from(rows)));
                self.blocks.clear();
            }
            _ => {}
        }
    }

    /// Makes the host copy the matrix's quantised blocks, when the host path is on and the
    /// blocks have this matrix's shape; otherwise changes nothing. Returns whether it did.
    pub(crate) fn use_blocks(&mut self, blocks: QuantRows) -> bool {
        if self.host.is_none() || (blocks.inp(), blocks.rows()) != (self.inp, self.out) {
            return false;
        }
        self.host = Some(HostRows::Blocks(Arc::new(blocks)));
        true
    }

    /// Bytes a host matrix–vector product streams (0 when the host path is off).
    pub(crate) fn host_bytes(&self) -> usize {
        match &self.host {
            None => 0,
            Some(HostRows::F32(r)) => r.len() * 4,
            Some(HostRows::Blocks(b)) => b.bytes(),
        }
    }

    /// `x · W` for the `t` rows of `x` (`[t][in]`, on the host) → `[t][out]`: the host
    /// products when the host copy exists, burn's matmul otherwise. `None` if the backend does
    /// not hand the product back as f32.
    pub(crate) fn apply_rows(&self, x: &[f32], t: usize) -> Option<Vec<f32>> {
        if x.len() != t * self.inp {
            return None;
        }
        if let Some(rows) = &self.host {
            return Some(host_product(rows, x, t, self.inp, self.out));
        }
        let x = Tensor::from_data(TensorData::new(x.to_vec(), [t, self.inp]), &self.device);
        self.matmul(x)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .ok()
    }

    /// Whether decode steps have a host copy to read.
    pub(crate) fn has_host(&self) -> bool {
        self.host.is_some()
    }

    /// `x · W`.
    ///
    /// # Shapes
    /// `x`: `[t, in]` → `[t, out]`
    pub(crate) fn apply(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let t = x.dims()[0];
        if let Some(rows) = &self.host {
            let device = x.device();
            let data = x.into_data().convert::<f32>();
            if let Ok(xs) = data.as_slice::<f32>() {
                let y = host_product(rows, xs, t, self.inp, self.out);
                return Tensor::from_data(TensorData::new(y, [t, self.out]), &device);
            }
            // `convert::<f32>` makes the slice f32, so this is never reached; stay correct
            // anyway by rebuilding `x` for the matmul path.
            let x = Tensor::from_data(data, &device);
            return self.matmul(x);
        }
        self.matmul(x)
    }

    fn matmul(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        if self.blocks.len() == 1 {
            return x.matmul(self.blocks[0].clone());
        }
        let parts = self
            .blocks
            .iter()
            .map(|w| x.clone().matmul(w.clone()))
            .collect();
        Tensor::cat(parts, 1)
    }
}

/// The host copy of a weight: f32 rows, or the model file's quantised blocks.
#[derive(Debug, Clone)]
enum HostRows {
    F32(Arc<[f32]>),
    Blocks(Arc<QuantRows>),
}

/// `x · W` on the host for the `t` rows of `x`: the matrix–vector kernels for a few rows,
/// the tiled product ([`crate::gemm`]) for more.
fn host_product(rows: &HostRows, x: &[f32], t: usize, inp: usize, out: usize) -> Vec<f32> {
    if t <= MATVEC_MAX_ROWS {
        return matvec(rows, x, t, inp, out);
    }
    match rows {
        HostRows::F32(r) => gemm::gemm(&gemm::F32Rows { rows: r, inp }, x, t),
        HostRows::Blocks(b) => gemm::gemm(b.as_ref(), x, t),
    }
}

/// `y[r][o] = Σ_i rows[o][i] · x[r][i]` for `t` input rows, outputs split over rayon tasks.
/// Each weight row is read from memory once and dotted with every input row while in L1.
fn matvec(rows: &HostRows, x: &[f32], t: usize, inp: usize, out: usize) -> Vec<f32> {
    // Computed output-major (`[out][t]`), so each task writes one contiguous piece.
    let mut yt = vec![0f32; out * t];
    let sums = match rows {
        HostRows::Blocks(_) => QuantRows::block_sums(x),
        HostRows::F32(_) => Vec::new(),
    };
    let row_bytes = match rows {
        HostRows::F32(_) => inp * 4,
        HostRows::Blocks(b) => b.bytes() / out.max(1),
    };
    let rows_per_task = (TASK_BYTES / row_bytes.max(1)).clamp(1, out.div_ceil(2).max(1));
    yt.par_chunks_mut(rows_per_task * t)
        .enumerate()
        .for_each(|(task, ys)| {
            let first = task * rows_per_task;
            match rows {
                HostRows::F32(rows) => {
                    let rows = &rows[first * inp..(first + ys.len() / t) * inp];
                    pulp::Arch::new().dispatch(RowDots { rows, x, ys, inp });
                }
                HostRows::Blocks(b) => b.dot_rows(first, x, &sums, ys),
            }
        });
    if t == 1 {
        return yt;
    }
    let mut y = vec![0f32; out * t];
    for o in 0..out {
        for r in 0..t {
            y[r * out + o] = yt[o * t + r];
        }
    }
    y
}

/// Dot products of a run of weight rows with every input row (`ys` is `[rows][t]`), as a
/// [`pulp::WithSimd`] so that the loops are compiled for the widest vector unit the CPU has
/// (AVX2/FMA where the CPU has them).
struct RowDots<'a> {
    rows: &'a [f32],
    x: &'a [f32],
    ys: &'a mut [f32],
    inp: usize,
}

impl pulp::WithSimd for RowDots<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let RowDots { rows, x, ys, inp } = self;
        let t = x.len() / inp;
        let pf = Prefetch::new();
        for (o, (w, yo)) in rows
            .chunks_exact(inp)
            .zip(ys.chunks_exact_mut(t))
            .enumerate()
        {
            // The next row, a cache line (16 floats) at a time.
            for l in (0..inp).step_by(16) {
                pf.line(rows, (o + 1) * inp + l);
            }
            for (y, xr) in yo.iter_mut().zip(x.chunks_exact(inp)) {
                *y = dot(w, xr);
            }
        }
    }
}

/// A GGUF-order `rows_out` (`[out][in]`) as an `[in, out]` tensor, transposed once on the host
/// so every matmul reads it contiguously.
fn transposed<B: KvBackend>(
    rows_out: &[f32],
    inp: usize,
    out: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let mut t = vec![0f32; rows_out.len()];
    for o in 0..out {
        for i in 0..inp {
            t[i * out + o] = rows_out[o * inp + i];
        }
    }
    Tensor::from_data(TensorData::new(t, [inp, out]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_ndarray::NdArray;
    use proptest::prelude::*;

    type B = NdArray<f32>;

    proptest! {
        /// The host products and burn's matmul compute the same product (up to float order),
        /// for row counts on either side of the matrix–vector threshold and for blocked
        /// matrices.
        #[test]
        fn host_path_equals_matmul(
            t in 1usize..24,
            inp in 1usize..40,
            out in 1usize..150,
            block in 1usize..200,
            seed in 0u32..1000,
        ) {
            let device = Default::default();
            let val = |i: usize| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0;
            let rows: Vec<f32> = (0..inp * out).map(val).collect();
            let xs: Vec<f32> = (0..t * inp).map(|i| val(i + 7919)).collect();
            let x = || Tensor::<B, 2>::from_data(TensorData::new(xs.clone(), [t, inp]), &device);
            let host = Linear::<B>::from_rows(rows.clone(), inp, out, block, true, &device);
            let plain = Linear::<B>::from_rows(rows, inp, out, block, false, &device);
            let a = host.apply(x()).into_data().to_vec::<f32>().expect("f32");
            let b = plain.apply(x()).into_data().to_vec::<f32>().expect("f32");
            prop_assert_eq!(a.len(), t * out);
            for (p, q) in a.iter().zip(&b) {
                prop_assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{} vs {}", p, q);
            }
        }
    }

    /// Building the host copy later from the backend tensors gives the same rows.
    #[test]
    fn set_host_rebuilds_the_same_copy() {
        let device = Default::default();
        let (inp, out) = (5, 9);
        let rows: Vec<f32> = (0..inp * out).map(|i| i as f32 * 0.5 - 3.0).collect();
        let built = Linear::<B>::from_rows(rows.clone(), inp, out, 4, true, &device);
        let mut later = Linear::<B>::from_rows(rows, inp, out, 4, false, &device);
        assert!(later.host.is_none());
        later.set_host(true);
        let f32_rows = |l: &Linear<B>| match &l.host {
            Some(HostRows::F32(r)) => Some(r.clone()),
            _ => None,
        };
        assert_eq!(f32_rows(&later).as_deref(), f32_rows(&built).as_deref());
        assert!(f32_rows(&later).is_some());
        // Never two copies: burn's tensors go when the host copy comes, and come back (the
        // same product) when it goes.
        assert!(later.blocks.is_empty() && built.blocks.is_empty());
        let x = || {
            Tensor::<B, 2>::from_data(TensorData::new(vec![0.25f32; 3 * inp], [3, inp]), &device)
        };
        let on = later.apply(x()).into_data().to_vec::<f32>().expect("f32");
        later.set_host(false);
        assert!(later.host.is_none());
        assert_eq!(later.blocks.len(), out.div_ceil(4));
        let off = later.apply(x()).into_data().to_vec::<f32>().expect("f32");
        for (a, b) in on.iter().zip(&off) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// Turned off, a host copy of ggml blocks becomes burn tensors of the dequantised weights.
    #[test]
    fn blocks_turned_off_become_their_weights() {
        let device = Default::default();
        let (inp, out) = (64, 3);
        let bytes =
            crate::quant_rows::tests::blocks(crate::GgmlType::Q4_1, inp, out, &[3, 1, 4, 1, 5]);
        let mut w = vec![0f32; inp * out];
        crate::GgmlType::Q4_1.dequantize(&bytes, &mut w);
        let q = QuantRows::from_ggml(crate::GgmlType::Q4_1, &bytes, inp, out).expect("blocks");
        let mut lin = Linear::<B>::from_rows(vec![0.0; inp * out], inp, out, out, true, &device);
        assert!(lin.use_blocks(q));
        lin.set_host(false);
        let want = Linear::<B>::from_rows(w, inp, out, out, false, &device);
        let x = || Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32; inp], [1, inp]), &device);
        let a = lin.apply(x()).into_data().to_vec::<f32>().expect("f32");
        let b = want.apply(x()).into_data().to_vec::<f32>().expect("f32");
        assert_eq!(a, b);
    }
}
