//! Needles on the embedded model: does eviction keep a 7-digit value whole? SmolLM2 tokenises
//! digits one by one, so token-level top-k can keep some of a value's digits and drop others
//! (the cache then recalls "928" for "9282083"). ChunkKV's span selection keeps whole runs of
//! tokens. Measured at keep 0.25 with SnapKV scores, question-agnostic (the context is
//! compressed before the question is appended), on four needles in prose:
//! - per layer, whether the value's tokens are all kept, all dropped, or torn (some kept);
//! - the value's digits recalled under teacher forcing (argmax) through the compressed cache.
//!
//! - the same with the question inside the prefill (its queries are SnapKV's window).
//!
//! Prints all of it (`--nocapture`). Asserts that the full cache recalls every value (else the
//! probe says nothing), that span selection tears values in fewer layers than top-k (it can
//! still tear one that straddles a chunk boundary, or sits in the one chunk cut to meet the
//! exact budget), and that question-aware SnapKV with span selection recalls every value whole.
use axis_evict::{Evict, EvictSetting, ScorerKind, Selection};
use kv_tensor::{CompressionAxis, LayerCache, Positions, Ratio, Segment};
use kvnd_tests::{B, capture, model, prose};
use models::{Logits, PrefillOptions};
use router::{Axes, Expert};

const KEEP: f64 = 0.25;
const NEEDLES: [(&str, usize); 4] = [
    ("9282083", 600),
    ("4716350", 1500),
    ("7043918", 2300),
    ("5829164", 900),
];

/// The context with the needle, its ids, the value's token positions, and the question ids
/// with the value's ids appended (teacher forcing).
struct Needle {
    context: Vec<u32>,
    value_at: std::ops::Range<usize>,
    question: Vec<u32>,
    answer: Vec<u32>,
    value_len: usize,
}

fn needle(value: &str, at: usize) -> Needle {
    let tok = &model().tokenizer;
    let hay = prose(40_000 + at * 7, 3200);
    let split = hay[..at].rfind(". ").map_or(at, |i| i + 2);
    let before = format!(
        "Remember the special magic number.\n{}The special magic number is: ",
        &hay[..split]
    );
    let after = format!(". {}", &hay[split..]);
    let ids_before = tok.encode(&before).expect("encodes");
    let ids_value = tok.encode(&format!("{before}{value}")).expect("encodes");
    let context = tok
        .encode(&format!("{before}{value}{after}"))
        .expect("encodes");
    assert!(ids_value.starts_with(&ids_before) && context.starts_with(&ids_value));
    let question = tok
        .encode("\nWhat is the special magic number?")
        .expect("encodes");
    let mut answer = tok
        .encode(" The special magic number is: ")
        .expect("encodes");
    let value_ids = &ids_value[ids_before.len()..];
    answer.extend_from_slice(value_ids);
    Needle {
        value_at: ids_before.len()..ids_value.len(),
        value_len: value_ids.len(),
        context,
        question,
        answer,
    }
}

fn setting(selection: Selection) -> EvictSetting {
    EvictSetting::new(ScorerKind::Snapkv, Ratio::new(KEEP).expect("ratio"))
        .with_selection(selection)
}

/// Per selection, per layer: how many of the value's positions are kept (of `value_at.len()`),
/// from one capture of the context.
fn kept_per_layer(n: &Needle, settings: [&EvictSetting; 2]) -> [Vec<usize>; 2] {
    let caches = capture(&n.context, 32);
    settings.map(|s| {
        caches
            .iter()
            .map(|c| {
                let (k, v) = c.keys_values().expect("kv");
                let heads = k.dims()[1];
                let seg = Segment::dense(k, v, 0).expect("segment");
                let out = Evict::<B>::new()
                    .compress(seg, s, c.observed().expect("observed"))
                    .expect("evicts");
                let Positions::Explicit(p) = out.positions else {
                    panic!("eviction gives explicit positions")
                };
                let p: Vec<i64> = p.into_data().convert::<i64>().into_vec().expect("ints");
                // Span selection keeps the same positions in every head; count head 0.
                let head0 = &p[..p.len() / heads];
                n.value_at
                    .clone()
                    .filter(|&i| head0.contains(&(i as i64)))
                    .count()
            })
            .collect()
    })
}

