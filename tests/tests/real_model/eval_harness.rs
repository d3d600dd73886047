//! The evaluation harness's pieces on the embedded model's tokenizer and chat template: task
//! samples fill their length, are reproducible from their seed, and hold their answer.
use eval::Task;
use eval::tasks::{Sources, fit};
use kvnd_tests::model;

fn corpus() -> String {
    let dir = models::paths::sotu_dir().expect("no cache directory: set KVND_HOME");
    eval::data::corpus(&dir).expect("run `cargo xtask fetch-data` first")
}

/// Each non-QA task at 1024 and 2048 tokens: the largest haystack that fits is used (the
/// context is within 85 % of the length), the same seed gives the same sample and another seed
/// another one, and the answer is not empty.
#[test]
fn task_samples_fill_their_length_and_repeat() {
    let m = model();
    let text = corpus();
    let src = Sources::new(eval::data::evaluation_text(&text), None, None);
    for task in Task::ALL.into_iter().filter(|t| !t.needs_qa()) {
        for len in [1024usize, 2048] {
            let a = fit(task, &src, &m.tokenizer, m.chat.as_ref(), len, 7).expect("fits");
            let n = a.context.len();
            assert!(
                n <= len && n * 100 >= len * 85,
                "{task} at {len}: {n} tokens"
            );
            assert!(
                !a.target.is_empty() && !a.refs.is_empty(),
                "{task}: no answer"
            );
            let again = fit(task, &src, &m.tokenizer, m.chat.as_ref(), len, 7).expect("fits");
            assert_eq!(a.context, again.context, "{task}: not reproducible");
            let other = fit(task, &src, &m.tokenizer, m.chat.as_ref(), len, 8).expect("fits");
            assert_ne!(a.context, other.context, "{task}: the seed changes nothing");
        }
    }
}

/// A length too short for even the smallest instance is a typed error naming the task.
#[test]
fn a_length_too_short_for_the_task_is_a_typed_error() {
    let m = model();
    let text = corpus();
    let src = Sources::new(eval::data::evaluation_text(&text), None, None);
    let err = fit(Task::Cwe, &src, &m.tokenizer, m.chat.as_ref(), 20, 1);
    assert!(
        matches!(err, Err(eval::EvalError::Task { task: "cwe", .. })),
        "{err:?}"
    );
    let qa = fit(Task::Qa1, &src, &m.tokenizer, m.chat.as_ref(), 1024, 1);
    assert!(
        matches!(qa, Err(eval::EvalError::Task { task: "qa_1", .. })),
        "{qa:?}"
    );
}
