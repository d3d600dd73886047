//! The library's progress events drawn as terminal progress bars (indicatif).
use eval::{Event, Progress};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;

/// One bar at a time; notes print above it.
#[derive(Default)]
pub struct Bars(Mutex<Option<ProgressBar>>);

/// A progress bar with ETA.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.set_message(what.to_string());
    b
}

impl Progress for Bars {
    fn event(&self, e: Event<'_>) {
        let Ok(mut slot) = self.0.lock() else { return };
        match e {
            Event::Start { what, total } => {
                if let Some(old) = slot.replace(bar(total, what)) {
                    old.finish_and_clear();
                }
            }
            Event::Done(n) => slot.iter().for_each(|b| b.set_position(n)),
            Event::Step => slot.iter().for_each(|b| b.inc(1)),
            Event::Message(m) => slot.iter().for_each(|b| b.set_message(m.to_string())),
            Event::Finish => {
                if let Some(b) = slot.take() {
                    b.finish_and_clear();
                }
            }
            Event::Note(line) => match slot.as_ref() {
                Some(b) => b.println(line),
                None => eprintln!("{line}"),
            },
        }
    }
}
