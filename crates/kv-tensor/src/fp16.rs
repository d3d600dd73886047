//! Half-precision storage for small per-group tensors (quantization scales and zero-points).
//!
//! Not every burn backend stores `f16` floats (burn-ndarray does not), so the half-precision
//! value is kept as its IEEE-754 binary16 bit pattern in a `u16` integer tensor: two bytes per
//! value on every backend, as the footprint says. Encoding and decoding are tensor ops (on host
//! backends encoding is one pass of the `half` crate); powers of two come from a 32-entry table
//! so decoding is exact.
use crate::KvBackend;
use crate::{Bytes, KvError};
use burn::tensor::{DType, Int, IntDType, Tensor, TensorCreationOptions, TensorData};

const MIN_NORMAL: f32 = 6.103_515_6e-5; // 2^-14
const MAX_HALF: f32 = 65504.0;

/// Binary16 bits of the largest binary16 value ≤ `x` (`x` finite, `|x|` ≤ 65504): the host
/// counterpart of [`Fp16Tensor::encode_floor`], bit for bit, for quantizers that work on host
/// vectors.
pub fn f16_floor_bits(x: f32) -> u16 {
    f16_directed(x, true)
}

/// Binary16 bits of the smallest binary16 value ≥ `x` (the host [`Fp16Tensor::encode_ceil`]).
pub fn f16_ceil_bits(x: f32) -> u16 {
    f16_directed(x, false)
}

/// The value of binary16 bits, exactly.
pub fn f16_value(bits: u16) -> f32 {
    crate::host_segment::f16_to_f32(bits)
}

/// Nearest, then one step towards the wanted side where nearest overshot (as
/// [`Fp16Tensor::encode_directed`] does with tensor ops).
fn f16_directed(x: f32, floor: bool) -> u16 {
    let near = half::f16::from_f32(x.clamp(-MAX_HALF, MAX_HALF)).to_bits();
    let dec = f16_value(near);
    let overshoot = if floor { dec > x } else { dec < x };
    if !overshoot {
        return near;
    }
    let negative = near >= 0x8000;
    if near & 0x7fff == 0 {
        // ±0: down is the smallest negative subnormal, up the smallest positive one.
        return if floor { 0x8001 } else { 1 };
    }
    // Down: positive values lose magnitude, negative ones gain it; up is the mirror image.
    if negative == floor {
        near + 1
    } else {
        near - 1
    }
}

/// A float tensor stored as binary16 bit patterns (`u16`).
#[derive(Debug, Clone)]
pub struct Fp16Tensor<B: KvBackend, const D: usize> {
    bits: Tensor<B, D, Int>,
}

impl<B: KvBackend, const D: usize> Fp16Tensor<B, D> {
    /// The device holding the bits.
    pub fn device(&self) -> B::Device {
        self.bits.device()
    }

    /// Rounds `x` to the nearest binary16 value (saturating at ±65504) and stores its bits; an
    /// empty tensor stays empty. NaN is the caller's business: quantizers reject non-finite input before they get here.
    pub fn encode(x: Tensor<B, D>) -> Self {
        let device = x.device();
        let dims = x.dims();
        if dims.contains(&0) {
            // Nothing to round (an empty residual window); the lookup below cannot reshape
            // zero elements.
            return Self {
                bits: Tensor::<B, D, Int>::zeros(dims, &device).cast(IntDType::U16),
            };
        }
        match crate::host::host_copy(x) {
            Ok(v) => {
                // Host memory: one pass with the `half` crate (round to nearest even),
                // saturated like the tensor path. The tensor ops cost a dozen passes and a log.
                let bits: Vec<i32> = v
                    .iter()
                    .map(|a| half::f16::from_f32(a.clamp(-MAX_HALF, MAX_HALF)).to_bits() as i32)
                    .collect();
                let bits = Tensor::<B, D, Int>::from_data(TensorData::new(bits, dims), &device);
                Self {
                    bits: bits.cast(IntDType::U16),
                }
            }
            Err(x) => Self::encode_ops(x),
        }
    }

