//! Progress of long work, reported through a callback so the library never draws on a
//! terminal itself: xtask turns events into progress bars, a test or a service can log them or
//! ignore them ([`Silent`]).

/// One progress event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event<'a> {
    /// A phase begins: `total` steps of `what` (`prefill`, `calibrate`, `evaluate`).
    Start {
        /// The phase.
        what: &'a str,
        /// Its steps.
        total: u64,
    },
    /// Steps done so far in the current phase.
    Done(u64),
    /// One more step done (from any thread).
    Step,
    /// What the current step is about (`niah_single_1@2048`).
    Message(&'a str),
    /// The current phase is over.
    Finish,
    /// A line for the user (a skipped method, a cache file used, a timing).
    Note(&'a str),
}

/// Receives progress events; any `Fn(Event) + Sync` closure is one.
pub trait Progress: Sync {
    /// Handles one event.
    fn event(&self, e: Event<'_>);
}

impl<F: Fn(Event<'_>) + Sync> Progress for F {
    fn event(&self, e: Event<'_>) {
        self(e)
    }
}

/// Drops every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {
    fn event(&self, _: Event<'_>) {}
}
