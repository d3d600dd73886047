//! The long-context task suite: RULER's synthetic tasks (Hsieh et al., 2024), re-implemented
//! from the published task definitions with our own prose as haystack, generated
//! deterministically from a seed and fitted to a target context length in tokens.
//!
//! Every task turns into a [`Prompt`]: the *context* (instruction + haystack, compressed
//! question-agnostically), the *question* (appended after compression, ending with RULER's answer
//! prefix), a teacher-forcing *target* (the gold answer as the model should continue), and the
//! *references* scored by RULER's string match.
//!
//! Adding a task: write `fn build(src, rng, units) -> Result<Prompt>` in its own file (the
//! prompt must grow with `units`, the haystack size), add a [`Task`] variant, and list it in
//! [`Task::ALL`], [`Task::name`], [`Task::metric`] and [`Task::build`].
mod cwe;
mod fwe;
mod niah;
mod qa;
mod vt;

pub use qa::QaSet;

use crate::error::{EvalError, Result};
pub use crate::rng::Rng;
use models::{ChatTemplate, Tokenizer};

/// RULER's scoring of a free-generation answer against its references, 0–100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// `string_match_all`: the share of references found in the prediction (case-insensitive).
    All,
    /// `string_match_part`: 100 if any reference is found in the prediction.
    Part,
}

impl Metric {
    /// RULER's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Metric::All => "string_match_all",
            Metric::Part => "string_match_part",
        }
    }

    /// Score of `prediction` against `refs`, 0–100.
    pub fn score(self, prediction: &str, refs: &[String]) -> f64 {
        if refs.is_empty() {
            return 0.0;
        }
        let pred = prediction.to_lowercase();
        let found = refs
            .iter()
            .filter(|r| pred.contains(&r.to_lowercase()))
            .count();
        match self {
            Metric::All => 100.0 * found as f64 / refs.len() as f64,
            Metric::Part => {
                if found > 0 {
                    100.0
                } else {
                    0.0
                }
            }
        }
    }
}

/// One RULER task (names and settings as in RULER's `synthetic.yaml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// One number needle in a repeated-noise haystack.
    NiahSingle1,
    /// One number needle in prose.
    NiahSingle2,
    /// One UUID needle in prose.
    NiahSingle3,
    /// Four keys in prose (three distractors), one queried.
    NiahMultikey1,
    /// A haystack made of needles with other keys (needle distractors), numbers.
    NiahMultikey2,
    /// A haystack made of needles, UUID keys and values.
    NiahMultikey3,
    /// Four values for one key, all asked for.
    NiahMultivalue,
    /// Four keys, all queried.
    NiahMultiquery,
    /// Variable tracking: one chain of four hops in noise.
    Vt,
    /// Common-words extraction: the ten most common words of a numbered list.
    Cwe,
    /// Frequent-words extraction: the three most frequent coded words (Zipf, α = 2).
    Fwe,
    /// QA over SQuAD paragraphs with distractor paragraphs.
    Qa1,
    /// QA over HotpotQA paragraphs with distractor paragraphs.
    Qa2,
}

impl Task {
    /// Every task, in RULER's order.
    pub const ALL: [Task; 13] = [
        Task::NiahSingle1,
        Task::NiahSingle2,
        Task::NiahSingle3,
        Task::NiahMultikey1,
        Task::NiahMultikey2,
        Task::NiahMultikey3,
        Task::NiahMultivalue,
        Task::NiahMultiquery,
        Task::Vt,
        Task::Cwe,
        Task::Fwe,
        Task::Qa1,
        Task::Qa2,
    ];