    /// [`Self::encode`] as tensor ops, for backends whose tensors do not live on the host.
    fn encode_ops(x: Tensor<B, D>) -> Self {
        let device = x.device();
        let dims = x.dims();
        let negative = x.clone().lower_elem(0.0);
        let a = x.abs().clamp_max(MAX_HALF);
        let subnormal = a.clone().lower_elem(MIN_NORMAL);

        // Normal numbers: a = m · 2^e with m ∈ [1, 2).
        let safe = a.clone().clamp_min(MIN_NORMAL);
        let e = (safe.clone().log() / std::f32::consts::LN_2)
            .floor()
            .clamp(-14.0, 15.0);
        let m = safe.clone() / pow2(e.clone(), &device, dims);
        // log2 can be off by one next to a power of two: correct both ways.
        let too_big = m.clone().greater_equal_elem(2.0);
        let e = e.clone().mask_where(too_big, e + 1.0);
        let m = safe.clone() / pow2(e.clone(), &device, dims);
        let too_small = m.clone().lower_elem(1.0);
        let e = e.clone().mask_where(too_small, e - 1.0);
        let m = safe / pow2(e.clone(), &device, dims);
        let mant = ((m - 1.0) * 1024.0).round();
        // Mantissa rounding up to 1024 carries into the exponent; that is still a valid pattern
        // because (e + 15) · 1024 + 1024 = (e + 16) · 1024 + 0 (and saturates at 65504 = 0x7BFF).
        let normal = ((e + 15.0) * 1024.0 + mant).clamp_max(31743.0);

        let sub = (a / 5.960_464_5e-8).round(); // 2^-24
        let magnitude = normal.mask_where(subnormal, sub);
        let bits = magnitude.clone().mask_where(negative, magnitude + 32768.0);
        Self {
            bits: bits.int().cast(IntDType::U16),
        }
    }

    /// The largest binary16 value ≤ `x` (`x` finite and within ±65504).
    pub fn encode_floor(x: Tensor<B, D>) -> Self {
        Self::encode_directed(x, true)
    }

    /// The smallest binary16 value ≥ `x` (`x` finite and within ±65504).
    pub fn encode_ceil(x: Tensor<B, D>) -> Self {
        Self::encode_directed(x, false)
    }

    /// Round to nearest, then step one ulp towards the wanted side where nearest overshot.
    fn encode_directed(x: Tensor<B, D>, floor: bool) -> Self {
        let near = Self::encode(x.clone());
        let dec = near.decode();
        let overshoot = if floor { dec.greater(x) } else { dec.lower(x) };
        let bits = near.bits.cast(IntDType::I32);
        let negative = bits.clone().greater_equal_elem(32768);
        let magnitude = bits.clone().remainder_scalar(32768);
        // Moving down: positive values lose magnitude (+0 becomes the smallest negative
        // subnormal), negative values gain it. Moving up is the mirror image.
        let (shrink_side, zero_step) = if floor {
            (negative.clone().bool_not(), 32769)
        } else {
            (negative.clone(), 1)
        };
        let is_zero = magnitude.equal_elem(0);
        let shrunk = bits.clone() - 1;
        let grown = bits.clone() + 1;
        let stepped = grown.mask_where(shrink_side, shrunk);
        let stepped = stepped.mask_fill(is_zero, zero_step);
        let out = bits.mask_where(overshoot, stepped);
        Self {
            bits: out.cast(IntDType::U16),
        }
    }