/// Value digits whose teacher-forced argmax is right, through caches applying `expert`: the
/// context compressed before the question (question-agnostic), or with the question inside the
/// prefill and its queries as the scorer's window (question-aware).
fn recalled(n: &Needle, expert: Option<EvictSetting>, question_aware: bool) -> usize {
    let m = model();
    let axes = Axes::<B>::default();
    let e = Expert {
        evict: expert,
        ..Expert::FULL
    };
    let mut caches: Vec<_> = (0..m.model.config.layers)
        .map(|_| axes.cache(e.clone()))
        .collect();
    let (prompt, probe, window) = if question_aware {
        let prompt = [n.context.as_slice(), &n.question].concat();
        (prompt, n.answer.clone(), n.question.len())
    } else {
        (
            n.context.clone(),
            [n.question.as_slice(), &n.answer].concat(),
            32,
        )
    };
    let opts = PrefillOptions {
        observe_window: window,
        ..Default::default()
    };
    m.model
        .prefill(&prompt, &mut caches, &opts)
        .expect("prefill");
    let logits = m
        .model
        .forward(&probe, &mut caches, Logits::All)
        .expect("forward");
    let [t, _] = logits.dims();
    let argmax: Vec<i64> = logits
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .into_vec()
        .expect("ids");
    // Row i predicts probe[i + 1]: the value's digits are the last `value_len` probe tokens.
    (t - n.value_len..t)
        .filter(|&i| argmax[i - 1] == i64::from(probe[i]))
        .count()
}

#[test]
fn span_selection_keeps_values_whole() {
    let chunks = setting(solver::baselines::chunkkv());
    let topk = setting(Selection::TopK);
    let size = solver::baselines::CHUNK_TOKENS;
    let (mut torn_topk, mut torn_chunks) = (0, 0);
    let (mut aware_topk, mut aware_total) = (0, 0);
    println!(
        "needle | layers (whole, dropped, torn) top-k | chunks | digits recalled [full, top-k, \
         chunks] | question-aware [top-k, chunks]"
    );
    for (value, at) in NEEDLES {
        let n = needle(value, at);
        let len = n.value_at.len();
        let tally = |kept: &[usize]| {
            let whole = kept.iter().filter(|&&k| k == len).count();
            let dropped = kept.iter().filter(|&&k| k == 0).count();
            (whole, dropped, kept.len() - whole - dropped)
        };
        let [t, c] = kept_per_layer(&n, [&topk, &chunks]).map(|k| tally(&k));
        let straddles = n.value_at.start / size != (n.value_at.end - 1) / size;
        let digits = [None, Some(topk), Some(chunks)].map(|e| recalled(&n, e, false));
        let aware = [topk, chunks].map(|e| recalled(&n, Some(e), true));
        let note = if straddles {
            " (straddles a chunk boundary)"
        } else {
            ""
        };
        println!(
            "{value} at token {} | {t:?} | {c:?} | {digits:?} of {} | {aware:?}{note}",
            n.value_at.start, n.value_len,
        );
        assert_eq!(digits[0], n.value_len, "the full cache must recall {value}");
        assert_eq!(
            aware[1], n.value_len,
            "question-aware SnapKV with span selection at keep {KEEP} must recall {value} whole"
        );
        aware_topk += aware[0];
        aware_total += n.value_len;
        torn_topk += t.2;
        torn_chunks += c.2;
    }
    println!(
        "layers with a torn value: top-k {torn_topk}, chunks {torn_chunks}; question-aware \
         top-k recalled {aware_topk} of {aware_total} digits"
    );
    assert!(
        torn_chunks < torn_topk,
        "span selection tore values in {torn_chunks} layers, top-k in {torn_topk}"
    );
}
