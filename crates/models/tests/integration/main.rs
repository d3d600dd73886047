//! The models crate's tests on tiny model files the tests write themselves, in one test binary:
//! every test binary instantiates burn's CPU backend and the decoder anew (~100 s of compile
//! each on the 2-core CI machine), so one binary rather than four saves minutes of every build.
mod support;

mod block_decode;
mod decode_batch;
mod gguf_robustness;
mod rope_layouts;
