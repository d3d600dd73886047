//! Routed caches: footprint == prediction for random experts; plans round-trip and are
//! validated on load with errors that name the line.
use crate::{Axes, CustomStage, Expert, RoutedCache, RouterError, RoutingPlan, StageSetting};
use axis_evict::{Evict, EvictSetting, ScorerKind, Selection};
use axis_lowrank::{LowRank, LowRankSetting};
use axis_quant::QuantSetting;
use burn::tensor::{Distribution, Tensor};
use burn_ndarray::NdArray;
use kv_tensor::{
    AxisError, Basis, Bits, Bytes, CompressionAxis, Encoded, Footprint, LayerCache, LayerShape,
    ObservationCtx, PlanStage, Ratio, Segment, Side, SidePlan,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

type B = NdArray<f32>;

fn bits() -> impl Strategy<Value = Bits> {
    prop::sample::select(vec![2u8, 3, 4, 8, 16]).prop_map(|b| Bits::try_from(b).expect("valid"))
}

fn expert() -> impl Strategy<Value = Expert> {
    (
        prop::option::of(0.05f64..1.0),
        prop::option::of((bits(), bits())),
        prop::option::of((
            prop::option::of(1usize..=64),
            prop::sample::select(vec![None, Some(32), Some(64)]),
        )),
        prop::option::of((1usize..=48, 1usize..=3)),
        prop::option::of(prop::sample::select(vec![0usize, 5, 16, 64, 100])),
    )
        .prop_map(|(keep, q, rank, keys, residual)| Expert {
            evict: keep
                .map(|k| EvictSetting::new(ScorerKind::Knorm, Ratio::new(k).expect("ratio"))),
            lowrank: rank.map(|(k_rank, v_rank)| LowRankSetting { k_rank, v_rank }),
            stages: keys
                .map(|(width, layers)| CustomStage::new(KeyPrefix { width, layers }))
                .into_iter()
                .collect(),
            quant: q.map(|(k, v)| QuantSetting::new(k, v)),
            residual,
            decode: None,
        })
}

/// A user's axis, written only against public traits: keeps the first `width` coordinates of
/// each key (a projection onto unit vectors, whose basis `layers` layers share).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyPrefix {
    width: usize,
    layers: usize,
}

impl PlanStage for KeyPrefix {
    fn plan_side(&self, side: Side, input: &LayerShape) -> SidePlan {
        let narrows = side == Side::Keys && self.width < input.head_dim;
        SidePlan::projected(input, narrows.then_some(self.width), 4, self.layers)
    }
}

