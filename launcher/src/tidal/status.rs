//! `launch status RUN_DIR [--format text|json]`: a tidal run's ledger (`super::ledger`) as a
//! table or JSON, and its picture (`super::picture`, `RUN_DIR/status.svg`).

use std::path::Path;

use super::ledger::{ledger, Ledger};
use crate::error::{Error, Result};
use crate::events::CloseReason;

/// `launch status RUN_DIR [--format json]`: the ledger as text or JSON; writes
/// `RUN_DIR/status.svg`.
pub fn status(run_dir: &Path, format: &str) -> Result<String> {
    let l = ledger(run_dir)?;
    let svg = run_dir.join("status.svg");
    super::picture::draw(run_dir, &l, &svg)?;
    match format {
        "json" => {
            let mut v = serde_json::to_value(&l).map_err(|e| Error::Launch(e.to_string()))?;
            v["picture"] = svg.display().to_string().into();
            Ok(format!("{v}\n"))
        }
        "text" => Ok(text(&l, &svg)),
        other => Err(Error::Config {
            file: "--format".into(),
            message: format!("`{other}`: expected text or json"),
        }),
    }
}

fn text(l: &Ledger, svg: &Path) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>3} {:>9} {:>7} {:>6} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "win",
        "closed",
        "steps",
        "lost",
        "world",
        "wall_s",
        "startup",
        "useful",
        "ckpt",
        "lost_s",
        "drain",
        "idle",
        "margin_s"
    );
    for (i, w) in l.windows.iter().enumerate() {
        let reason = match w.reason {
            Some(CloseReason::Deadline) => "deadline",
            Some(CloseReason::Preempted) => "preempted",
            Some(CloseReason::Finished) => "finished",
            Some(CloseReason::Stopped) => "stopped",
            None => "open",
        };
        let steps = match (w.first_step, w.last_step) {
            (Some(a), Some(b)) => format!("{a}-{b}"),
            _ => "-".into(),
        };
        let margin = w
            .handback_margin_s
            .map_or("-".into(), |m| format!("{m:.2}"));
        let p = &w.parts;
        let _ = writeln!(
            out,
            "{:>3} {:>9} {:>7} {:>6} {:>5} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9}",
            i + 1,
            reason,
            steps,
            w.lost_steps,
            w.world,
            w.wall_s(),
            p.startup_s,
            p.useful_s,
            p.checkpoint_s,
            p.lost_s,
            p.drain_s,
            p.idle_s,
            margin
        );
    }
    let (t, p) = (&l.totals, &l.totals.parts);
    let _ = writeln!(
        out,
        "total: {:.1} s in {} windows: start-up {:.1}, useful {:.1}, checkpointing {:.1}, lost {:.1}, drain {:.1}, idle {:.1}; goodput {:.1} %",
        t.wall_s,
        l.windows.len(),
        p.startup_s,
        p.useful_s,
        p.checkpoint_s,
        p.lost_s,
        p.drain_s,
        p.idle_s,
        100.0 * t.goodput
    );
    let max = l.max_steps.map_or("?".into(), |m| m.to_string());
    let _ = match (l.finished, l.windows_left) {
        (true, _) => writeln!(out, "finished: step {} of {max}", l.step),
        (false, Some(n)) => writeln!(
            out,
            "at step {} of {max}: about {n} more windows at {:.1} steps per window",
            l.step,
            l.steps_per_window.unwrap_or(0.0)
        ),
        (false, None) => writeln!(out, "at step {} of {max}", l.step),
    };
    let _ = writeln!(out, "picture: {}", svg.display());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, EventLog};

    /// A window that stopped before its first step (killed at start-up): the ledger adds
    /// up, the picture is drawn (an empty series once made plotters loop forever).
    #[test]
    fn a_window_without_a_step_adds_up_and_is_drawn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = EventLog::open(&dir.path().join("events.jsonl")).expect("log");
        let now = crate::tidal::now();
        let open = Event::WindowOpen {
            start: now - 10.0,
            end: now + 10.0,
            handback: now + 8.0,
            world: 2,
        };
        log.emit(open, None, None).expect("emit");
        let released = Event::GpusReleased {
            at: now,
            margin_s: 8.0,
            checked: String::new(),
        };
        log.emit(released, Some(0), Some(0)).expect("emit");
        let close = Event::WindowClose {
            reason: CloseReason::Preempted,
            steps: 0,
            lost_steps: 0,
        };
        log.emit(close, None, None).expect("emit");
        let out = status(dir.path(), "json").expect("status");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        let w = &v["windows"][0];
        let part = |k: &str| w[k].as_f64().expect(k);
        let parts: f64 = [
            "startup_s",
            "useful_s",
            "checkpoint_s",
            "lost_s",
            "drain_s",
            "idle_s",
        ]
        .iter()
        .map(|k| part(k))
        .sum();
        assert!((parts - 20.0).abs() < 1e-6, "{w}");
        assert!((part("startup_s") - 10.0).abs() < 0.01, "{w}");
        assert!((part("handback_margin_s") - 8.0).abs() < 0.01, "{w}");
        assert!(dir.path().join("status.svg").exists());
        let l = ledger(dir.path()).expect("ledger");
        assert!((l.windows[0].parts.sum() - l.windows[0].wall_s()).abs() < 1e-6);
        let text = status(dir.path(), "text").expect("text");
        assert!(text.contains("preempted"), "{text}");
        assert!(status(dir.path(), "yaml").is_err());
    }
}
