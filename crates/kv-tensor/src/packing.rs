//! Bit packing of small integer codes into 32-bit words, on any burn backend.
//!
//! Codes of width 2, 4 and 8 fill a word exactly (16, 8, 4 codes); 3-bit codes are packed ten to
//! a word, leaving the top two bits unused (3.2 bits per code in the footprint). Packing and
//! unpacking are tensor ops (multiply by powers of two and sum / divide and take the remainder
//! in `u32`), so the packed words stay on the device: nothing goes through a host `Vec`.
use crate::KvBackend;
use crate::{Bytes, KvError};
use burn::tensor::{DType, Int, IntDType, Tensor, TensorCreationOptions, TensorData};
use serde::{Deserialize, Serialize};

/// A packable code width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum CodeBits {
    /// 2-bit codes, 16 per word.
    B2,
    /// 3-bit codes, 10 per word.
    B3,
    /// 4-bit codes, 8 per word.
    B4,
    /// 8-bit codes, 4 per word.
    B8,
}

impl CodeBits {
    /// Every packable width, narrowest first.
    pub const ALL: [CodeBits; 4] = [CodeBits::B2, CodeBits::B3, CodeBits::B4, CodeBits::B8];

    /// The width in bits.
    pub fn get(self) -> u8 {
        match self {
            CodeBits::B2 => 2,
            CodeBits::B3 => 3,
            CodeBits::B4 => 4,
            CodeBits::B8 => 8,
        }
    }

    /// How many codes share one 32-bit word.
    pub fn codes_per_word(self) -> usize {
        32 / self.get() as usize
    }

    /// The largest code, `2^bits − 1`.
    pub fn max_code(self) -> u32 {
        (1u32 << self.get()) - 1
    }

    /// Words needed for `n` codes.
    pub fn words_for(self, n: usize) -> usize {
        n.div_ceil(self.codes_per_word())
    }

    /// Bytes that packing `n` codes allocates.
    pub fn packed_bytes(self, n: usize) -> Bytes {
        Bytes((self.words_for(n) * 4) as u64)
    }
}

impl TryFrom<u8> for CodeBits {
    type Error = KvError;
    fn try_from(v: u8) -> Result<Self, KvError> {
        match v {
            2 => Ok(CodeBits::B2),
            3 => Ok(CodeBits::B3),
            4 => Ok(CodeBits::B4),
            8 => Ok(CodeBits::B8),
            _ => Err(KvError::InvalidValue {
                what: "code width",
                value: v.to_string(),
                allowed: "one of 2, 3, 4, 8",
            }),
        }
    }
}

impl From<CodeBits> for u8 {
    fn from(b: CodeBits) -> u8 {
        b.get()
    }
}

/// Integer codes of one width, packed into a device tensor of `u32` words.
#[derive(Debug, Clone)]
pub struct PackedCodes<B: KvBackend> {
    words: Tensor<B, 1, Int>,
    bits: CodeBits,
    shape: Vec<usize>,
}

impl<B: KvBackend> PackedCodes<B> {
    /// Packs `codes` (any shape, every value in `0..=bits.max_code()`; larger values are
    /// masked to their low bits) into 32-bit words.
    pub fn pack<const D: usize>(codes: Tensor<B, D, Int>, bits: CodeBits) -> Self {
        let shape = codes.dims().to_vec();
        let n: usize = shape.iter().product();
        let per = bits.codes_per_word();
        let words = bits.words_for(n);
        let device = codes.device();
        let mut flat = codes
            .reshape([n])
            .cast(IntDType::U32)
            .remainder_scalar(1u32 << bits.get());
        if words * per > n {
            let pad = Tensor::<B, 1, Int>::zeros([words * per - n], &device).cast(IntDType::U32);
            flat = Tensor::cat(vec![flat, pad], 0);
        }
        let words = flat
            .reshape([words, per])
            .mul(Self::shifts(bits, &device))
            .sum_dim(1)
            .reshape([words]);
        Self { words, bits, shape }
    }

    /// Packs codes held in host memory (`codes` row-major in `shape`; values above
    /// `bits.max_code()` are masked to their low bits, as in [`Self::pack`]), for quantizers
    /// that work on host vectors: one pass instead of a tensor op per step.
    pub fn from_codes(
        codes: &[u8],
        bits: CodeBits,
        shape: Vec<usize>,
        device: &B::Device,
    ) -> Result<Self, KvError> {
        if codes.len() != shape.iter().product::<usize>() {
            return Err(KvError::Shape {
                context: "codes to pack",
                expected: shape,
                got: vec![codes.len()],
            });
        }
        let words = match bits {
            CodeBits::B2 => pack_words::<16, 2>(codes),
            CodeBits::B3 => pack_words::<10, 3>(codes),
            CodeBits::B4 => pack_words::<8, 4>(codes),
            CodeBits::B8 => pack_words::<4, 8>(codes),
        };
        let n = words.len();
        let opts = TensorCreationOptions::new(device.clone()).with_dtype(DType::U32);
        let words = Tensor::<B, 1, Int>::from_data(TensorData::new(words, [n]), opts);
        Ok(Self { words, bits, shape })
    }

