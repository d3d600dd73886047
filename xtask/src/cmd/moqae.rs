//! `moqae`: train MoQAE's learned router at each λ (cached per model) and print the λ sweep on
//! prose — average bits against continuation NLL — beside fp16, KIVI-4, KIVI-2 and the
//! heuristic router at matched bytes.
use crate::progress::Bars;
use anyhow::Result;
use clap::Args;

/// Arguments of `moqae`.
#[derive(Args)]
pub struct Moqae {
    /// λ values (weight of the model term against the memory term, each in [0, 1]).
    #[arg(long, value_delimiter = ',', default_values_t = eval::moqae::SWEEP.to_vec())]
    lambdas: Vec<f64>,
    /// Tokens per routed chunk (a multiple of 32, the quantization group).
    #[arg(long, default_value_t = axis_quant::moqae::DEFAULT_CHUNK)]
    chunk: usize,
    /// Adjacent layers sharing one router (routing sharing) [default: one router for all].
    #[arg(long)]
    layers_per_router: Option<usize>,
    /// Prose samples the sweep is measured on.
    #[arg(long, default_value_t = 4)]
    prose_samples: usize,
    /// Context tokens of each prose sample.
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Continuation tokens scored after the context.
    #[arg(long, default_value_t = 256)]
    continuation: usize,
    /// Seed of the prose samples (the eval's default is 1).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    model: crate::session::ModelArg,
}

impl Moqae {
    /// Trains (or loads) the routers and prints the sweep as markdown.
    pub fn run(self) -> Result<()> {
        let s = crate::session::open(&self.model)?;
        let opts = eval::moqae::SweepOptions {
            lambdas: self.lambdas,
            router: eval::moqae::RouterConfig {
                chunk: self.chunk,
                layers_per_router: self.layers_per_router.unwrap_or(usize::MAX),
                ..Default::default()
            },
            prose_samples: self.prose_samples,
            context: self.context,
            continuation: self.continuation,
            seed: self.seed,
        };
        let rows = eval::moqae::sweep(&s, &opts, &Bars::default())?;
        print!("{}", eval::moqae::markdown(&rows));
        Ok(())
    }
}
