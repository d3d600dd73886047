//! Compressed-domain attention against decode-then-attend, for every way a layer can be stored.
//!
//! Layers are built from random segments of every encoding (f32, fp16, packed codes of 2/3/4/8
//! bits grouped along tokens or channels with several group sizes, low-rank coefficients in
//! each of those with a basis, ragged head-wise sides), an empty or filled window, grouped query
//! heads and batches. The reference decodes every segment through the tensor path
//! ([`Encoded::decode`], independent of the host kernels) and runs burn's dense attention with
//! the padding mask; the layer must match it through both of its own paths: the host kernels
//! reading the stored form (query blocks of a prefill chunk split and merged) and the part-by-part tensor path (any query count).
use crate::{
    Basis, CodeBits, CompressedLayer, Encoded, Fp16Tensor, GroupAxis, PackedCodes, Positions,
    Quantized, Reduce, Segment,
};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use burn_ndarray::NdArray;
use proptest::prelude::*;
use std::sync::Arc;

type B = NdArray<f32>;

/// A small deterministic generator (the proptest seed drives everything else).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
}

fn dev() -> burn_ndarray::NdArrayDevice {
    Default::default()
}

fn tensor(x: Vec<f32>, s: [usize; 4]) -> Tensor<B, 4> {
    Tensor::from_data(TensorData::new(x, s), &dev())
}

/// Random packed codes `[b, h, t, w]` with fp16 scales and minimums grouped along `along`.
fn quantized(
    g: &mut Gen,
    s: [usize; 4],
    bits: CodeBits,
    group: usize,
    along: GroupAxis,
) -> Quantized<B> {
    let n: usize = s.iter().product();
    let max = bits.max_code() as usize + 1;
    let codes: Vec<i32> = (0..n).map(|_| g.below(max) as i32).collect();
    let codes = Tensor::<B, 4, Int>::from_data(TensorData::new(codes, s), &dev());
    let sdims = match along {
        GroupAxis::Tokens => [s[0], s[1], s[2] / group, s[3]],
        GroupAxis::Channels => [s[0], s[1], s[2], s[3] / group],
    };
    let m: usize = sdims.iter().product();
    let scales: Vec<f32> = (0..m)
        .map(|_| (g.unit().abs() + 0.01) / max as f32)
        .collect();
    let mins = g.floats(m);
    Quantized::new(
        PackedCodes::pack(codes, bits),
        Fp16Tensor::encode(tensor(scales, sdims)),
        Fp16Tensor::encode(tensor(mins, sdims)),
        group,
        along,
    )
    .expect("consistent grouping")
}

/// One side of `[b, h, t, w]` in a random plain encoding (f32, fp16 or packed codes).
fn plain(g: &mut Gen, s: [usize; 4]) -> Encoded<B> {
    let [_, _, t, w] = s;
    let groups = |len: usize| {
        [8usize, 16, 32]
            .into_iter()
            .filter(move |x| len.is_multiple_of(*x))
            .collect::<Vec<_>>()
    };
    match g.below(4) {
        0 => Encoded::Dense(tensor(g.floats(s.iter().product()), s)),
        1 => Encoded::Half(Fp16Tensor::encode(tensor(g.floats(s.iter().product()), s))),
        _ => {
            let bits = CodeBits::ALL[g.below(4)];
            let (along, options) = if g.below(2) == 0 {
                (GroupAxis::Tokens, groups(t))
            } else {
                (GroupAxis::Channels, groups(w))
            };
            match options.get(g.below(options.len().max(1))) {
                Some(&group) => Encoded::Quantized(quantized(g, s, bits, group, along)),
                None => Encoded::Half(Fp16Tensor::encode(tensor(g.floats(s.iter().product()), s))),
            }
        }
    }
}

/// One side, possibly projected onto a random basis of rank `r`.
fn side(g: &mut Gen, s: [usize; 4], basis: &Arc<Basis<B>>, project: bool) -> Encoded<B> {
    if project {
        let r = basis.tensor().dims()[2];
        Encoded::Projected {
            coeffs: Box::new(plain(g, [s[0], s[1], s[2], r])),
            basis: basis.clone(),
        }
    } else {
        plain(g, s)
    }
}

/// A random segment of `t` tokens: uniform, or ragged (batch 1) with heads of 8-multiple lengths.
fn segment(
    g: &mut Gen,
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    bases: &[Arc<Basis<B>>; 2],
) -> Segment<B> {
    if b == 1 && g.below(4) == 0 {
        let lens: Vec<usize> = (0..h).map(|_| 8 * (1 + g.below(3))).collect();
        let heads = |g: &mut Gen| -> Vec<Encoded<B>> {
            lens.iter().map(|&n| plain(g, [1, 1, n, d])).collect()
        };
        let k = heads(g);
        let v = heads(g);
        let positions = lens
            .iter()
            .map(|&n| {
                let p: Vec<i32> = (0..n as i32).map(|i| 3 * i).collect();
                Tensor::<B, 3, Int>::from_data(TensorData::new(p, [1, 1, n]), &dev())
            })
            .collect();
        return Segment {
            positions: Positions::Ragged(positions),
            k: Encoded::Ragged(k),
            v: Encoded::Ragged(v),
        };
    }
    let s = [b, h, t, d];
    let (pk, pv) = (g.below(3) == 0, g.below(3) == 0);
    Segment {
        positions: Positions::Contiguous { start: 0, len: t },
        k: side(g, s, &bases[0], pk),
        v: side(g, s, &bases[1], pv),
    }
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().expect("f32")
}

