//! The cross-crate tests on the real models, in one test binary: every test binary instantiates
//! burn's CPU backend and the decoder anew (minutes of compile each on a 2-core machine), so
//! one binary rather than six saves minutes of every clean build, and the embedded model loads
//! once for all of them (`kvnd_tests::model`).
mod calibration_losses;
mod chunked_kvzip;
mod eval_harness;
mod evict;
mod lowrank;
mod needle;
mod proxy_vs_kl;
mod quant;
mod qwen2_chat;
mod reference_logits;
mod seeds;