    /// Wraps binary16 bit patterns laid out row-major in `dims` (as [`f16_floor_bits`] and
    /// its kin produce them).
    pub fn from_bits(bits: &[u16], dims: [usize; D], device: &B::Device) -> Result<Self, KvError> {
        if bits.len() != dims.iter().product::<usize>() {
            return Err(KvError::Shape {
                context: "binary16 bits",
                expected: dims.to_vec(),
                got: vec![bits.len()],
            });
        }
        let data = TensorData::new(bits.to_vec(), dims);
        let opts = TensorCreationOptions::new(device.clone()).with_dtype(DType::U16);
        Ok(Self {
            bits: Tensor::<B, D, Int>::from_data(data, opts),
        })
    }

    /// Decodes to the backend's float type, exactly.
    pub fn decode(&self) -> Tensor<B, D> {
        let device = self.bits.device();
        let dims = self.bits.dims();
        if dims.contains(&0) {
            return Tensor::zeros(dims, &device);
        }
        let b = self.bits.clone().cast(IntDType::I32);
        let negative = b.clone().greater_equal_elem(32768);
        let mag = b.clone().remainder_scalar(32768);
        let e = mag.clone().div_scalar(1024);
        let m = mag.clone() - e.clone().mul_scalar(1024);
        let is_normal = e.clone().greater_elem(0);
        let significand = m.float() + is_normal.float() * 1024.0;
        // 2^(max(e,1) − 25): the subnormal range shares the scale of exponent 1.
        let n: usize = dims.iter().product();
        let table: Vec<f32> = (0..32).map(|k| 2f32.powi(k.max(1) - 25)).collect();
        let scale = Tensor::<B, 1>::from_data(TensorData::new(table, [32]), &device)
            .select(0, e.reshape([n]))
            .reshape(dims);
        let v = significand * scale;
        v.clone().mask_where(negative, v.neg())
    }

    /// The binary16 bit patterns (`u16` values in an integer tensor).
    pub fn bits(&self) -> &Tensor<B, D, Int> {
        &self.bits
    }

    /// The shape of the stored tensor.
    pub fn dims(&self) -> [usize; D] {
        self.bits.dims()
    }

    /// Bytes allocated (two per value).
    pub fn bytes(&self) -> Bytes {
        Bytes((self.bits.shape().num_elements() * self.bits.dtype().size()) as u64)
    }

    /// Reshapes the stored values.
    pub fn reshape<const D2: usize>(self, dims: [usize; D2]) -> Fp16Tensor<B, D2> {
        Fp16Tensor {
            bits: self.bits.reshape(dims),
        }
    }

    /// Concatenates along `dim`.
    pub fn cat(parts: Vec<Self>, dim: usize) -> Self {
        Self {
            bits: Tensor::cat(parts.into_iter().map(|p| p.bits).collect(), dim),
        }
    }
}

