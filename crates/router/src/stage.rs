//! Open composition: stages from axes the router does not know.
//!
//! A crate adds an axis to experts in three steps (`axis-share` does exactly this):
//! 1. implement [`kv_tensor::CompressionAxis`] for the axis, whose `Setting` implements
//!    [`StageSetting`] (it prices itself through [`PlanStage`] and names its axis);
//! 2. call [`register_stage`] once, so plan files can name the setting;
//! 3. add the calibrated axis to [`crate::Axes`] with [`crate::Axes::with_stage`].
//!
//! An [`crate::Expert`] then carries the setting in its `stages`, and [`crate::RoutedCache`]
//! runs it between projection and quantization, with no change to the router.
use kv_tensor::{AxisError, CompressionAxis, Configured, KvBackend, PlanStage, Stage};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

/// The per-layer setting of an axis outside the router.
pub trait StageSetting: PlanStage + Any {
    /// The registered axis name: what `axis = "…"` says in a plan file.
    fn axis(&self) -> &'static str;
    /// The setting's own fields as TOML (a plan file's entry, without `axis`).
    fn to_toml(&self) -> Result<toml::Table, String>;
    /// What types alone cannot check, for a layer of `head_dim` (a rank within it…).
    fn validate(&self, head_dim: usize) -> Result<(), String>;
    /// A short label for reports (`share K32/2`).
    fn label(&self) -> String;
    /// For the axis to recover its own setting type.
    fn as_any(&self) -> &dyn Any;
}

/// One stage of an expert from a registered axis. Cheap to clone.
#[derive(Clone)]
pub struct CustomStage(Arc<dyn StageSetting>);

impl CustomStage {
    /// Wraps a setting.
    pub fn new(setting: impl StageSetting) -> Self {
        Self(Arc::new(setting))
    }

    /// The setting.
    pub fn setting(&self) -> &dyn StageSetting {
        &*self.0
    }

    /// The setting as its own type, when it is one.
    pub fn downcast<S: 'static>(&self) -> Option<&S> {
        self.0.as_any().downcast_ref::<S>()
    }

    /// The setting as TOML with its `axis` key: one entry of an expert's `stages`.
    fn table(&self) -> Result<toml::Table, String> {
        let mut t = self.0.to_toml()?;
        t.insert("axis".into(), toml::Value::String(self.0.axis().into()));
        Ok(t)
    }
}

impl PartialEq for CustomStage {
    fn eq(&self, other: &Self) -> bool {
        self.0.axis() == other.0.axis() && self.table().ok() == other.table().ok()
    }
}

impl fmt::Debug for CustomStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Serialize for CustomStage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.table()
            .map_err(serde::ser::Error::custom)?
            .serialize(s)
    }
}

impl<'de> Deserialize<'de> for CustomStage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut t = toml::Table::deserialize(d)?;
        let axis = match t.remove("axis") {
            Some(toml::Value::String(a)) => a,
            _ => {
                return Err(serde::de::Error::custom(
                    "a stage needs `axis = \"<name>\"`",
                ));
            }
        };
        parse(&axis, t).map_err(serde::de::Error::custom)
    }
}

type Parser = fn(toml::Table) -> Result<CustomStage, String>;

fn registry() -> &'static RwLock<BTreeMap<&'static str, Parser>> {
    static REGISTRY: std::sync::OnceLock<RwLock<BTreeMap<&'static str, Parser>>> =
        std::sync::OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

fn parse_as<S: StageSetting + DeserializeOwned>(t: toml::Table) -> Result<CustomStage, String> {
    S::deserialize(t)
        .map(CustomStage::new)
        .map_err(|e| e.to_string())
}

/// Lets plan files (TOML or JSON) name settings of type `S` as `axis = "<axis>"`. Registering
/// the same name again replaces the parser (idempotent for the same type).
pub fn register_stage<S: StageSetting + DeserializeOwned>(axis: &'static str) {
    registry()
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(axis, parse_as::<S>);
}

/// The registered axis names.
pub fn registered_stages() -> Vec<&'static str> {
    registry()
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .keys()
        .copied()
        .collect()
}

fn parse(axis: &str, t: toml::Table) -> Result<CustomStage, String> {
    let parser = registry()
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(axis)
        .copied();
    match parser {
        Some(p) => p(t).map_err(|e| format!("stage `{axis}`: {e}")),
        None => Err(format!(
            "unknown stage axis `{axis}` (registered: {})",
            registered_stages().join(", ")
        )),
    }
}

/// A calibrated axis that turns its settings into run-time stages.
pub trait StageAxis<B: KvBackend>: Send + Sync {
    /// The stage applying `setting` (an error when it is another axis' setting).
    fn stage(&self, setting: &CustomStage) -> Result<Box<dyn Stage<B>>, AxisError>;
}

/// A [`CompressionAxis`] whose setting is a [`StageSetting`], as a [`StageAxis`].
pub(crate) struct Registered<A>(pub(crate) Arc<A>);

impl<B, A, S> StageAxis<B> for Registered<A>
where
    B: KvBackend,
    A: CompressionAxis<B, Setting = S> + 'static,
    S: StageSetting + Clone,
{
    fn stage(&self, setting: &CustomStage) -> Result<Box<dyn Stage<B>>, AxisError> {
        let s = setting.downcast::<S>().ok_or_else(|| AxisError::Stage {
            axis: setting.setting().axis().into(),
            why: "the setting is not of this axis' type".into(),
        })?;
        Ok(Box::new(Configured::<A, S, B>::new(
            self.0.clone(),
            s.clone(),
        )))
    }
}
