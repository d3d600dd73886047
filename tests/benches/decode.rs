//! Decode speed through compressed caches: one decode step (ms per token) at 2k, 4k and 8k
//! context for the full fp16 cache, KIVI-4, KIVI-2 and routed plans (`cargo xtask bench`
//! solves hetero plans at 1/4, 1/8 and 1/14 into `$KVND_BENCH_PLANS`; without it only the
//! first three run). `KVND_BENCH_CONTEXTS` overrides the contexts (comma-separated tokens).
//!
//! Each method prefills once per context and then steps one persistent cache (see the models
//! bench for why a cloned cache would time copy-on-write instead). Needs the embedded model
//! (`cargo xtask fetch-model`).
use axis_quant::QuantSetting;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kv_tensor::{Bits, FullCache, LayerCache};
use kvnd_tests::B;
use models::{LoadedModel, Logits, PrefillOptions};
use router::{Expert, RoutingPlan};
use std::time::{Duration, Instant};

/// One cache per layer.
type Caches = Vec<Box<dyn LayerCache<B>>>;

fn kivi(bits: u8, layers: usize) -> Caches {
    let b = Bits::try_from(bits).expect("valid width");
    let e = Expert {
        quant: Some(QuantSetting::new(b, b)),
        ..Expert::FULL
    };
    (0..layers)
        .map(|_| Box::new(router::RoutedCache::<B>::new(e.clone())) as Box<dyn LayerCache<B>>)
        .collect()
}

/// A method to time: its name, its caches, and the prefill options that observe what they read.
type Method = (String, Box<dyn Fn() -> Caches>, PrefillOptions);

/// The model's calibrated axes (trig statistics, low-rank bases) from the calibration cache,
/// fitted there if missing: what `cargo xtask generate` loads for a plan that needs them.
fn calibrated_axes(m: &LoadedModel<B>) -> router::Axes<B> {
    let home = models::paths::home().expect("no cache directory: set KVND_HOME");
    let model = models::paths::bench_model().expect("no cache directory: set KVND_HOME");
    let sha = eval::sha256_file(&model).expect("model file readable");
    let sotu = models::paths::sotu_dir().expect("no cache directory: set KVND_HOME");
    let text = eval::data::corpus(&sotu).expect("prose data (cargo xtask fetch-data)");
    let dir = home.join("calibration");
    eval::calibrated_axes(m, &sha, &text, &dir, &Default::default(), &eval::Silent)
        .expect("calibrated axes")
}

/// The methods to time: full fp16, KIVI-4, KIVI-2, and every plan in `$KVND_BENCH_PLANS`.
fn methods(m: &LoadedModel<B>) -> Vec<Method> {
    let (layers, head_dim) = (m.model.config.layers, m.model.config.head_dim);
    let mut out: Vec<Method> = vec![
        (
            "full-fp16".into(),
            Box::new(move || {
                (0..layers)
                    .map(|_| Box::new(FullCache::<B>::new()) as Box<dyn LayerCache<B>>)
                    .collect()
            }),
            PrefillOptions::default(),
        ),
        (
            "kivi-4".into(),
            Box::new(move || kivi(4, layers)),
            PrefillOptions::default(),
        ),
        (
            "kivi-2".into(),
            Box::new(move || kivi(2, layers)),
            PrefillOptions::default(),
        ),
    ];
    let Ok(dir) = std::env::var("KVND_BENCH_PLANS") else {
        return out;
    };
    // `cargo bench` runs this in `tests/`; a relative path is meant from the workspace root,
    // where the command was typed.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(&dir);
    let mut plans: Vec<_> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("KVND_BENCH_PLANS={dir} ({}): {e}", path.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    plans.sort();
    // Loaded once (reading the cached statistics hashes the model file), shared by every plan.
    let calibrated = std::cell::OnceCell::new();
    for p in plans {
        let text = std::fs::read_to_string(&p).expect("plan readable");
        let plan = RoutingPlan::from_toml(&text, layers, head_dim).expect("plan valid");
        let name = p
            .file_stem()
            .map_or("plan".into(), |s| s.to_string_lossy().into_owned());
        // A plan's scorers may read attention mass or KVzip's reconstruction pass, and its
        // axes calibrated statistics.
        let opts = solver::observing(plan.needs());
        let axes = if plan.needs().calibration() {
            calibrated.get_or_init(|| calibrated_axes(m)).clone()
        } else {
            router::Axes::default()
        };
        out.push((
            name,
            Box::new(move || {
                plan.layers
                    .iter()
                    .map(|e| Box::new(axes.cache(e.clone())) as Box<dyn LayerCache<B>>)
                    .collect()
            }),
            opts,
        ));
    }
    out
}

fn bench(c: &mut Criterion) {
    let m = kvnd_tests::bench_model();
    let contexts: Vec<usize> = std::env::var("KVND_BENCH_CONTEXTS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2048, 4096, 8192]);
    let mut g = c.benchmark_group("decode");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    for &ctx in &contexts {
        // The prompt stops short of the context, and 1024 tokens short of the model's limit,
        // so the timed steps (a few hundred for the fastest method) end near `ctx`; a cache that
        // reaches the limit anyway is prefilled again, outside the timing.
        let prompt = ctx.min(m.model.config.context - 1024).saturating_sub(64);
        let limit = m.model.config.context - 1;
        let ids: Vec<u32> = (0..prompt as u32).map(|i| 100 + (i * 37) % 20000).collect();
        for (name, make, opts) in methods(m) {
            let prefilled = || {
                let mut c = make();
                m.model.prefill(&ids, &mut c, &opts).expect("prefill");
                c
            };
            // Prefilled on first use, so a filter that skips the method skips its prefill.
            let mut caches: Option<Caches> = None;
            g.bench_function(format!("{name}/at-{ctx}"), |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        let c = match &mut caches {
                            Some(c) if c[0].len() < limit => c,
                            slot => slot.insert(prefilled()),
                        };
                        let start = Instant::now();
                        let logits = m.model.forward(&[42], c, Logits::Last).expect("decode");
                        std::hint::black_box(logits.into_data());
                        timed += start.elapsed();
                    }
                    timed
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
