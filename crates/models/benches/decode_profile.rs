//! Times decode steps at a given context on the embedded model (profiling aid, release build):
//! `cargo bench -p models --bench decode_profile -- [context 2047] [steps 20] [f32|rows|kvzip]`,
//! `f32` to decode from f32 rows rather than the file's blocks, `rows` to time forwards of 1 to 64
//! tokens, `kvzip` to time a prefill with KVzip's reconstruction pass as well. A bench target, not an example, so that
//! `cargo test` does not compile it (each binary compiles burn's CPU backend once more).
use burn_ndarray::NdArray;
use kv_tensor::FullCache;
use models::{Logits, PrefillOptions};
use std::time::Instant;

type B = NdArray<f32>;

fn main() {
    // `cargo bench` adds `--bench`; only the positional arguments are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let ctx: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(2047);
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let path = models::paths::bench_model().expect("cache dir");
    let mut m = models::load_gguf::<B>(&path, &Default::default()).expect("model loads");
    // Third argument `f32`: decode from f32 host rows instead of the file's blocks.
    if args.get(2).map(String::as_str) == Some("f32") {
        m.model.set_host_matvec(false);
        m.model.set_host_matvec(true);
    }
    let layers = m.model.config.layers;
    eprintln!(
        "host weights streamed per decode step: {:.1} MB",
        m.model.host_matvec_bytes() as f64 / 1e6
    );
    let ids: Vec<u32> = (0..ctx as u32).map(|i| 100 + (i * 37) % 20000).collect();
    let mut caches: Vec<FullCache<B>> = (0..layers).map(|_| FullCache::new()).collect();
    let t = Instant::now();
    m.model
        .prefill(&ids, &mut caches, &PrefillOptions::default())
        .expect("prefill");
    eprintln!("prefill {ctx}: {:.2} s", t.elapsed().as_secs_f64());
    if args.get(2).map(String::as_str) == Some("kvzip") {
        let mut fresh: Vec<FullCache<B>> = (0..layers).map(|_| FullCache::new()).collect();
        let opts = PrefillOptions {
            reconstruction: true,
            ..PrefillOptions::default()
        };
        let t = Instant::now();
        m.model.prefill(&ids, &mut fresh, &opts).expect("prefill");
        eprintln!(
            "prefill {ctx} with KVzip's reconstruction pass: {:.2} s",
            t.elapsed().as_secs_f64()
        );
        return;
    }
    // Third argument `rows`: time forwards of a few tokens at a time (a question, a
    // teacher-forced answer) instead of single steps.
    if args.get(2).map(String::as_str) == Some("rows") {
        for n in [1usize, 2, 3, 4, 6, 8, 16, 32, 64] {
            let t = Instant::now();
            for _ in 0..steps {
                let mut c = caches.clone();
                let _ = m
                    .model
                    .forward(&ids[..n], &mut c, Logits::All)
                    .expect("forward")
                    .into_data();
            }
            let dt = t.elapsed().as_secs_f64() / steps.max(1) as f64;
            eprintln!("forward of {n:>2} tokens: {:.1} ms", dt * 1e3);
        }
        return;
    }
    let t = Instant::now();
    for _ in 0..steps {
        let _ = m
            .model
            .forward(&[42], &mut caches, Logits::Last)
            .expect("decode")
            .into_data();
    }
    let dt = t.elapsed().as_secs_f64() / steps as f64;
    eprintln!("decode: {:.1} ms/token ({:.2} tok/s)", dt * 1e3, 1.0 / dt);
}