fn close(got: &[f32], want: &[f32], what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (i, (a, w)) in got.iter().zip(want).enumerate() {
        prop_assert!(
            (a - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{}: [{}] {} vs {}",
            what,
            i,
            a,
            w
        );
    }
    Ok(())
}

/// Builds a random layer and checks both attention paths, the attention mass and the
/// footprint against the reference.
fn check(
    seed: u64,
    b: usize,
    kvh: usize,
    group: usize,
    d: usize,
    window: usize,
) -> Result<(), TestCaseError> {
    let mut g = Gen(seed);
    let qh = kvh * group;
    let r = [4usize, 8, 16][g.below(3)].min(d);
    // Now and then shared with other layers (cross-layer sharing): the layer counts its share.
    let sharing = 1 + g.below(3);
    let bases = [0, 1].map(|_| {
        let t =
            Tensor::<B, 3>::from_data(TensorData::new(g.floats(kvh * d * r), [kvh, d, r]), &dev());
        Basis::shared(t, sharing)
    });
    let mut layer = CompressedLayer::<B>::with_precision(crate::DensePrecision::F32);
    let (mut ks, mut vs, mut pads) = (Vec::new(), Vec::new(), Vec::new());
    let mut want_bytes = crate::Footprint::default();
    let mut projected = [false; 2];
    let mut ragged = false;
    for _ in 0..g.below(4) {
        // Now and then longer than one task's run of keys, so runs split and merge.
        let t = [32, 64, 288][g.below(3)];
        let s = segment(&mut g, b, kvh, t, d, &bases);
        ks.push(s.k.decode().expect("decode"));
        vs.push(s.v.decode().expect("decode"));
        let n = s.len();
        let pad = s.padding();
        ragged |= pad.is_some();
        pads.push(
            pad.unwrap_or_else(|| Tensor::<B, 3, Int>::zeros([b, kvh, n], &dev()).equal_elem(1)),
        );
        // Positions are held as i32 on the host, whatever the tensor's integer type.
        let mut f = s.k.footprint() + s.v.footprint();
        f.indices += crate::Bytes(match &s.positions {
            Positions::Ragged(p) => p.iter().map(|p| p.dims()[2] * 4).sum::<usize>() as u64,
            _ => 0,
        });
        want_bytes += f;
        projected[0] |= s.k.basis().is_some();
        projected[1] |= s.v.basis().is_some();
        layer.push_segment(s).expect("push");
    }
    if window > 0 {
        let k = tensor(g.floats(b * kvh * window * d), [b, kvh, window, d]);
        let v = tensor(g.floats(b * kvh * window * d), [b, kvh, window, d]);
        layer.push(k.clone(), v.clone()).expect("push");
        ks.push(k);
        vs.push(v);
        pads.push(Tensor::<B, 3, Int>::zeros([b, kvh, window], &dev()).equal_elem(1));
        want_bytes.dense += crate::Bytes((2 * b * kvh * window * d * 4) as u64);
    }
    for p in projected.iter().filter(|&&p| p) {
        let _ = p;
        want_bytes.basis += crate::Bytes((kvh * d * r * 4).div_ceil(sharing) as u64);
    }
    prop_assert_eq!(layer.footprint(), want_bytes);
    if ks.is_empty() {
        return Ok(());
    }
    let (k, v) = (Tensor::cat(ks, 2), Tensor::cat(vs, 2));
    let padding: Tensor<B, 3, Bool> = Tensor::cat(pads, 2);
    // The newest `tq` rows must be real tokens for the padded reference: the window's, or any
    // when no head is short.
    let limit = if ragged { window } else { layer.stored() };
    // 100 queries span several query blocks (`host_attention::ROWS_PER_TASK`).
    for tq in [1usize, 2, 8, 13, 100]
        .into_iter()
        .filter(|&tq| tq <= limit)
    {
        let q = tensor(g.floats(b * qh * tq * d), [b, qh, tq, d]);
        let (want, want_mass) =
            crate::attention_with_mass(q.clone(), k.clone(), v.clone(), Some(padding.clone()))
                .expect("reference");
        let want = values(want);
        close(
            &values(layer.attend(q.clone()).expect("attend")),
            &want,
            "attend",
        )?;
        let (out, mass) = layer.attend_with_mass(q.clone()).expect("attend with mass");
        close(&values(out), &want, "attend with mass")?;
        let want_mass = values(want_mass);
        close(&values(mass), &want_mass, "mass")?;
        let (_, want_peak) =
            crate::attention_with_peak(q.clone(), k.clone(), v.clone(), Some(padding.clone()))
                .expect("reference");
        let want_peak = values(want_peak);
        let (out, peak) = layer.attend_with_peak(q.clone()).expect("attend with peak");
        close(&values(out), &want, "attend with peak")?;
        close(&values(peak), &want_peak, "peak")?;
        for (reduce, want_stat) in [(Reduce::Sum, &want_mass), (Reduce::Max, &want_peak)] {
            let (out, stat) = layer
                .attend_parts_for_test(q.clone(), Some(reduce))
                .expect("tensor path");
            close(&values(out), &want, "tensor path")?;
            let stat = stat.expect("tensor path statistic");
            close(&values(stat), want_stat, "tensor path statistic")?;
        }
        close(
            &values(layer.attend_parts_for_test(q, None).expect("tensor path").0),
            &want,
            "tensor path without a statistic",
        )?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// Every encoding mix attends like decode-then-attend, through both paths, and holds the
    /// bytes its encodings count.
    #[test]
    fn compressed_attention_equals_decode_then_attend(
        seed in 0u64..1_000_000,
        b in 1usize..3,
        kvh in 1usize..4,
        group in 1usize..4,
        d in prop::sample::select(vec![8usize, 16, 24, 40, 64]),
        window in prop_oneof![Just(0usize), 1usize..20],
    ) {
        check(seed, b, kvh, group, d, window)?;
    }
}
