//! The cross-crate tests on the real models, in one test binary: every test binary instantiates
//! burn's CPU backend and the decoder anew (~90 s of compile each on the 2-core CI machine), so
//! one binary rather than six saves minutes of every clean build, and the embedded model loads
//! once for all of them (`kvnd_tests::model`).
mod eval_harness;
mod evict;
mod lowrank;
mod proxy_vs_kl;
mod quant;
mod qwen2_chat;
mod reference_logits;
