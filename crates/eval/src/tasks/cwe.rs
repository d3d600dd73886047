//! RULER's common-words extraction: a numbered list where ten words appear often and the rest
//! rarely; the question asks for the ten most common. One short in-context example precedes it.
use super::niah::shuffle;
use super::{Prompt, Rng, Sources};
use crate::error::{EvalError, Result};

const COMMON: usize = 10;

fn instruction(list: &str) -> String {
    format!(
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{list}\n"
    )
}

const QUESTION: &str = "Question: What are the 10 most common words in the above list?";
const PREFIX: &str = "Answer: The top 10 words that appear most often in the list are:";

/// `n` distinct words: the first `COMMON` repeated `common` times, the rest `rare` times, shuffled
/// and numbered; returns the list and the common words in order of first appearance.
fn list(
    src: &Sources<'_>,
    rng: &mut Rng,
    n: usize,
    common: usize,
    rare: usize,
) -> Result<(String, Vec<String>)> {
    if n > src.words.len() {
        return Err(EvalError::Task {
            task: "cwe",
            why: format!("{n} words asked, the corpus has {}", src.words.len()),
        });
    }
    let mut idx: Vec<usize> = (0..src.words.len()).collect();
    for i in 0..n {
        let j = i + rng.below(idx.len() - i);
        idx.swap(i, j);
    }
    let words: Vec<&str> = idx[..n].iter().map(|&i| src.words[i].as_str()).collect();
    let mut items: Vec<&str> = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let times = if i < COMMON { common } else { rare };
        items.extend(std::iter::repeat_n(*w, times));
    }
    shuffle(&mut items, rng);
    let mut answer: Vec<String> = words[..COMMON.min(n)]
        .iter()
        .map(|w| w.to_string())
        .collect();
    answer.sort_by_key(|w| items.iter().position(|x| x == w));
    let text = items
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{}. {w}", i + 1))
        .collect::<Vec<_>>()
        .join(" ");
    Ok((text, answer))
}

fn numbered(words: &[String]) -> String {
    words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{}. {w}", i + 1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The prompt with `units + COMMON` distinct words (RULER's settings below 4k tokens: common
/// words 6 times, the others once; the example: 20 words, 3 and 1).
pub fn build(src: &Sources<'_>, rng: &mut Rng, units: usize) -> Result<Prompt> {
    let (ex_list, ex_answer) = list(src, rng, 20, 3, 1)?;
    let example = format!(
        "{}{QUESTION} {PREFIX} {}\n",
        instruction(&ex_list),
        numbered(&ex_answer)
    );
    let (text, answer) = list(src, rng, units + COMMON, 6, 1)?;
    Ok(Prompt {
        context: format!("{example}{}", instruction(&text)),
        question: QUESTION.to_string(),
        prefix: PREFIX.to_string(),
        target: format!(" {}", numbered(&answer)),
        refs: answer,
    })
}
