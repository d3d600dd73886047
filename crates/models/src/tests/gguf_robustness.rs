//! Thousands of random truncations and byte flips of small GGUF files: every one is either
//! parsed or rejected with a typed error, never a panic; and a parsed file dequantises safely.

use super::support::{Rng, tiny_gguf};
use crate::ModelError;
use crate::gguf::Gguf;

fn parse_and_read(bytes: Vec<u8>) -> Result<(), ModelError> {
    let g = Gguf::parse(bytes)?;
    for name in g.tensors.keys() {
        g.tensor_f32(name)?;
    }
    crate::LlamaConfig::from_gguf(&g)?;
    Ok(())
}

#[test]
fn intact_file_parses() {
    parse_and_read(tiny_gguf(1)).expect("the written file is valid");
}

#[test]
fn every_truncation_is_a_typed_error() {
    let full = tiny_gguf(2);
    let mut r = Rng(7);
    // Every prefix of the header region, then random prefixes of the data region.
    let header_end = 4096.min(full.len());
    let mut cuts: Vec<usize> = (0..header_end).collect();
    cuts.extend((0..1000).map(|_| (r.next_u64() as usize) % full.len()));
    for cut in cuts {
        let res = parse_and_read(full[..cut].to_vec());
        assert!(res.is_err(), "truncation at {cut} of {} parsed", full.len());
        let msg = res.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!msg.is_empty());
    }
}

#[test]
fn byte_flips_never_panic() {
    let full = tiny_gguf(3);
    let mut r = Rng(11);
    let mut rejected = 0;
    for i in 0..3000 {
        let mut b = full.clone();
        // Flip 1–4 bytes, biased towards the header where structure lives.
        for _ in 0..1 + i % 4 {
            let limit = if r.next_u64().is_multiple_of(4) {
                b.len()
            } else {
                2048.min(b.len())
            };
            let at = (r.next_u64() as usize) % limit;
            b[at] ^= 1 << (r.next_u64() % 8);
        }
        if parse_and_read(b).is_err() {
            rejected += 1;
        }
    }
    // Many flips land in names or weights and are harmless; many others must be caught.
    assert!(
        rejected > 100,
        "only {rejected} of 3000 corrupted files were rejected"
    );
}

#[test]
fn specific_errors_name_the_problem() {
    let full = tiny_gguf(4);
    let mut bad_magic = full.clone();
    bad_magic[0] = b'X';
    assert!(matches!(
        Gguf::parse(bad_magic),
        Err(ModelError::BadMagic { .. })
    ));
    let mut bad_version = full.clone();
    bad_version[4] = 9;
    assert!(matches!(
        Gguf::parse(bad_version),
        Err(ModelError::UnsupportedVersion(9))
    ));
    let e = Gguf::parse(full[..full.len() - 10].to_vec()).expect_err("truncated data");
    assert!(e.to_string().contains("data of tensor"), "{e}");
    let g = Gguf::parse(full).expect("valid");
    let e = g.get_u64("llama.no_such_key").expect_err("missing key");
    assert!(e.to_string().contains("llama.no_such_key"), "{e}");
    assert!(matches!(
        g.tensor_f32("nope"),
        Err(ModelError::MissingTensor(_))
    ));
}
