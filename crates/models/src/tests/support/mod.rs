//! Test support: a minimal GGUF writer and a tiny random Llama, so tests need no download.
#![allow(dead_code)]

/// A metadata value to write.
pub enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
}

/// Writes a GGUF v3 file with the given metadata and F32 tensors (dims fastest-first).
pub fn write_gguf(meta: &[(&str, Meta)], tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let typed: Vec<_> = tensors
        .iter()
        .map(|(n, d, v)| {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n.clone(), d.clone(), 0u32, bytes)
        })
        .collect();
    write_gguf_typed(meta, &typed)
}

/// Writes a GGUF v3 file with tensors given as (name, dims fastest-first, ggml type id, data).
pub fn write_gguf_typed(
    meta: &[(&str, Meta)],
    tensors: &[(String, Vec<usize>, u32, Vec<u8>)],
) -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(0x4655_4747u32.to_le_bytes());
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut b, k);
        match v {
            Meta::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::Str(x) => {
                b.extend(8u32.to_le_bytes());
                s(&mut b, x);
            }
            Meta::Strs(xs) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((xs.len() as u64).to_le_bytes());
                for x in xs {
                    s(&mut b, x);
                }
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend((*d as u64).to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += data.len().div_ceil(32) as u64 * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        let start = b.len();
        b.extend(data);
        while (b.len() - start) % 32 != 0 {
            b.push(0);
        }
    }
    b
}

/// `values` as ggml Q4_1 blocks (type id 3): per 32 values an f16 scale and minimum, then 16
/// bytes of nibbles (value `j` low, `j + 16` high).
pub fn q4_1_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks_exact(32) {
        let lo = block.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = half::f16::from_f32((hi - lo) / 15.0);
        let m = half::f16::from_f32(lo);
        let inv = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        let q = |x: f32| (((x - m.to_f32()) * inv).round().clamp(0.0, 15.0)) as u8;
        out.extend(d.to_le_bytes());
        out.extend(m.to_le_bytes());
        out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
    }
    out
}

/// `values` as ggml Q8_0 blocks (type id 8): per 32 values an f16 scale and 32 signed bytes.
pub fn q8_0_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |a, x| a.max(x.abs()));
        let d = half::f16::from_f32(amax / 127.0);
        let inv = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        out.extend(d.to_le_bytes());
        out.extend(
            block
                .iter()
                .map(|x| ((x * inv).round().clamp(-127.0, 127.0) as i8) as u8),
        );
    }
    out
}

/// The largest absolute difference of two equally long vectors, and the largest magnitude in
/// `want` (what logit comparisons scale their tolerance by).
pub fn worst_and_scale(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "compared vectors differ in length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    (worst, want.iter().fold(0f32, |m, x| m.max(x.abs())))
}

/// A deterministic pseudo-random stream (splitmix64) for weights and fuzzing.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn weights(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (self.uniform() * 2.0 - 1.0) * scale)
            .collect()
    }
}

pub const HIDDEN: usize = 32;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 8;
pub const FFN: usize = 48;
pub const VOCAB: usize = 40;
pub const LAYERS: usize = 2;

/// HF-layout weights of a tiny Llama: (HF name, [rows, cols] slowest-first, values).
pub fn tiny_hf_weights(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut r = Rng(seed);
    let mut w = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![VOCAB, HIDDEN],
            r.weights(VOCAB * HIDDEN, 1.0),
        ),
        (
            "model.norm.weight".to_string(),
            vec![HIDDEN],
            r.weights(HIDDEN, 0.2).iter().map(|x| 1.0 + x).collect(),
        ),
    ];
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let mut m = |name: &str, rows: usize, cols: usize| {
            (p(name), vec![rows, cols], r.weights(rows * cols, 0.3))
        };
        let items = [
            m("self_attn.q_proj.weight", HEADS * HEAD_DIM, HIDDEN),
            m("self_attn.k_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN),
            m("self_attn.v_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN),
            m("self_attn.o_proj.weight", HIDDEN, HEADS * HEAD_DIM),
            m("mlp.gate_proj.weight", FFN, HIDDEN),
            m("mlp.up_proj.weight", FFN, HIDDEN),
            m("mlp.down_proj.weight", HIDDEN, FFN),
        ];
        w.extend(items);
        w.push((p("input_layernorm.weight"), vec![HIDDEN], vec![1.0; HIDDEN]));
        w.push((
            p("post_attention_layernorm.weight"),
            vec![HIDDEN],
            vec![1.0; HIDDEN],
        ));
    }
    w
}

