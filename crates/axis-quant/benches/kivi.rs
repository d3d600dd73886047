//! Quantize+pack and unpack+dequantize throughput for 4096 tokens × 3 KV heads × 64 dims, in
//! GB/s of fp16-equivalent input (2 bytes per value).
use axis_quant::quantize;
use burn::tensor::{Distribution, Tensor};
use burn_ndarray::NdArray;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kv_tensor::{CodeBits, GroupAxis};

type B = NdArray<f32>;

fn bench(c: &mut Criterion) {
    let x = Tensor::<B, 4>::random(
        [1, 3, 4096, 64],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    let fp16_bytes = (3 * 4096 * 64 * 2) as u64;
    let mut g = c.benchmark_group("kivi");
    g.throughput(Throughput::Bytes(fp16_bytes));
    g.sample_size(20);
    for bits in [CodeBits::B2, CodeBits::B4, CodeBits::B8] {
        for (name, along) in [("keys", GroupAxis::Tokens), ("values", GroupAxis::Channels)] {
            g.bench_function(format!("quantize+pack/{name}/{}bit", bits.get()), |bch| {
                // burn-ndarray computes eagerly: the quantized tensor is the result (reading
                // its words back would time a copy of a shared array, not the quantizer).
                bch.iter(|| quantize(x.clone(), bits, 32, along, "bench").expect("quantize"))
            });
            let q = quantize(x.clone(), bits, 32, along, "bench").expect("quantize");
            g.bench_function(
                format!("unpack+dequantize/{name}/{}bit", bits.get()),
                |bch| bch.iter(|| q.decode().expect("decode").into_data()),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