    /// RULER's name.
    pub fn name(self) -> &'static str {
        match self {
            Task::NiahSingle1 => "niah_single_1",
            Task::NiahSingle2 => "niah_single_2",
            Task::NiahSingle3 => "niah_single_3",
            Task::NiahMultikey1 => "niah_multikey_1",
            Task::NiahMultikey2 => "niah_multikey_2",
            Task::NiahMultikey3 => "niah_multikey_3",
            Task::NiahMultivalue => "niah_multivalue",
            Task::NiahMultiquery => "niah_multiquery",
            Task::Vt => "vt",
            Task::Cwe => "cwe",
            Task::Fwe => "fwe",
            Task::Qa1 => "qa_1",
            Task::Qa2 => "qa_2",
        }
    }

    /// RULER's metric for the task.
    pub fn metric(self) -> Metric {
        match self {
            Task::Qa1 | Task::Qa2 => Metric::Part,
            _ => Metric::All,
        }
    }

    /// RULER's generation length for the task (free generation stops earlier: see
    /// [`TaskSample::max_new`]).
    pub fn tokens_to_generate(self) -> usize {
        match self {
            Task::Vt => 30,
            Task::Cwe => 120,
            Task::Fwe => 50,
            Task::Qa1 | Task::Qa2 => 32,
            _ => 128,
        }
    }

    /// Whether the task needs the QA documents.
    pub fn needs_qa(self) -> bool {
        matches!(self, Task::Qa1 | Task::Qa2)
    }

    /// The prompt at haystack size `units`; `rng` is this sample's generator (the caller
    /// restarts it for every size tried, so the same sample grows rather than changes).
    fn build(self, src: &Sources<'_>, rng: &mut Rng, units: usize) -> Result<Prompt> {
        use niah::{Haystack, Kind, Niah};
        let niah = |haystack, keys, values, queries, k, v| Niah {
            haystack,
            keys,
            values,
            queries,
            key_kind: k,
            value_kind: v,
        };
        let p = match self {
            Task::NiahSingle1 => niah(Haystack::Noise, 1, 1, 1, Kind::Words, Kind::Numbers),
            Task::NiahSingle2 => niah(Haystack::Essay, 1, 1, 1, Kind::Words, Kind::Numbers),
            Task::NiahSingle3 => niah(Haystack::Essay, 1, 1, 1, Kind::Words, Kind::Uuids),
            Task::NiahMultikey1 => niah(Haystack::Essay, 4, 1, 1, Kind::Words, Kind::Numbers),
            Task::NiahMultikey2 => niah(Haystack::Needles, 1, 1, 1, Kind::Words, Kind::Numbers),
            Task::NiahMultikey3 => niah(Haystack::Needles, 1, 1, 1, Kind::Uuids, Kind::Uuids),
            Task::NiahMultivalue => niah(Haystack::Essay, 1, 4, 1, Kind::Words, Kind::Numbers),
            Task::NiahMultiquery => niah(Haystack::Essay, 4, 1, 4, Kind::Words, Kind::Numbers),
            Task::Vt => return vt::build(rng, units),
            Task::Cwe => return cwe::build(src, rng, units),
            Task::Fwe => return fwe::build(rng, units),
            Task::Qa1 | Task::Qa2 => {
                let set = if self == Task::Qa1 {
                    src.squad
                } else {
                    src.hotpot
                };
                let set = set.ok_or_else(|| EvalError::Task {
                    task: self.name(),
                    why: "needs the QA documents (fetch-data)".into(),
                })?;
                return qa::build(set, rng, units);
            }
        }
        .build(src, rng, units)?;
        Ok(p)
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    /// RULER's name (`niah_single_1`).
    fn from_str(s: &str) -> Result<Self, String> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
                format!("unknown task {s:?}; one of {}", names.join(", "))
            })
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the generators draw from.
pub struct Sources<'a> {
    /// Evaluation prose (the part of the corpus calibration never sees).
    pub prose: &'a str,
    /// Lower-case words of the corpus (keys and common words), sorted and unique.
    pub words: Vec<String>,
    /// SQuAD documents and questions, if fetched.
    pub squad: Option<&'a QaSet>,
    /// HotpotQA documents and questions, if fetched.
    pub hotpot: Option<&'a QaSet>,
}

impl<'a> Sources<'a> {
    /// Sources over `prose`, with the word list drawn from it.
    pub fn new(prose: &'a str, squad: Option<&'a QaSet>, hotpot: Option<&'a QaSet>) -> Self {
        let mut words: Vec<String> = prose
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| (4..=9).contains(&w.len()) && w.chars().all(|c| c.is_ascii_lowercase()))
            .map(str::to_string)
            .collect();
        words.sort_unstable();
        words.dedup();
        Self {
            prose,
            words,
            squad,
            hotpot,
        }
    }

    /// A random corpus word.
    fn word(&self, rng: &mut Rng) -> &str {
        &self.words[rng.below(self.words.len())]
    }

    /// `n` whitespace-separated words of prose from a random place.
    fn essay_words(&self, rng: &mut Rng, n: usize) -> Vec<&'a str> {
        let start = rng.below(self.prose.len() / 2);
        let mut at = start;
        while !self.prose.is_char_boundary(at) {
            at += 1;
        }
        self.prose[at..]
            .split_whitespace()
            .skip(1)
            .take(n)
            .collect()
    }
}