/// llama.cpp's Q/K permutation from rotate-half rows to interleaved pairs: GGUF row
/// `(h, 2i + s)` is HF row `(h, s·d/2 + i)`.
pub fn permute_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let d = values.len() / cols / heads;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for s in 0..2 {
                let src = h * d + s * (d / 2) + i;
                let dst = h * d + 2 * i + s;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The tiny model as a GGUF file (arch `llama`, permuted Q/K, F32 tensors).
pub fn tiny_gguf(seed: u64) -> Vec<u8> {
    write_gguf(&tiny_meta(), &tiny_gguf_tensors(seed))
}

/// The tiny model as a GGUF file with quantised tensors, as llama.cpp writes them: the token
/// embedding in Q8_0, the matrices in Q4_1 except layer 0's V in Q8_0 (so its fused Q/K/V
/// mixes types) and the FFN down matrices in F32 (48 inputs are not whole 32-value blocks).
pub fn tiny_gguf_quantized(seed: u64) -> Vec<u8> {
    let tensors: Vec<_> = tiny_gguf_tensors(seed)
        .into_iter()
        .map(|(name, dims, v)| {
            let (ty, bytes) = if name == "token_embd.weight" || name == "blk.0.attn_v.weight" {
                (8, q8_0_bytes(&v))
            } else if dims.len() == 2 && dims[0] % 32 == 0 {
                (3, q4_1_bytes(&v))
            } else {
                (0, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            };
            (name, dims, ty, bytes)
        })
        .collect();
    write_gguf_typed(&tiny_meta(), &tensors)
}

/// The tiny model's tensors under GGUF names and layouts (dims fastest-first, permuted Q/K).
pub fn tiny_gguf_tensors(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let rename = |hf: &str| -> String {
        let hf = hf.strip_prefix("model.").unwrap_or(hf);
        match hf {
            "embed_tokens.weight" => "token_embd.weight".into(),
            "norm.weight" => "output_norm.weight".into(),
            _ => {
                let rest = hf.strip_prefix("layers.").expect("layer tensor");
                let (i, name) = rest.split_once('.').expect("index");
                let g = match name {
                    "self_attn.q_proj.weight" => "attn_q.weight",
                    "self_attn.k_proj.weight" => "attn_k.weight",
                    "self_attn.v_proj.weight" => "attn_v.weight",
                    "self_attn.o_proj.weight" => "attn_output.weight",
                    "mlp.gate_proj.weight" => "ffn_gate.weight",
                    "mlp.up_proj.weight" => "ffn_up.weight",
                    "mlp.down_proj.weight" => "ffn_down.weight",
                    "input_layernorm.weight" => "attn_norm.weight",
                    "post_attention_layernorm.weight" => "ffn_norm.weight",
                    other => panic!("unexpected {other}"),
                };
                format!("blk.{i}.{g}")
            }
        }
    };
    tiny_hf_weights(seed)
        .into_iter()
        .map(|(name, shape, v)| {
            let v = if name.ends_with("q_proj.weight") {
                permute_rows(&v, HEADS, shape[1])
            } else if name.ends_with("k_proj.weight") {
                permute_rows(&v, KV_HEADS, shape[1])
            } else {
                v
            };
            (rename(&name), shape.iter().rev().copied().collect(), v)
        })
        .collect()
}

/// The tiny model's GGUF metadata.
pub fn tiny_meta() -> Vec<(&'static str, Meta)> {
    vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.block_count", Meta::U32(LAYERS as u32)),
        ("llama.embedding_length", Meta::U32(HIDDEN as u32)),
        ("llama.attention.head_count", Meta::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Meta::U32(KV_HEADS as u32)),
        ("llama.feed_forward_length", Meta::U32(FFN as u32)),
        ("llama.context_length", Meta::U32(256)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.vocab_size", Meta::U32(VOCAB as u32)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Meta::Strs((0..VOCAB).map(|i| format!("t{i}")).collect()),
        ),
    ]
}

/// The tiny model's HF `config.json`.
pub fn tiny_config_json() -> String {
    format!(
        r#"{{"model_type":"llama","num_hidden_layers":{LAYERS},"hidden_size":{HIDDEN},"num_attention_heads":{HEADS},
"num_key_value_heads":{KV_HEADS},"intermediate_size":{FFN},"vocab_size":{VOCAB},"rope_theta":10000.0,
"rms_norm_eps":1e-5,"max_position_embeddings":256}}"#
    )
}
