//! Dequantisation of ggml tensor types to f32, block by block, following the block layouts of
//! ggml (llama.cpp): the legacy 32-value blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the 256-value
//! k-quant super-blocks (Q4_K, Q5_K, Q6_K).
use half::{bf16, f16};

/// A ggml tensor type this crate can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 4-bit, scale only.
    Q4_0,
    /// 4-bit, scale and minimum.
    Q4_1,
    /// 5-bit, scale only.
    Q5_0,
    /// 5-bit, scale and minimum.
    Q5_1,
    /// 8-bit, scale only.
    Q8_0,
    /// 4-bit k-quant.
    Q4K,
    /// 5-bit k-quant.
    Q5K,
    /// 6-bit k-quant.
    Q6K,
}

const QK_K: usize = 256;

impl GgmlType {
    /// From the ggml type id; `None` for types we do not dequantise.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of `n` values (`None` if `n` is not a whole number of blocks or overflows).
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bv = self.block_values() as u64;
        if !n.is_multiple_of(bv) {
            return None;
        }
        (n / bv).checked_mul(self.block_bytes() as u64)
    }

    /// Dequantises `data` (exactly `bytes_for(out.len())` bytes) into `out`.
    pub fn dequantize(self, data: &[u8], out: &mut [f32]) {
        let bv = self.block_values();
        let bb = self.block_bytes();
        for (block, y) in data.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
            match self {
                GgmlType::F32 => {
                    y[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]])
                }
                GgmlType::F16 => y[0] = half(block, 0),
                GgmlType::BF16 => y[0] = bf16::from_le_bytes([block[0], block[1]]).to_f32(),
                GgmlType::Q4_0 => q4_0(block, y),
                GgmlType::Q4_1 => q4_1(block, y),
                GgmlType::Q5_0 => q5_0(block, y),
                GgmlType::Q5_1 => q5_1(block, y),
                GgmlType::Q8_0 => q8_0(block, y),
                GgmlType::Q4K => q4_k(block, y),
                GgmlType::Q5K => q5_k(block, y),
                GgmlType::Q6K => q6_k(block, y),
            }
        }
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// The 6-bit scale and minimum of sub-block `j` packed in the 12 scale bytes of Q4_K / Q5_K.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        let d = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (d as f32, m as f32)
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (c, chunk) in y.chunks_exact_mut(64).enumerate() {
        let q = &qs[c * 32..c * 32 + 32];
        let (s1, m1) = scale_min_k4(2 * c, scales);
        let (s2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        for l in 0..32 {
            chunk[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            chunk[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (c, chunk) in y.chunks_exact_mut(64).enumerate() {
        let ql = &qs[c * 32..c * 32 + 32];
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let (s1, m1) = scale_min_k4(2 * c, scales);
        let (s2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            chunk[l] = d1 * ((ql[l] & 0x0F) + hi1) as f32 - m1;
            chunk[l + 32] = d2 * ((ql[l] >> 4) + hi2) as f32 - m2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = half(b, 208);
    for (n, chunk) in y.chunks_exact_mut(128).enumerate() {
        let ql = &ql_all[n * 64..n * 64 + 64];
        let qh = &qh_all[n * 32..n * 32 + 32];
        let sc = &sc_all[n * 8..n * 8 + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            chunk[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            chunk[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            chunk[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            chunk[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_1_block() {
        let mut b = Vec::new();
        b.extend(h(0.5));
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0f32; 32];
        GgmlType::Q4_1.dequantize(&b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.5 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn q8_0_and_q4_0_blocks() {
        let mut b = Vec::from(h(0.25));
        b.extend((0..32).map(|j: i32| (j - 16) as i8 as u8));
        let mut y = [0f32; 32];
        GgmlType::Q8_0.dequantize(&b, &mut y);
        assert!(
            y.iter()
                .enumerate()
                .all(|(j, v)| *v == (j as f32 - 16.0) * 0.25)
        );

        let mut b = Vec::from(h(2.0));
        b.extend([0x8Fu8; 16]);
        GgmlType::Q4_0.dequantize(&b, &mut y);
        assert!(y[..16].iter().all(|v| *v == 14.0) && y[16..].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn q5_0_high_bits() {
        // All high bits set: codes 16..31 → (code − 16) · d.
        let mut b = Vec::from(h(1.0));
        b.extend(u32::MAX.to_le_bytes());
        b.extend([0x21u8; 16]);
        let mut y = [0f32; 32];
        GgmlType::Q5_0.dequantize(&b, &mut y);
        assert!(y[..16].iter().all(|v| *v == 1.0), "{y:?}");
        assert!(y[16..].iter().all(|v| *v == 2.0), "{y:?}");
    }

    #[test]
    fn q6_k_constant_block() {
        // ql = 0, qh = 0 → q = −32 everywhere; scales 1 → y = −32 d.
        let mut b = vec![0u8; 192];
        b.extend([1u8; 16]);
        b.extend(h(0.5));
        let mut y = [0f32; 256];
        GgmlType::Q6K.dequantize(&b, &mut y);
        assert!(y.iter().all(|v| *v == -16.0));
    }

    #[test]
    fn q4_k_scales() {
        // d = 1, dmin = 1, sub-block scales 1 and mins 0 for j < 4 → y = code.
        let mut b = Vec::from(h(1.0));
        b.extend(h(1.0));
        let mut sc = [0u8; 12];
        sc[..4].copy_from_slice(&[1, 1, 1, 1]);
        sc[8..12].copy_from_slice(&[0x01, 0x01, 0x01, 0x01]);
        b.extend(sc);
        b.extend([0x53u8; 128]);
        let mut y = [0f32; 256];
        GgmlType::Q4K.dequantize(&b, &mut y);
        assert_eq!(&y[..2], &[3.0, 3.0]);
        assert_eq!(y[32], 5.0);
    }

    #[test]
    fn q5_1_block() {
        // d = 0.5, m = −4, high bits only on the first half: codes j | 16 and (15 − j).
        let mut b = Vec::from(h(0.5));
        b.extend(h(-4.0));
        b.extend(0x0000_FFFFu32.to_le_bytes());
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0f32; 32];
        GgmlType::Q5_1.dequantize(&b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 + 16.0) * 0.5 - 4.0, "low {j}");
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.5 - 4.0, "high {j}");
        }
    }

    #[test]
    fn q5_k_high_bits_and_scales() {
        // d = 1, dmin = 0.5; sub-block 0: scale 2, min 3 (j < 4 layout); qh bit 0 set for all
        // l → +16 on the first 32 values; ql low nibble 1 → code 17.
        let mut b = Vec::from(h(1.0));
        b.extend(h(0.5));
        let mut sc = [0u8; 12];
        sc[0] = 2;
        sc[4] = 3;
        b.extend(sc);
        b.extend([0x01u8; 32]); // qh
        b.extend([0x01u8; 128]); // ql
        let mut y = [0f32; 256];
        GgmlType::Q5K.dequantize(&b, &mut y);
        assert_eq!(y[0], 2.0 * 17.0 - 0.5 * 3.0);
        assert_eq!(y[31], 2.0 * 17.0 - 0.5 * 3.0);
        // Sub-block 1 has scale 0 and min 0.
        assert_eq!(y[32], 0.0);
    }

    #[test]
    fn float_types() {
        let mut y = [0f32; 1];
        GgmlType::F16.dequantize(&h(-2.5), &mut y);
        assert_eq!(y[0], -2.5);
        GgmlType::BF16.dequantize(&half::bf16::from_f32(3.0).to_le_bytes(), &mut y);
        assert_eq!(y[0], 3.0);
        GgmlType::F32.dequantize(&1.25f32.to_le_bytes(), &mut y);
        assert_eq!(y[0], 1.25);
    }

    #[test]
    fn sizes() {
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q4_1.bytes_for(33), None);
        assert_eq!(GgmlType::Q6K.bytes_for(512), Some(420));
    }
}