/// One generated task instance, as text.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Instruction and haystack: compressed before the question is seen.
    pub context: String,
    /// The question, appended after compression.
    pub question: String,
    /// RULER's answer prefix, the start of the model's turn.
    pub prefix: String,
    /// The gold continuation scored by teacher forcing.
    pub target: String,
    /// References for RULER's string match.
    pub refs: Vec<String>,
}

/// A prompt as token ids, fitted to a context length.
#[derive(Debug, Clone)]
pub struct TaskSample {
    /// The task's name (a RULER task's, or a user data set's).
    pub name: &'static str,
    /// How its free answer is scored.
    pub metric: Metric,
    /// Context token ids (at most the requested length).
    pub context: Vec<u32>,
    /// Question token ids.
    pub question: Vec<u32>,
    /// Teacher-forcing target ids.
    pub target: Vec<u32>,
    /// References.
    pub refs: Vec<String>,
    /// Free-generation cap in tokens: the gold answer's length plus four (room for
    /// separators; generating RULER's full budget would only add tokens after a wrong answer),
    /// at most RULER's `tokens_to_generate`.
    pub max_new: usize,
}

/// The prompt as the model sees it: (context, question + answer prefix). With a chat template
/// the context opens the user turn and the question closes it, the answer prefix starting the
/// assistant turn (RULER's framing for instruction-tuned models); without, plain text.
pub(crate) fn frame(p: &Prompt, chat: Option<&ChatTemplate>) -> Result<(String, String)> {
    match chat {
        None => Ok((p.context.clone(), format!("{} {}", p.question, p.prefix))),
        Some(c) => {
            const MARK: &str = "\u{1}kvnd-split\u{1}";
            let text = c.user_prompt(&format!("{}{MARK}{}", p.context, p.question))?;
            let (ctx, q) = text.split_once(MARK).ok_or(EvalError::Data {
                what: "chat template".into(),
                why: "it dropped part of the message".into(),
            })?;
            Ok((ctx.to_string(), format!("{q}{}", p.prefix)))
        }
    }
}

