//! Users' own data: samples in RULER's jsonl format, scored like RULER's tasks.
//!
//! One JSON object per line:
//! - `input` (required): the whole prompt, as RULER writes it;
//! - `outputs` (required, non-empty): the reference answers;
//! - `answer_prefix` (optional): the start of the model's answer (RULER's `answer_prefix`);
//! - `context` and `question` (optional, together): the prompt split in two, so the context is
//!   compressed before the question is seen (question-agnostic, as the built-in suite does).
//!   Without them the whole `input` is compressed, question included.
//!
//! Other fields (`index`, `length`, …) are ignored. The free answer is scored by RULER's
//! `string_match_all` or `string_match_part`; the teacher-forced target is the references
//! joined by `, `. `examples/dataset.jsonl` is a three-line example.
use crate::error::{EvalError, Result};
use crate::tasks::{Metric, Prompt, TaskSample, frame};
use models::{ChatTemplate, Tokenizer};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// One line of a RULER jsonl file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Line {
    /// The whole prompt.
    pub input: String,
    /// Reference answers.
    pub outputs: Vec<String>,
    /// The start of the answer.
    #[serde(default)]
    pub answer_prefix: Option<String>,
    /// The part compressed before the question is seen.
    #[serde(default)]
    pub context: Option<String>,
    /// The question, appended after compression.
    #[serde(default)]
    pub question: Option<String>,
}

/// A user data set: where it is and how its answers are scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The jsonl file.
    pub path: PathBuf,
    /// `string_match_all` (every reference must appear) or `string_match_part` (any).
    pub metric: Metric,
}

fn bad(path: &Path, line: usize, why: impl Into<String>) -> EvalError {
    EvalError::Dataset {
        path: path.to_path_buf(),
        line,
        why: why.into(),
    }
}

/// Parses every line of `text` (from `path`, for errors). Blank lines are skipped; a malformed
/// line is an error naming its line number, and nothing is dropped silently.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Line>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).map_err(|e| bad(path, i + 1, e.to_string()))?;
        if line.outputs.is_empty() || line.outputs.iter().all(|o| o.trim().is_empty()) {
            return Err(bad(path, i + 1, "`outputs` holds no reference answer"));
        }
        if line.context.is_some() != line.question.is_some() {
            return Err(bad(
                path,
                i + 1,
                "`context` and `question` come together (or neither)",
            ));
        }
        out.push(line);
    }
    if out.is_empty() {
        return Err(bad(path, 0, "no samples"));
    }
    Ok(out)
}

/// The data set's samples as token ids, framed by `chat` when given, each context at most
/// `max_context` tokens (a longer one is an error, never truncated).
pub fn load(
    d: &Dataset,
    tok: &Tokenizer,
    chat: Option<&ChatTemplate>,
    max_context: usize,
) -> Result<Vec<TaskSample>> {
    use crate::error::IoContext;
    let text = std::fs::read_to_string(&d.path).at(&d.path)?;
    // Records name their task with a `&'static str`; one name per data set and run.
    let name: &'static str = Box::leak(
        d.path
            .file_stem()
            .map_or("dataset".into(), |s| s.to_string_lossy().into_owned())
            .into_boxed_str(),
    );
    parse(&text, &d.path)?
        .into_iter()
        .enumerate()
        .map(|(i, line)| {
            let (context, question) = match (line.context, line.question) {
                (Some(c), Some(q)) => (c, q),
                _ => (line.input, String::new()),
            };
            let refs: Vec<String> = line.outputs;
            let prompt = Prompt {
                context,
                question,
                prefix: line.answer_prefix.unwrap_or_default(),
                target: format!(" {}", refs.join(", ")),
                refs: refs.clone(),
            };
            let (context, question) = frame(&prompt, chat)?;
            let context = tok.encode(&context)?;
            if context.len() > max_context {
                return Err(bad(
                    &d.path,
                    i + 1,
                    format!(
                        "the context is {} tokens; this model leaves room for {max_context}",
                        context.len()
                    ),
                ));
            }
            let target = tok.encode(&prompt.target)?;
            Ok(TaskSample {
                name,
                metric: d.metric,
                context,
                question: tok.encode(&question)?,
                max_new: target.len() + 4,
                target,
                refs,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented example parses, with each optional field where the docs say.
    #[test]
    fn the_example_file_parses() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/dataset.jsonl"
        ));
        let text = std::fs::read_to_string(path).expect("examples/dataset.jsonl");
        let lines = parse(&text, path).expect("the example is valid");
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].outputs, vec!["4821907".to_string()]);
        assert!(lines[0].context.is_none());
        assert_eq!(
            lines[1].question.as_deref(),
            Some("Where does Ada keep her keys?")
        );
        assert_eq!(lines[2].outputs.len(), 3);
        assert!(lines[2].answer_prefix.is_none());
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        let p = Path::new("d.jsonl");
        let cases = [
            (
                "{\"input\": \"x\", \"outputs\": [\"a\"]}\n{\"input\": 3}",
                2,
            ),
            ("{\"input\": \"x\", \"outputs\": []}", 1),
            (
                "{\"input\": \"x\", \"outputs\": [\"a\"], \"context\": \"c\"}",
                1,
            ),
            ("\n\nnot json", 3),
        ];
        for (text, want) in cases {
            match parse(text, p) {
                Err(EvalError::Dataset { line, .. }) => assert_eq!(line, want, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            parse("\n", p),
            Err(EvalError::Dataset { line: 0, .. })
        ));
    }
}
