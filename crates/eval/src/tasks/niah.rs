//! RULER's needle-in-a-haystack family: needles "One of the special magic {numbers} for {key}
//! is: {value}." hidden in a noise, prose or needle haystack; the question asks for the values
//! of one or more keys.
use super::{Prompt, Rng, Sources, and_list, depth, number, sentences, uuid};
use crate::error::Result;

/// RULER's repeated noise sentence.
pub const NOISE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// What fills the haystack.
#[derive(Debug, Clone, Copy)]
pub enum Haystack {
    /// The noise sentence, repeated.
    Noise,
    /// Prose from the corpus (RULER uses Paul Graham's essays).
    Essay,
    /// Needles with other random keys and values.
    Needles,
}

/// How keys or values are drawn.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// 7-digit numbers.
    Numbers,
    /// `word-word` pairs of corpus words (RULER: adjective-noun).
    Words,
    /// UUIDs.
    Uuids,
}

impl Kind {
    fn draw(self, src: &Sources<'_>, rng: &mut Rng) -> String {
        match self {
            Kind::Numbers => number(rng),
            Kind::Words => format!("{}-{}", src.word(rng), src.word(rng)),
            Kind::Uuids => uuid(rng),
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Numbers => "numbers",
            Kind::Words => "words",
            Kind::Uuids => "uuids",
        }
    }
}

/// One NIAH configuration (RULER's `num_needle_k/v/q`, `type_haystack`, `type_needle_k/v`).
pub struct Niah {
    pub haystack: Haystack,
    pub keys: usize,
    pub values: usize,
    pub queries: usize,
    pub key_kind: Kind,
    pub value_kind: Kind,
}

impl Niah {
    /// The prompt with `units` haystack units (words of prose, noise repeats or needles).
    pub fn build(&self, src: &Sources<'_>, rng: &mut Rng, units: usize) -> Result<Prompt> {
        let v = self.value_kind.plural();
        let needle =
            |key: &str, value: &str| format!("One of the special magic {v} for {key} is: {value}.");
        let mut keys = Vec::new();
        let mut values: Vec<Vec<String>> = Vec::new();
        let mut needles = Vec::new();
        for _ in 0..self.keys.max(self.queries) {
            let k = self.key_kind.draw(src, rng);
            let vs: Vec<String> = (0..self.values)
                .map(|_| self.value_kind.draw(src, rng))
                .collect();
            for value in &vs {
                needles.push(needle(&k, value));
            }
            keys.push(k);
            values.push(vs);
        }
        shuffle(&mut needles, rng);
        let haystack = match self.haystack {
            Haystack::Essay => {
                let words = src.essay_words(rng, units);
                let text = words.join(" ");
                let sents = sentences(&text);
                let mut at: Vec<usize> = needles
                    .iter()
                    .map(|_| (sents.len() as f64 * depth(rng) / 100.0) as usize)
                    .collect();
                at.sort_unstable();
                let mut out: Vec<&str> = Vec::new();
                let mut prev = 0;
                for (pos, n) in at.iter().zip(&needles) {
                    out.extend(&sents[prev..*pos]);
                    out.push(n);
                    prev = *pos;
                }
                out.extend(&sents[prev..]);
                out.join(" ")
            }
            Haystack::Noise | Haystack::Needles => {
                let mut lines: Vec<String> = (0..units)
                    .map(|_| match self.haystack {
                        Haystack::Noise => NOISE.to_string(),
                        _ => needle(
                            &self.key_kind.draw(src, rng),
                            &self.value_kind.draw(src, rng),
                        ),
                    })
                    .collect();
                for n in &needles {
                    let at = rng.below(lines.len() + 1);
                    lines.insert(at, n.clone());
                }
                lines.join("\n")
            }
        };
        // The queried keys (RULER samples them among the keys).
        let mut order: Vec<usize> = (0..keys.len()).collect();
        shuffle(&mut order, rng);
        order.truncate(self.queries);
        let query = and_list(&order.iter().map(|&i| keys[i].clone()).collect::<Vec<_>>());
        let refs: Vec<String> = order.iter().flat_map(|&i| values[i].clone()).collect();
        let single = self.queries * self.values == 1;
        let (some, noun, are_all, are) = if single {
            ("A", &v[..v.len() - 1], "is", "is")
        } else {
            ("Some", v, "are all", "are")
        };
        // Values in the order they appear in the context: the natural order to recite them.
        let mut in_order = refs.clone();
        in_order.sort_by_key(|r| haystack.find(r.as_str()).unwrap_or(usize::MAX));
        Ok(Prompt {
            context: format!(
                "{some} special magic {noun} {are} hidden within the following text. Make sure to memorize it. I will quiz you about the {noun} afterwards.\n{haystack}\n"
            ),
            question: format!(
                "What {are_all} the special magic {noun} for {query} mentioned in the provided text?"
            ),
            prefix: format!(
                "The special magic {noun} for {query} mentioned in the provided text {are}"
            ),
            target: format!(" {}.", in_order.join(", ")),
            refs,
        })
    }
}

/// Fisher–Yates with the sample's generator.
pub fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}
