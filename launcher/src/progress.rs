//! What a person watching `launch train` sees: a progress bar on a terminal, else a log
//! line at step 1, every 10 steps and the last.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use parallel::runtime::StepReport;

/// Shows rank 0's steps.
pub struct StepDisplay {
    bar: Option<ProgressBar>,
    total: u64,
}

impl StepDisplay {
    /// `total` steps; `None` (e.g. `launch run`, where we don't know) shows nothing.
    pub fn new(total: Option<u64>) -> Self {
        let bar = total.filter(|_| std::io::stderr().is_terminal()).map(|t| {
            let bar = ProgressBar::new(t);
            let style = ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {msg} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Self {
            bar,
            total: total.unwrap_or(0),
        }
    }

    /// Rank 0's step.
    pub fn step(&mut self, report: &StepReport) {
        let (step, loss, tokens_per_s) = (report.step, report.loss, report.tokens_per_s);
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(format!("loss {loss:.4}  {tokens_per_s:.0} tok/s"));
            }
            None if self.total > 0
                && (step == 1 || step.is_multiple_of(10) || step == self.total) =>
            {
                tracing::info!(
                    step,
                    loss = format!("{loss:.4}"),
                    lr = report.lr,
                    tokens_per_s = format!("{tokens_per_s:.0}"),
                    "step"
                );
            }
            None => {}
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }

    pub fn abandon(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}
