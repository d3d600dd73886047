//! The second real model (Qwen2.5-Coder-0.5B-Instruct GGUF: qwen2 architecture, q/k/v bias,
//! rotate-half RoPE, Q5_0/Q4_K/Q6_K/Q8_0 tensors) answers a chat prompt sensibly.
use kv_tensor::FullCache;
use kvnd_tests::B;
use models::Sampling;

#[test]
fn qwen2_answers_a_coding_question() {
    let dir = models::paths::models_dir().expect("cache dir");
    let path = dir.join("Qwen2.5-Coder-0.5B-Instruct.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask fetch-model --name qwen2.5-coder-0.5b`",
        path.display()
    );
    let m = models::load_gguf::<B>(&path, &Default::default()).expect("loads");
    assert_eq!(m.model.config.arch, "qwen2");
    assert!(m.model.config.qkv_bias);
    let chat = m.chat.as_ref().expect("the file carries a chat template");
    let prompt = chat
        .user_prompt(
            "Write a Python function named square that returns the square of x. Only code.",
        )
        .expect("template renders");
    assert!(prompt.contains("<|im_start|>user"), "{prompt}");
    let ids = m.tokenizer.encode(&prompt).expect("encodes");
    let mut caches: Vec<FullCache<B>> = (0..m.model.config.layers)
        .map(|_| FullCache::new())
        .collect();
    let g = models::generate(
        &m.model,
        &m.tokenizer,
        &ids,
        &mut caches,
        &models::GenerateOptions {
            max_new: 24,
            sampling: Sampling::Greedy,
            ..Default::default()
        },
        |_| {},
    )
    .expect("generates");
    eprintln!("{}", g.text);
    assert!(g.text.contains("def square"), "answer: {:?}", g.text);
}