/// `2^e` for integer-valued float exponents in [-14, 16], exact via a table lookup.
fn pow2<B: KvBackend, const D: usize>(
    e: Tensor<B, D>,
    device: &B::Device,
    dims: [usize; D],
) -> Tensor<B, D> {
    let n: usize = dims.iter().product();
    let table: Vec<f32> = (-14..=16).map(|k| 2f32.powi(k)).collect();
    let idx = (e + 14.0).clamp(0.0, 30.0).int().reshape([n]);
    Tensor::<B, 1>::from_data(TensorData::new(table, [31]), device)
        .select(0, idx)
        .reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_ndarray::NdArray;
    use half::f16;
    use proptest::prelude::*;

    type B = NdArray<f32>;

    fn check(values: Vec<f32>) {
        let device = Default::default();
        let n = values.len();
        let t = Tensor::<B, 1>::from_data(TensorData::new(values.clone(), [n]), &device);
        // The host pass and the tensor ops (the GPU path) each round to nearest.
        for enc in [
            Fp16Tensor::encode(t.clone()),
            Fp16Tensor::encode_ops(t.clone()),
        ] {
            check_encoded(&values, enc);
        }
    }

    fn check_encoded(values: &[f32], enc: Fp16Tensor<B, 1>) {
        let n = values.len();
        assert_eq!(enc.bytes(), Bytes(2 * n as u64));
        let bits: Vec<i64> = enc
            .bits
            .clone()
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("int");
        let dec: Vec<f32> = enc.decode().into_data().to_vec().expect("f32");
        for ((&x, &b), &d) in values.iter().zip(&bits).zip(&dec) {
            let reference = f16::from_f32(x.clamp(-MAX_HALF, MAX_HALF));
            // Decoding is exact: it matches the bit pattern's value.
            assert_eq!(d, f16::from_bits(b as u16).to_f32(), "decode of {b:#x}");
            // Encoding is round-to-nearest: at most one ulp from the reference (ties may differ).
            let ulp = (reference.to_f32().abs() * 2f32.powi(-10)).max(5.97e-8);
            assert!(
                (d - reference.to_f32()).abs() <= ulp,
                "x={x} got {d} want {reference}"
            );
        }
    }

    /// An empty window encodes to an empty tensor (it panicked in burn's reshape before).
    #[test]
    fn empty_stays_empty() {
        let x = Tensor::<B, 4>::zeros([1, 3, 0, 64], &Default::default());
        let h = Fp16Tensor::encode(x);
        assert_eq!(h.dims(), [1, 3, 0, 64]);
        assert_eq!(h.decode().dims(), [1, 3, 0, 64]);
    }

    #[test]
    fn special_values() {
        check(vec![
            0.0,
            1.0,
            -1.0,
            2.0,
            0.5,
            65504.0,
            1e9,
            -1e9,
            6.1035156e-5,
            1e-7,
            3.0e-6,
            1.0 / 3.0,
        ]);
    }

    fn directed(values: Vec<f32>) {
        let device = Default::default();
        let n = values.len();
        let t = Tensor::<B, 1>::from_data(TensorData::new(values.clone(), [n]), &device);
        let (floor, ceil) = (
            Fp16Tensor::encode_floor(t.clone()),
            Fp16Tensor::encode_ceil(t),
        );
        // The host helpers store the same bits as the tensor ops.
        let bits = |e: &Fp16Tensor<B, 1>| -> Vec<i64> {
            e.bits()
                .clone()
                .into_data()
                .convert::<i64>()
                .to_vec()
                .expect("bits")
        };
        let host =
            |f: fn(f32) -> u16| -> Vec<i64> { values.iter().map(|&x| f(x) as i64).collect() };
        assert_eq!(bits(&floor), host(super::f16_floor_bits));
        assert_eq!(bits(&ceil), host(super::f16_ceil_bits));
        let lo: Vec<f32> = floor.decode().into_data().to_vec().expect("f32");
        let hi: Vec<f32> = ceil.decode().into_data().to_vec().expect("f32");
        for ((&x, &l), &h) in values.iter().zip(&lo).zip(&hi) {
            assert!(l <= x && x <= h, "x={x} floor={l} ceil={h}");
            let ulp = (x.abs() * 2f32.powi(-10)).max(5.97e-8) * 1.01;
            assert!(x - l <= ulp && h - x <= ulp, "x={x} floor={l} ceil={h}");
        }
    }

    #[test]
    fn directed_rounding_edges() {
        directed(vec![
            0.0, -0.0, 1.0, -1.0, 0.1, -0.1, 1e-8, -1e-8, 3.0e-5, 65000.0, -65000.0,
        ]);
    }

    proptest! {
        #[test]
        fn floor_and_ceil_bracket(v in prop::collection::vec(-60000f32..60000f32, 1..64),
                                  small in prop::collection::vec(-1e-4f32..1e-4f32, 1..64)) {
            directed(v);
            directed(small);
        }

        #[test]
        fn encode_is_nearest_and_decode_exact(v in prop::collection::vec(-70000f32..70000f32, 1..64),
                                              small in prop::collection::vec(-1e-3f32..1e-3f32, 1..64)) {
            check(v);
            check(small);
        }
    }
}
