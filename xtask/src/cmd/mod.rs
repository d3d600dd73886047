//! One file per command; each parses its arguments and calls the libraries.
pub mod bench;
pub mod calibrate;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod logits;
pub mod longgen;
pub mod moqae;
pub mod solve;
pub mod test;
pub mod validate_proxy;
