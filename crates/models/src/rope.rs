//! Rotary position embeddings with either pair layout (see [`RopeLayout`]).
use crate::config::RopeLayout;
use burn::tensor::{Tensor, TensorData};
use kv_tensor::KvBackend;

/// Precomputed cos/sin tables `[context, head_dim/2]`.
#[derive(Debug, Clone)]
pub struct Rope<B: KvBackend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    layout: RopeLayout,
}

impl<B: KvBackend> Rope<B> {
    /// Tables for positions `0..context` with base `theta` (angles in f64, then f32).
    pub fn new(
        head_dim: usize,
        context: usize,
        theta: f64,
        layout: RopeLayout,
        device: &B::Device,
    ) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(context * half);
        let mut sin = Vec::with_capacity(context * half);
        for p in 0..context {
            for i in 0..half {
                let inv = theta.powf(-(2.0 * i as f64) / head_dim as f64);
                let a = p as f64 * inv;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos, [context, half]), device),
            sin: Tensor::from_data(TensorData::new(sin, [context, half]), device),
            layout,
        }
    }

    /// Rotates `x` whose tokens sit at positions `start..start + t`.
    ///
    /// # Shapes
    /// `x`: `[b, h, t, d]` → `[b, h, t, d]`
    pub fn apply(&self, x: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
        let [b, h, t, d] = x.dims();
        let half = d / 2;
        let cos = self.cos.clone().slice(start..start + t);
        let sin = self.sin.clone().slice(start..start + t);
        match self.layout {
            RopeLayout::Interleaved => {
                let x = x.reshape([b, h, t, half, 2]);
                let x0 = x.clone().slice_dim(4, 0..1);
                let x1 = x.slice_dim(4, 1..2);
                let c = cos.reshape([1, 1, t, half, 1]);
                let s = sin.reshape([1, 1, t, half, 1]);
                let r0 = x0.clone() * c.clone() - x1.clone() * s.clone();
                let r1 = x0 * s + x1 * c;
                Tensor::cat(vec![r0, r1], 4).reshape([b, h, t, d])
            }
            RopeLayout::Halves => {
                let x0 = x.clone().slice_dim(3, 0..half);
                let x1 = x.slice_dim(3, half..d);
                let c = cos.reshape([1, 1, t, half]);
                let s = sin.reshape([1, 1, t, half]);
                let r0 = x0.clone() * c.clone() - x1.clone() * s.clone();
                let r1 = x0 * s + x1 * c;
                Tensor::cat(vec![r0, r1], 3)
            }
        }
    }

    /// The cosine and sine tables `[context, head_dim / 2]`.
    pub(crate) fn tables(&self) -> (&Tensor<B, 2>, &Tensor<B, 2>) {
        (&self.cos, &self.sin)
    }

    /// Maximum position + 1.
    pub fn context(&self) -> usize {
        self.cos.dims()[0]
    }
}