/// The instance of `task` with the largest haystack whose context fits in `tokens` tokens,
/// generated from `seed`, framed by `chat` when given.
pub fn fit(
    task: Task,
    src: &Sources<'_>,
    tok: &Tokenizer,
    chat: Option<&ChatTemplate>,
    tokens: usize,
    seed: u64,
) -> Result<TaskSample> {
    let len = |units: usize| -> Result<(usize, Prompt, String, String)> {
        let p = task.build(src, &mut Rng(seed), units)?;
        let (context, question) = frame(&p, chat)?;
        Ok((tok.encode(&context)?.len(), p, context, question))
    };
    // Grow until too long, then bisect on the haystack size.
    let (mut lo, mut hi) = (1usize, 8usize);
    let fail = |why: String| EvalError::Task {
        task: task.name(),
        why,
    };
    if len(lo)?.0 > tokens {
        return Err(fail(format!(
            "even the smallest instance is longer than {tokens} tokens"
        )));
    }
    while len(hi)?.0 <= tokens {
        lo = hi;
        hi *= 2;
        if hi >= 1 << 24 {
            return Err(fail("the prompt does not grow".into()));
        }
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if len(mid)?.0 <= tokens {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (_, p, context, question) = len(lo)?;
    let target = tok.encode(&p.target)?;
    if target.is_empty() {
        return Err(fail("empty answer".into()));
    }
    let max_new = (target.len() + 4).min(task.tokens_to_generate());
    Ok(TaskSample {
        name: task.name(),
        metric: task.metric(),
        context: tok.encode(&context)?,
        question: tok.encode(&question)?,
        target,
        refs: p.refs,
        max_new,
    })
}

/// RULER's needle depths: 40 evenly spaced percentages from 0 to 100.
fn depth(rng: &mut Rng) -> f64 {
    let i = rng.below(40);
    100.0 * i as f64 / 39.0
}

/// A 7-digit number.
fn number(rng: &mut Rng) -> String {
    (1_000_000 + rng.below(9_000_000)).to_string()
}

/// A version-4 UUID.
fn uuid(rng: &mut Rng) -> String {
    let a = rng.next_u64();
    let b = rng.next_u64();
    let hex = format!("{a:016x}{b:016x}");
    let h: Vec<char> = hex.chars().collect();
    let s = |r: std::ops::Range<usize>| h[r].iter().collect::<String>();
    let variant = ['8', '9', 'a', 'b'][(b >> 60) as usize & 3];
    format!(
        "{}-{}-4{}-{}{}-{}",
        s(0..8),
        s(8..12),
        s(13..16),
        variant,
        s(17..20),
        s(20..32)
    )
}

/// Splits prose into sentences (after `.`, `?` or `!` followed by a space).
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let b = text.as_bytes();
    for i in 0..b.len() {
        if matches!(b[i], b'.' | b'?' | b'!') && b.get(i + 1) == Some(&b' ') {
            out.push(text[start..=i].trim());
            start = i + 1;
        }
    }
    if start < text.len() && !text[start..].trim().is_empty() {
        out.push(text[start..].trim());
    }
    out
}

/// `a, b, and c` (RULER's query list).
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{}, and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_parse_back() {
        for t in Task::ALL {
            assert_eq!(t.name().parse::<Task>(), Ok(t));
        }
        assert!("niah".parse::<Task>().is_err());
    }

    #[test]
    fn string_match_all_and_part() {
        let refs = vec!["123".to_string(), "ABC".to_string()];
        assert_eq!(Metric::All.score("x 123 abc", &refs), 100.0);
        assert_eq!(Metric::All.score("x 123", &refs), 50.0);
        assert_eq!(Metric::All.score("nothing", &refs), 0.0);
        assert_eq!(Metric::Part.score("only abc", &refs), 100.0);
        assert_eq!(Metric::Part.score("nothing", &refs), 0.0);
        assert_eq!(Metric::Part.score("x", &[]), 0.0);
    }

    #[test]
    fn uuids_are_well_formed_and_distinct() {
        let mut rng = Rng(3);
        let a = uuid(&mut rng);
        let b = uuid(&mut rng);
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn sentences_and_lists() {
        assert_eq!(sentences("A b. C d? E"), vec!["A b.", "C d?", "E"]);
        assert_eq!(
            and_list(&["a".into(), "b".into(), "c".into()]),
            "a, b, and c"
        );
        assert_eq!(and_list(&["a".into()]), "a");
    }

    /// Sentences of eight distinct four-letter words (2,000 words in all).
    fn prose() -> String {
        let word = |i: usize| -> String {
            [i / 17_576, i / 676, i / 26, i]
                .iter()
                .map(|d| (b'a' + (d % 26) as u8) as char)
                .collect()
        };
        (0..250)
            .map(|s| {
                let words: Vec<String> = (0..8).map(|w| word(s * 8 + w + 1000)).collect();
                format!("{}. ", words.join(" "))
            })
            .collect()
    }

    /// Every non-QA task: deterministic in its seed, the prompt grows with the haystack, and
    /// every reference appears in the context (the task is answerable).
    #[test]
    fn tasks_are_deterministic_growing_and_answerable() {
        let text = prose();
        let src = Sources::new(&text, None, None);
        for task in Task::ALL.into_iter().filter(|t| !t.needs_qa()) {
            let a = task.build(&src, &mut Rng(7), 40).expect("build");
            let b = task.build(&src, &mut Rng(7), 40).expect("build");
            assert_eq!(a, b, "{}", task.name());
            let big = task.build(&src, &mut Rng(7), 80).expect("build");
            assert!(big.context.len() > a.context.len(), "{}", task.name());
            assert!(!a.refs.is_empty(), "{}", task.name());
            for r in &a.refs {
                assert!(
                    a.context.contains(r.as_str()),
                    "{}: {r} not in context",
                    task.name()
                );
                assert!(
                    a.target.contains(r.as_str()),
                    "{}: {r} not in target",
                    task.name()
                );
            }
            assert_eq!(task.metric(), Metric::All);
        }
    }
}