impl StageSetting for KeyPrefix {
    fn axis(&self) -> &'static str {
        "key-prefix"
    }
    fn to_toml(&self) -> Result<toml::Table, String> {
        toml::Table::try_from(self).map_err(|e| e.to_string())
    }
    fn validate(&self, head_dim: usize) -> Result<(), String> {
        (self.width >= 1 && self.layers >= 1 && self.width <= head_dim)
            .then_some(())
            .ok_or_else(|| format!("width {} is not in 1..={head_dim}", self.width))
    }
    fn label(&self) -> String {
        format!("prefix K{}", self.width)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

struct KeyPrefixAxis;

impl CompressionAxis<B> for KeyPrefixAxis {
    type Setting = KeyPrefix;
    fn compress(
        &self,
        seg: Segment<B>,
        s: &KeyPrefix,
        _: &ObservationCtx<B>,
    ) -> Result<Segment<B>, AxisError> {
        // Like any stage, it receives the previous stage's output: coefficients, when an
        // earlier stage projected the keys.
        let [_, h, _, d] = seg.k.dims();
        let width_in = match &seg.k {
            Encoded::Projected { coeffs, .. } => coeffs.dims()[3],
            _ => d,
        };
        if s.width >= width_in {
            return Ok(seg);
        }
        if width_in != d {
            return Err(AxisError::Stage {
                axis: "key-prefix".into(),
                why: "keys are projected already".into(),
            });
        }
        let k = seg.k.decode()?;
        let eye = Tensor::<B, 2>::eye(d, &k.device())
            .slice([0..d, 0..s.width])
            .reshape([1, d, s.width])
            .expand([h, d, s.width]);
        Ok(Segment {
            k: Encoded::Projected {
                coeffs: Box::new(Encoded::Dense(k.slice_dim(3, 0..s.width))),
                basis: Basis::shared(eye, s.layers),
            },
            ..seg
        })
    }
    fn footprint(&self, shape: &LayerShape, s: &KeyPrefix) -> Footprint {
        kv_tensor::compose_footprint(&[s], shape)
    }
}

fn axes() -> Axes<B> {
    crate::register_stage::<KeyPrefix>("key-prefix");
    Axes::new(Evict::new(), Some(lowrank(1))).with_stage("key-prefix", Arc::new(KeyPrefixAxis))
}

/// Identity bases: byte accounting does not depend on the basis values.
fn lowrank(layers: usize) -> Arc<LowRank<B>> {
    let d = Default::default();
    let bases = (0..layers)
        .map(|_| {
            let eye = Tensor::<B, 2>::eye(64, &d)
                .reshape([1, 64, 64])
                .expand([3, 64, 64]);
            (eye.clone(), eye)
        })
        .collect();
    Arc::new(LowRank::from_tensors(bases, 64))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn footprint_equals_prediction(e in expert(), t in 40usize..400, decode in 0usize..80) {
        prop_assume!(e.validate(64).is_ok());
        let d = Default::default();
        let mut c = RoutedCache::<B>::with_axes(e.clone(), axes());
        let k = Tensor::<B, 4>::random([1, 3, t, 64], Distribution::Normal(0.0, 1.0), &d);
        c.append(k.clone(), k).expect("append");
        c.finish_prefill(&ObservationCtx::bare(0)).expect("compress");
        let shape = LayerShape { batch: 1, kv_heads: 3, tokens: t, head_dim: 64 };
        prop_assert_eq!(c.footprint(), e.footprint(&shape, t));
        prop_assert_eq!(c.stored(), e.kept(t));
        for _ in 0..decode {
            let x = Tensor::<B, 4>::random([1, 3, 1, 64], Distribution::Normal(0.0, 1.0), &d);
            c.append(x.clone(), x).expect("append");
        }
        prop_assert_eq!(c.len(), t + decode);
        prop_assert_eq!(c.stored(), e.kept(t) + decode);
        let (k, _) = c.keys_values().expect("decode");
        prop_assert_eq!(k.dims()[2], e.kept(t) + decode);
    }

    /// A prefill that compresses after every chunk ends with as many tokens in each form as a
    /// one-shot prefill (the same codes, scales, fp16 rows and bases), and never more index
    /// bytes: runs the chunks kept whole need no positions. Between chunks the layer holds
    /// at most what the expert keeps of the tokens seen plus one chunk.
    #[test]
    fn chunked_prefill_ends_where_one_shot_does(
        e in expert(),
        chunks in prop::collection::vec(1usize..160, 1..6),
    ) {
        prop_assume!(e.validate(64).is_ok());
        let d = Default::default();
        let mut c = RoutedCache::<B>::with_axes(e.clone(), axes());
        let mut t = 0;
        for n in &chunks {
            let k = Tensor::<B, 4>::random([1, 3, *n, 64], Distribution::Normal(0.0, 1.0), &d);
            c.append(k.clone(), k).expect("append");
            t += n;
            c.after_prefill_chunk(&ObservationCtx::bare(0)).expect("compress");
            prop_assert_eq!(c.len(), t);
            prop_assert!(c.stored() <= e.kept(t), "{} held after {} tokens", c.stored(), t);
        }
        c.finish_prefill(&ObservationCtx::bare(0)).expect("compress");
        let shape = LayerShape { batch: 1, kv_heads: 3, tokens: t, head_dim: 64 };
        let (got, want) = (c.footprint(), e.footprint(&shape, t));
        prop_assert_eq!(c.stored(), e.kept(t));
        prop_assert_eq!((got.scales, got.dense, got.basis), (want.scales, want.dense, want.basis));
        // 3-bit codes go ten to a word, so every segment pads its last word: one per side and
        // per extra segment. Other widths fill their words exactly.
        let three = e.quant.is_some_and(|q| q.k_bits.get() == 3 || q.v_bits.get() == 3);
        let slack = if three { 8 * chunks.len() as u64 } else { 0 };
        prop_assert!(got.codes >= want.codes && got.codes.get() <= want.codes.get() + slack,
            "codes {} vs {}", got.codes, want.codes);
        prop_assert!(got.indices <= want.indices);
        let q = Tensor::<B, 4>::random([1, 9, 1, 64], Distribution::Normal(0.0, 1.0), &d);
        let x = Tensor::<B, 4>::random([1, 3, 1, 64], Distribution::Normal(0.0, 1.0), &d);
        c.append(x.clone(), x).expect("append");
        let out: Vec<f32> = c.attend(q).expect("attend").into_data().to_vec().expect("f32");
        prop_assert!(out.iter().all(|v| v.is_finite()));
    }
}

/// A KVzip layer keeps its whole prompt through a chunk-by-chunk prefill (its scores come from
/// the reconstruction pass after the last chunk), then compresses to what it keeps with the
/// pass' peaks, and keeps the highest-peaked tokens; without the pass it reports what is missing.
#[test]
fn kvzip_layers_keep_the_prompt_until_the_pass() {
    let e = Expert {
        evict: Some(EvictSetting::new(
            ScorerKind::Kvzip,
            Ratio::new(0.25).expect("r"),
        )),
        quant: Some(QuantSetting::new(
            Bits::try_from(4).expect("b"),
            Bits::try_from(4).expect("b"),
        )),
        residual: Some(0),
        ..Expert::FULL
    };
    let d = Default::default();
    let (mut c, mut bare) = (
        RoutedCache::<B>::with_axes(e.clone(), axes()),
        RoutedCache::<B>::with_axes(e.clone(), axes()),
    );
    let t = 192;
    for _ in 0..3 {
        let k = Tensor::<B, 4>::random([1, 3, t / 3, 64], Distribution::Normal(0.0, 1.0), &d);
        for cache in [&mut c, &mut bare] {
            cache.append(k.clone(), k.clone()).expect("append");
            cache
                .after_prefill_chunk(&ObservationCtx::bare(0))
                .expect("held");
        }
        assert_eq!(
            c.stored(),
            c.len(),
            "a KVzip layer compressed before the pass"
        );
    }
    let err = bare
        .finish_prefill(&ObservationCtx::bare(0))
        .expect_err("no pass");
    assert!(matches!(err, AxisError::MissingObservation { .. }), "{err}");
    // Peaks that rise with the position, but for the first 40 tokens, which peak highest.
    let peaks: Vec<f32> = (0..3 * t)
        .map(|i| {
            let j = i % t;
            if j < 40 {
                10.0 + j as f32
            } else {
                j as f32 / t as f32
            }
        })
        .collect();
    let mut ctx = ObservationCtx::bare(0);
    ctx.reconstruction = Some(Tensor::from_data(
        burn::tensor::TensorData::new(peaks, [1, 3, t]),
        &d,
    ));
    c.finish_prefill(&ctx).expect("compress");
    assert_eq!(c.stored(), e.kept(t));
    let shape = LayerShape {
        batch: 1,
        kv_heads: 3,
        tokens: t,
        head_dim: 64,
    };
    assert_eq!(c.footprint(), e.footprint(&shape, t));
    // Beyond the protected sinks and recent window, only tokens of the high-peaked 40.
    let evict = e.evict.expect("evicts");
    let kept: Vec<i64> = c
        .layer
        .positions()
        .expect("positions")
        .into_data()
        .iter::<i64>()
        .collect();
    let chosen = kept
        .iter()
        .filter(|&&p| p >= evict.sinks as i64 && p < (t - evict.window) as i64);
    assert!(chosen.clone().count() >= 3, "{kept:?}");
    assert!(
        chosen.clone().all(|&p| p < 40),
        "low peaks kept over high ones: {kept:?}"
    );
}

#[test]
fn plans_roundtrip_and_validate() {
    let e = Expert {
        evict: Some(EvictSetting::new(
            ScorerKind::Snapkv,
            Ratio::new(0.5).expect("r"),
        )),
        lowrank: Some(LowRankSetting {
            k_rank: Some(32),
            v_rank: None,
        }),
        stages: Vec::new(),
        quant: Some(QuantSetting::new(
            Bits::try_from(4).expect("b"),
            Bits::try_from(2).expect("b"),
        )),
        residual: Some(16),
        decode: None,
    };
    let plan = RoutingPlan {
        sized_for: None,
        layers: vec![e.clone(), Expert::FULL, e],
    };
    let text = plan.to_toml().expect("toml");
    assert_eq!(RoutingPlan::from_toml(&text, 3, 64).expect("parses"), plan);
    assert!(matches!(
        RoutingPlan::from_toml(&text, 30, 64),
        Err(RouterError::LayerCount { plan: 3, model: 30 })
    ));
    let bad = text.replacen("k_bits = 4", "k_bits = 5", 1);
    let err = RoutingPlan::from_toml(&bad, 3, 64)
        .expect_err("bad bits")
        .to_string();
    assert!(err.contains("line"), "{err}");
    let unknown = format!("{text}\n[[layers]]\nspeed = 3\n");
    assert!(RoutingPlan::from_toml(&unknown, 4, 64).is_err());
}

/// A registered axis' stage is written to and read from a plan file like the built-in axes;
/// an unregistered axis name, a malformed setting and an invalid one are typed errors.
#[test]
fn custom_stages_roundtrip_and_validate() {
    let _ = axes();
    let e = Expert {
        stages: vec![CustomStage::new(KeyPrefix {
            width: 16,
            layers: 2,
        })],
        quant: Some(QuantSetting::new(Bits::try_from(4).expect("b"), Bits::Full)),
        ..Expert::FULL
    };
    let plan = RoutingPlan::uniform(e, 2);
    let text = plan.to_toml().expect("toml");
    assert!(text.contains("axis = \"key-prefix\""), "{text}");
    assert_eq!(RoutingPlan::from_toml(&text, 2, 64).expect("parses"), plan);
    let err = |t: &str| {
        RoutingPlan::from_toml(t, 2, 64)
            .expect_err("rejected")
            .to_string()
    };
    let unknown = text.replace("key-prefix", "key-suffix");
    assert!(
        err(&unknown).contains("unknown stage axis `key-suffix`"),
        "{}",
        err(&unknown)
    );
    assert!(err(&text.replace("width = 16", "width = \"x\"")).contains("key-prefix"));
    assert!(err(&text.replace("width = 16", "width = 99")).contains("width 99"));
    // Values reach 4-bit quantization at full width; keys at 16 wide: both quantize.
    let shape = LayerShape {
        batch: 1,
        kv_heads: 3,
        tokens: 0,
        head_dim: 64,
    };
    let bytes = plan.layers[0].footprint(&shape, 512);
    assert_eq!(bytes.basis, Bytes((3 * 64 * 16 * 4 / 2) as u64));
}

/// The router runs a registered axis' stage; without the axis the cache says which is
/// missing instead of skipping it.
#[test]
fn a_stage_without_its_axis_is_an_error() {
    let e = Expert {
        stages: vec![CustomStage::new(KeyPrefix {
            width: 8,
            layers: 1,
        })],
        ..Expert::FULL
    };
    let k = Tensor::<B, 4>::random(
        [1, 3, 200, 64],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    let mut bare = RoutedCache::<B>::new(e.clone());
    bare.append(k.clone(), k.clone()).expect("append");
    let msg = bare
        .finish_prefill(&ObservationCtx::bare(0))
        .expect_err("no axis")
        .to_string();
    assert!(msg.contains("key-prefix"), "{msg}");
    let mut routed = RoutedCache::<B>::with_axes(e, axes());
    routed.append(k.clone(), k).expect("append");
    routed
        .finish_prefill(&ObservationCtx::bare(0))
        .expect("runs the stage");
    assert!(routed.footprint().basis.get() > 0);
}

#[test]
fn inconsistent_experts_are_rejected_naming_the_layer() {
    let plan = RoutingPlan {
        sized_for: None,
        layers: vec![
            Expert::FULL,
            Expert {
                lowrank: Some(LowRankSetting {
                    k_rank: Some(80),
                    v_rank: None,
                }),
                ..Expert::FULL
            },
        ],
    };
    let text = plan.to_toml().expect("toml");
    let err = RoutingPlan::from_toml(&text, 2, 64).expect_err("rank 80 > 64");
    assert!(matches!(err, RouterError::Expert { layer: 1, .. }), "{err}");
    let four = Bits::try_from(4).expect("b");
    let odd_values = Expert {
        lowrank: Some(LowRankSetting {
            k_rank: None,
            v_rank: Some(48),
        }),
        quant: Some(QuantSetting::new(four, four)),
        ..Expert::FULL
    };
    assert!(odd_values.validate(64).is_err());
    let ragged_and_quantized = Expert {
        evict: Some(
            EvictSetting::new(ScorerKind::Snapkv, Ratio::new(0.5).expect("r")).with_selection(
                Selection::HeadWise {
                    min_share: Ratio::new(0.2).expect("r"),
                },
            ),
        ),
        quant: Some(QuantSetting::new(four, four)),
        ..Expert::FULL
    };
    assert!(ragged_and_quantized.validate(64).is_err());
}

#[test]
fn projecting_without_bases_is_a_typed_error() {
    let e = Expert {
        lowrank: Some(LowRankSetting {
            k_rank: Some(32),
            v_rank: None,
        }),
        ..Expert::FULL
    };
    let mut c = RoutedCache::<B>::new(e);
    let k = Tensor::<B, 4>::random(
        [1, 3, 200, 64],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    c.append(k.clone(), k).expect("append");
    let err = c
        .finish_prefill(&ObservationCtx::bare(0))
        .expect_err("no bases");
    assert!(err.to_string().contains("bases"), "{err}");
}

/// A zero-token window: a prompt of whole groups is quantized entirely (no fp16 rows), and
/// decoding keeps only the partial group in fp16.
#[test]
fn a_zero_window_holds_only_the_partial_group() {
    let e = Expert {
        quant: Some(QuantSetting::new(
            Bits::try_from(4).expect("bits"),
            Bits::try_from(4).expect("bits"),
        )),
        residual: Some(0),
        decode: None,
        ..Expert::FULL
    };
    let d = Default::default();
    let mut c = RoutedCache::<B>::new(e.clone());
    let k = Tensor::<B, 4>::random([1, 3, 256, 64], Distribution::Normal(0.0, 1.0), &d);
    c.append(k.clone(), k).expect("append");
    c.finish_prefill(&ObservationCtx::bare(0))
        .expect("compress");
    let shape = LayerShape {
        batch: 1,
        kv_heads: 3,
        tokens: 256,
        head_dim: 64,
    };
    assert_eq!(c.footprint(), e.footprint(&shape, 256));
    assert_eq!(c.footprint().dense, Bytes(0));
    for _ in 0..40 {
        let x = Tensor::<B, 4>::random([1, 3, 1, 64], Distribution::Normal(0.0, 1.0), &d);
        c.append(x.clone(), x).expect("append");
    }
    // 40 decoded tokens: one group of 32 quantized, 8 in the fp16 window.
    assert_eq!(c.footprint().dense, Bytes((2 * 3 * 8 * 64 * 2) as u64));
}

/// A fork holds the same compressed state and then evolves on its own.
#[test]
fn fork_is_an_independent_copy() {
    let d = Default::default();
    let e = Expert {
        evict: Some(EvictSetting::new(
            ScorerKind::Knorm,
            Ratio::new(0.5).expect("ratio"),
        )),
        lowrank: None,
        stages: Vec::new(),
        quant: Some(QuantSetting::new(
            Bits::try_from(4).expect("bits"),
            Bits::try_from(2).expect("bits"),
        )),
        residual: None,
        decode: None,
    };
    let mut c = RoutedCache::<B>::with_axes(e, Axes::default());
    let kv = |t: usize| Tensor::<B, 4>::random([1, 3, t, 64], Distribution::Normal(0.0, 1.0), &d);
    let k = kv(300);
    c.append(k.clone(), k).expect("append");
    c.finish_prefill(&ObservationCtx::bare(0))
        .expect("compress");
    let mut f = c.fork().expect("routed caches fork");
    let q = Tensor::<B, 4>::random([1, 9, 1, 64], Distribution::Normal(0.0, 1.0), &d);
    let same = |a: Tensor<B, 4>, b: Tensor<B, 4>| {
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), Default::default())
    };
    same(
        c.attend(q.clone()).expect("attend"),
        f.attend(q.clone()).expect("attend"),
    );
    assert_eq!(f.footprint(), c.footprint());
    let k = kv(100);
    f.append(k.clone(), k).expect("append");
    assert_eq!(c.len(), 300);
    assert_eq!(f.len(), 400);
    assert!(f.footprint().total().get() > c.footprint().total().get());
}

proptest! {
    /// A plan needs the prefill's attention mass exactly when a layer evicts with H2O, the
    /// reconstruction pass exactly when one evicts with KVzip, bases
    /// exactly when a layer projects, trig statistics exactly when a layer uses TriAttention, and
    /// calibrated stages exactly when a layer runs a registered axis.
    #[test]
    fn needs_follow_the_layers(
        drawn in proptest::collection::vec((expert(), prop::sample::select(ScorerKind::ALL.to_vec())), 1..12),
    ) {
        let layers: Vec<Expert> = drawn
            .into_iter()
            .map(|(mut e, s)| {
                e.evict = e.evict.map(|ev| EvictSetting { scorer: s, ..ev });
                e
            })
            .collect();
        let plan = RoutingPlan {
            sized_for: None,
            layers: layers.clone(),
        };
        let n = plan.needs();
        let scorer = |k| layers.iter().any(|e| e.evict.is_some_and(|s| s.scorer == k));
        prop_assert_eq!(n.attention_mass, scorer(ScorerKind::H2o));
        prop_assert_eq!(n.reconstruction, scorer(ScorerKind::Kvzip));
        prop_assert_eq!(n.trig_stats, scorer(ScorerKind::Trig));
        prop_assert_eq!(n.bases, layers.iter().any(|e| e.lowrank.is_some()));
        prop_assert_eq!(n.stages, layers.iter().any(|e| !e.stages.is_empty()));
        prop_assert_eq!(n.calibration(), n.bases || n.trig_stats || n.stages);
    }
}

/// A plan records what it was sized for through TOML, and plans written before that field
/// existed still load.
#[test]
fn sized_for_round_trips_and_is_optional() {
    let mut plan = RoutingPlan::uniform(Expert::FULL, 2);
    plan.sized_for = Some(crate::SizedFor {
        tokens: 3500,
        bytes: 1000,
        fp16_bytes: 8000,
    });
    let text = plan.to_toml().expect("serialises");
    let back = RoutingPlan::from_toml(&text, 2, 64).expect("parses");
    assert_eq!(back, plan);
    assert_eq!(back.sized_for.map(|s| s.ratio()), Some(8.0));
    let old = RoutingPlan::from_toml("[[layers]]\n[[layers]]\n", 2, 64).expect("parses");
    assert_eq!(old.sized_for, None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Decode-time compression keeps a generating layer within `tokens + interval`, under the
    /// peak its expert prices, in position order with the newest token kept, for every scorer
    /// that can run during decoding and with quantization composed.
    #[test]
    fn decode_budget_bounds_a_generating_layer(
        scorer in prop::sample::select(vec![ScorerKind::Knorm, ScorerKind::Snapkv, ScorerKind::Streaming, ScorerKind::Tova]),
        q in prop::option::of((bits(), bits())),
        tokens in 40usize..90, interval in 1usize..24, prompt in 20usize..120, generated in 1usize..90,
        residual in prop::sample::select(vec![None, Some(0usize), Some(16)]),
    ) {
        let d = Default::default();
        let e = Expert {
            evict: Some(EvictSetting::new(scorer, Ratio::new(0.5).expect("ratio"))),
            quant: q.map(|(k, v)| QuantSetting::new(k, v)),
            residual,
            decode: Some(crate::DecodeBudget { tokens, interval }),
            ..Expert::FULL
        };
        prop_assert!(e.validate(32).is_ok());
        let shape = LayerShape { batch: 1, kv_heads: 2, tokens: prompt, head_dim: 32 };
        let peak = e.decode_peak(&shape, prompt).expect("a decode budget").total().get();
        let mut c = RoutedCache::<B>::new(e);
        let kv = |t| Tensor::<B, 4>::random([1, 2, t, 32], Distribution::Normal(0.0, 1.0), &d);
        let q4 = |t| Tensor::<B, 4>::random([1, 4, t, 32], Distribution::Normal(0.0, 1.0), &d);
        c.append(kv(prompt), kv(prompt)).expect("append");
        let ctx = ObservationCtx { window_queries: Some(q4(8.min(prompt))), ..ObservationCtx::bare(0) };
        c.finish_prefill(&ctx).expect("prefill");
        for step in 0..generated {
            c.attend(q4(1)).expect("attend");
            c.append(kv(1), kv(1)).expect("append");
            prop_assert!(c.stored() <= tokens.max(c.expert().kept(prompt)) + interval, "step {step}: {}", c.stored());
            prop_assert!(c.footprint().total().get() <= peak, "step {step}: {} > {peak}", c.footprint().total().get());
        }
        prop_assert_eq!(c.len(), prompt + generated);
        let pos: Vec<i64> = c.layer.positions().expect("positions").into_data().convert::<i64>().to_vec().expect("ints");
        for head in pos.chunks(c.stored()) {
            prop_assert!(head.windows(2).all(|w| w[0] < w[1]), "{:?}", head);
            prop_assert_eq!(*head.last().expect("a token"), (prompt + generated - 1) as i64);
        }
    }
}

#[test]
fn decode_budgets_are_validated() {
    let base = Expert {
        evict: Some(EvictSetting::new(
            ScorerKind::Knorm,
            Ratio::new(0.5).expect("ratio"),
        )),
        decode: Some(crate::DecodeBudget {
            tokens: 64,
            interval: 16,
        }),
        ..Expert::FULL
    };
    assert!(base.validate(16).is_ok());
    let no_evict = Expert {
        evict: None,
        ..base.clone()
    };
    assert!(no_evict.validate(16).is_err());
    // H2O re-evicts on the mass the decoding queries add up; KVzip's pass exists only at
    // prefill.
    let with = |scorer| Expert {
        evict: Some(EvictSetting::new(scorer, Ratio::new(0.5).expect("ratio"))),
        ..base.clone()
    };
    assert!(with(ScorerKind::H2o).validate(16).is_ok());
    assert!(with(ScorerKind::Kvzip).validate(16).is_err());
    let tiny = Expert {
        decode: Some(crate::DecodeBudget {
            tokens: 8,
            interval: 16,
        }),
        ..base.clone()
    };
    assert!(tiny.validate(16).is_err());
    let text = "[[layers]]\n[layers.evict]\nscorer = \"knorm\"\nkeep = 0.5\n[layers.decode]\ntokens = 64\n";
    let plan = RoutingPlan::from_toml(text, 1, 16).expect("parses");
    assert_eq!(
        plan.layers[0].decode,
        Some(crate::DecodeBudget {
            tokens: 64,
            interval: 32
        })
    );
    assert!(base.to_string().contains("decode"));
}

/// H2O while decoding: the prompt's heaviest token survives the first re-eviction; a token the
/// decoding queries attend to is kept although the prompt paid it least, and it stays kept at
/// the next re-eviction, when every query looks away from it, because its mass is carried over
/// by position (a ledger that forgot it, or gave it a neighbour's, would drop it).
#[test]
fn h2o_keeps_what_the_decoding_queries_attend_to() {
    let d = Default::default();
    let dim = 8;
    let unit = |i: usize, scale: f32| {
        let mut v = vec![0f32; dim];
        v[i] = scale;
        Tensor::<B, 4>::from_data(burn::tensor::TensorData::new(v, [1, 1, 1, dim]), &d)
    };
    let small = |t| Tensor::<B, 4>::random([1, 1, t, dim], Distribution::Normal(0.0, 0.05), &d);
    let mut prompt_k = small(40);
    prompt_k = prompt_k.slice_assign([0..1, 0..1, 10..11, 0..dim], unit(0, 3.0));
    let mut evict = EvictSetting::new(ScorerKind::H2o, Ratio::ONE);
    evict.sinks = 0;
    evict.window = 4;
    let e = Expert {
        evict: Some(evict),
        decode: Some(crate::DecodeBudget {
            tokens: 24,
            interval: 16,
        }),
        ..Expert::FULL
    };
    let mut c = RoutedCache::<B>::new(e);
    c.append(prompt_k, small(40)).expect("append");
    // The prompt paid token 10 less than the rest, token 20 much more.
    let mut mass = vec![0.01f32; 40];
    mass[10] = 0.005;
    mass[20] = 5.0;
    let ctx = ObservationCtx {
        attention_mass: Some(Tensor::from_data(
            burn::tensor::TensorData::new(mass, [1, 1, 40]),
            &d,
        )),
        ..ObservationCtx::bare(0)
    };
    c.finish_prefill(&ctx).expect("prefill");
    let kept = |c: &RoutedCache<B>| -> Vec<i64> {
        let p = c.layer.positions().expect("positions");
        p.into_data().convert::<i64>().to_vec().expect("ints")
    };
    // Round 1: the queries look at token 10, up to the re-eviction at its 16th token (the
    // query after it looks away, so what token 10 holds then is what the ledger carried).
    // Round 2: every query looks away from it, so the other rows gain mass and only what
    // round 1 left keeps it.
    for round in [1, 2] {
        for step in 0..16 {
            c.append(small(1), small(1)).expect("append");
            let scale = if round == 1 && step < 15 { 20.0 } else { -20.0 };
            c.attend(unit(0, scale)).expect("attend");
        }
        let held = kept(&c);
        assert!(held.len() <= 24 + 16, "{held:?}");
        assert!(held.contains(&10), "after round {round}: {held:?}");
        if round == 1 {
            assert!(held.contains(&20), "after round {round}: {held:?}");
        }
    }
}
