//! RULER's frequent-words extraction: coded six-letter words drawn with Zipf frequencies
//! (α = 2; the most frequent is the noise token `...`); the question asks for the three most
//! frequent coded words.
use super::niah::shuffle;
use super::{Prompt, Rng};
use crate::error::Result;

const VOCAB: usize = 2000;
const ALPHA: f64 = 2.0;
/// ζ(2) = π²/6, the normaliser of the Zipf weights.
const ZETA_2: f64 = std::f64::consts::PI * std::f64::consts::PI / 6.0;

/// The prompt with about `units` coded words.
pub fn build(rng: &mut Rng, units: usize) -> Result<Prompt> {
    let mut vocab: Vec<String> = Vec::with_capacity(VOCAB);
    let mut seen = std::collections::HashSet::new();
    while vocab.len() < VOCAB {
        let w: String = (0..6)
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect();
        if seen.insert(w.clone()) {
            vocab.push(w);
        }
    }
    vocab[0] = "...".into();
    let mut words: Vec<&str> = Vec::new();
    for (k, w) in vocab.iter().enumerate() {
        let count = (units as f64 * ((k + 1) as f64).powf(-ALPHA) / ZETA_2) as usize;
        words.extend(std::iter::repeat_n(w.as_str(), count));
    }
    shuffle(&mut words, rng);
    let answer: Vec<String> = vocab[1..4].to_vec();
    Ok(Prompt {
        context: format!(
            "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {}\n",
            words.join(" ")
        ),
        question: "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?".into(),
        prefix: "Answer: According to the coded text above, the three most frequently appeared words are:".into(),
        target: format!(" {}", answer.join(", ")),
        refs: answer,
    })
}
