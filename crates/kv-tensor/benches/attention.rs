//! Decode attention alone: one query token (9 query heads over 3 KV heads of 64, SmolLM2's
//! geometry) attending over one layer of 2k and 8k tokens stored as the full fp16 cache, KIVI-4,
//! KIVI-2 (keys per channel in groups of 32 tokens, values per token) and rank-32 keys with
//! 4-bit values. Throughput is the layer's stored bytes, so criterion prints the GB/s of KV the
//! kernel reads; `stream-copy` copies 256 MiB in the same run, the memory bandwidth to compare
//! with (a STREAM-style copy: read + write bytes).
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use burn_ndarray::NdArray;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kv_tensor::{
    CodeBits, CompressedLayer, Encoded, Fp16Tensor, GroupAxis, PackedCodes, Positions, Quantized,
    Segment,
};

type B = NdArray<f32>;
const KVH: usize = 3;
const QH: usize = 9;
const D: usize = 64;

fn rand(shape: [usize; 4]) -> Tensor<B, 4> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

/// Random codes of `bits` `[1, KVH, t, w]` with scales grouped in 32 along `along`.
fn quantized(t: usize, w: usize, bits: CodeBits, along: GroupAxis) -> Encoded<B> {
    let dev = Default::default();
    let n = KVH * t * w;
    let max = bits.max_code() as i32 + 1;
    let codes: Vec<i32> = (0..n).map(|i| ((i * 7919) % max as usize) as i32).collect();
    let codes = Tensor::<B, 4, Int>::from_data(TensorData::new(codes, [1, KVH, t, w]), &dev);
    let sdims = match along {
        GroupAxis::Tokens => [1, KVH, t / 32, w],
        GroupAxis::Channels => [1, KVH, t, w / 32],
    };
    let s = || Fp16Tensor::encode(rand(sdims).abs().mul_scalar(0.1));
    Encoded::Quantized(
        Quantized::new(PackedCodes::pack(codes, bits), s(), s(), 32, along).expect("grouping"),
    )
}

/// A layer of `t` tokens: one compressed segment of `t − 64` tokens and a 64-token window.
fn layer(t: usize, kind: &str) -> CompressedLayer<B> {
    let mut l = CompressedLayer::<B>::new();
    let n = t - 64;
    let (k, v) = match kind {
        "full-fp16" => (
            Encoded::Half(Fp16Tensor::encode(rand([1, KVH, n, D]))),
            Encoded::Half(Fp16Tensor::encode(rand([1, KVH, n, D]))),
        ),
        "kivi-4" => (
            quantized(n, D, CodeBits::B4, GroupAxis::Tokens),
            quantized(n, D, CodeBits::B4, GroupAxis::Channels),
        ),
        "kivi-2" => (
            quantized(n, D, CodeBits::B2, GroupAxis::Tokens),
            quantized(n, D, CodeBits::B2, GroupAxis::Channels),
        ),
        _ => (
            Encoded::Projected {
                coeffs: Box::new(quantized(n, 32, CodeBits::B4, GroupAxis::Tokens)),
                basis: kv_tensor::Basis::new(Tensor::random(
                    [KVH, D, 32],
                    Distribution::Default,
                    &Default::default(),
                )),
            },
            quantized(n, D, CodeBits::B4, GroupAxis::Channels),
        ),
    };
    l.push_segment(Segment {
        positions: Positions::Contiguous { start: 0, len: n },
        k,
        v,
    })
    .expect("segment");
    l.push(rand([1, KVH, 64, D]), rand([1, KVH, 64, D]))
        .expect("window");
    l
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(20);
    let src = vec![1u8; 256 << 20];
    let mut dst = vec![0u8; 256 << 20];
    g.throughput(Throughput::Bytes(2 * src.len() as u64));
    g.bench_function("stream-copy/256MiB", |b| {
        b.iter(|| dst.copy_from_slice(&src));
    });
    for t in [2048usize, 8192] {
        for kind in ["full-fp16", "kivi-4", "kivi-2", "rank32-k4v4"] {
            let l = layer(t, kind);
            let q = rand([1, QH, 1, D]);
            g.throughput(Throughput::Bytes(l.footprint().total().get()));
            g.bench_function(format!("{kind}/{t}"), |b| {
                b.iter(|| l.attend(q.clone()).expect("attend"))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