    /// Unpacks to integer codes of the original shape.
    pub fn unpack<const D: usize>(&self) -> Result<Tensor<B, D, Int>, KvError> {
        if self.shape.len() != D {
            return Err(KvError::Shape {
                context: "unpacking codes (rank)",
                expected: self.shape.clone(),
                got: vec![D],
            });
        }
        let n: usize = self.shape.iter().product();
        let per = self.bits.codes_per_word();
        let w = self.words.dims()[0];
        let device = self.words.device();
        let codes = self
            .words
            .clone()
            .reshape([w, 1])
            .div(Self::shifts(self.bits, &device))
            .remainder_scalar(1u32 << self.bits.get())
            .reshape([w * per])
            .slice(0..n)
            .cast(IntDType::I32);
        let mut dims = [0usize; D];
        dims.copy_from_slice(&self.shape);
        Ok(codes.reshape(dims))
    }

    /// `[1, per]` powers of two `2^(bits × j)`: the place of each code inside its word.
    fn shifts(bits: CodeBits, device: &B::Device) -> Tensor<B, 2, Int> {
        let per = bits.codes_per_word();
        let pow: Vec<u32> = (0..per)
            .map(|j| 1u32 << (bits.get() as usize * j))
            .collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(pow, [1, per]), device).cast(IntDType::U32)
    }

    /// The code width.
    pub fn bits(&self) -> CodeBits {
        self.bits
    }

    /// Shape of the unpacked codes.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The packed words (`u32`).
    pub fn words(&self) -> &Tensor<B, 1, Int> {
        &self.words
    }

    /// Bytes allocated for the packed words.
    pub fn bytes(&self) -> Bytes {
        Bytes((self.words.dims()[0] * self.words.dtype().size()) as u64)
    }
}

/// `PER` codes of `BITS` bits to a word, little-endian; a short last word is padded with
/// zeros. Widths fixed at compile time, so each word's shifts are constants.
fn pack_words<const PER: usize, const BITS: u32>(codes: &[u8]) -> Vec<u32> {
    let mask = (1u32 << BITS) - 1;
    let word = |c: &[u8]| {
        c.iter().enumerate().fold(0u32, |w, (i, &x)| {
            w | ((u32::from(x) & mask) << (BITS * i as u32))
        })
    };
    let chunks = codes.chunks_exact(PER);
    let tail = chunks.remainder();
    let mut out: Vec<u32> = chunks.map(word).collect();
    if !tail.is_empty() {
        out.push(word(tail));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_ndarray::NdArray;
    use proptest::prelude::*;

    type B = NdArray<f32>;

    fn roundtrip(bits: CodeBits, shape: [usize; 3], seed: u64) {
        let n: usize = shape.iter().product();
        let max = bits.max_code() as u64 + 1;
        // A cheap deterministic sequence that covers every code, including the maximum.
        let vals: Vec<i32> = (0..n as u64)
            .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed)) % max) as i32)
            .collect();
        let device = Default::default();
        let codes = Tensor::<B, 3, Int>::from_data(TensorData::new(vals.clone(), shape), &device);
        let packed = PackedCodes::pack(codes, bits);
        assert_eq!(packed.bytes(), bits.packed_bytes(n));
        assert_eq!(packed.bytes().get() as usize, bits.words_for(n) * 4);
        let back: Vec<i32> = packed
            .unpack::<3>()
            .expect("rank matches")
            .into_data()
            .convert::<i32>()
            .to_vec()
            .expect("i32 data");
        assert_eq!(back, vals);
        // Packing host codes gives the same words, the same bytes and the same shape.
        let host: Vec<u8> = vals.iter().map(|&v| v as u8).collect();
        let from = PackedCodes::<B>::from_codes(&host, bits, shape.to_vec(), &device)
            .expect("codes match the shape");
        let words = |p: &PackedCodes<B>| -> Vec<i64> {
            p.words()
                .clone()
                .into_data()
                .convert::<i64>()
                .to_vec()
                .expect("words")
        };
        assert_eq!(words(&from), words(&packed));
        assert_eq!(from.bytes(), packed.bytes());
        assert_eq!(from.shape(), packed.shape());
        assert!(PackedCodes::<B>::from_codes(&host, bits, vec![n + 1], &device).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn pack_unpack_roundtrips(
            bits in prop::sample::select(CodeBits::ALL.to_vec()),
            a in 1usize..4, b in 1usize..5, c in 1usize..70, seed in 0u64..1000,
        ) {
            roundtrip(bits, [a, b, c], seed);
        }
    }

    #[test]
    fn words_are_really_packed() {
        // 64 four-bit codes take 8 words = 32 bytes, not 64 × 4.
        let device = Default::default();
        let codes = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![15i32; 64], [64]), &device);
        let p = PackedCodes::pack(codes, CodeBits::B4);
        assert_eq!(p.words().dims(), [8]);
        assert_eq!(p.bytes(), Bytes(32));
        let w: Vec<u32> = p
            .words()
            .clone()
            .into_data()
            .convert::<u32>()
            .to_vec()
            .expect("u32");
        assert!(w.iter().all(|&x| x == u32::MAX));
    }

    #[test]
    fn wrong_rank_is_an_error() {
        let device = Default::default();
        let codes = Tensor::<B, 2, Int>::zeros([2, 3], &device);
        let p = PackedCodes::pack(codes, CodeBits::B2);
        assert!(p.unpack::<3>().is_err());
    }
}
