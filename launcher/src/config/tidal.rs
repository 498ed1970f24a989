//! `[tidal]`: a job that trains only inside daily windows (the night, when the inference
//! GPUs are free) and hands the GPUs back before each window closes. The windows are
//! computed by `crate::tidal::window`; what the keys mean is in `configs/README.md`.

use serde::{Deserialize, Serialize};

use crate::tidal::window::{Schedule, Spec};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TidalOptions {
    /// Daily windows, `"HH:MM-HH:MM"` (seconds allowed: `"HH:MM:SS"`), local time in
    /// `timezone`; an end at or before the start crosses midnight. Empty: one window that
    /// `launch train --until TIME` gives.
    pub windows: Vec<String>,
    /// IANA name (`Asia/Shanghai`); DST is handled.
    pub timezone: String,
    /// Days a window may start on (`mon` … `sun`); empty: every day.
    pub weekdays: Vec<String>,
    /// Dates (`YYYY-MM-DD`, in `timezone`) on which no window starts: holidays, freezes.
    pub skip_dates: Vec<String>,
    /// Seconds before a window's end by which every process of the job is gone and the
    /// GPUs are free.
    pub handback_margin_s: f64,
    /// Seconds a preemption (SIGTERM, SIGUSR1, `launch preempt`) gives the job to stop.
    pub grace_s: f64,
    /// Factor on the estimates of a checkpoint and of the drain before they are measured.
    pub safety_factor: f64,
    /// Run on the operator's side after the GPUs are released / before workers start
    /// (`sh -c`, with TIDEMILL_NODE and TIDEMILL_RUN_DIR), each within `hook_timeout_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_release: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_acquire: Option<String>,
    pub hook_timeout_s: f64,
}

impl Default for TidalOptions {
    fn default() -> Self {
        Self {
            windows: Vec::new(),
            timezone: "UTC".into(),
            weekdays: Vec::new(),
            skip_dates: Vec::new(),
            handback_margin_s: 120.0,
            grace_s: 30.0,
            safety_factor: 2.0,
            on_release: None,
            on_acquire: None,
            hook_timeout_s: 60.0,
        }
    }
}

impl TidalOptions {
    /// The windows, ready to be asked for the next one.
    pub fn schedule(&self) -> Result<Schedule, String> {
        Schedule::new(Spec {
            windows: &self.windows,
            timezone: &self.timezone,
            weekdays: &self.weekdays,
            skip_dates: &self.skip_dates,
        })
    }

    /// Every key checked (the windows parsed), the error naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let schedule = self.schedule()?;
        let seconds = |key: &str, v: f64, positive: bool| {
            let ok = v.is_finite() && v < 1e7 && if positive { v > 0.0 } else { v >= 0.0 };
            match ok {
                true => Ok(()),
                false => Err(format!(
                    "tidal.{key}: must be a {} number of seconds, got {v}",
                    if positive { "positive" } else { "non-negative" }
                )),
            }
        };
        seconds("handback_margin_s", self.handback_margin_s, false)?;
        seconds("grace_s", self.grace_s, true)?;
        seconds("hook_timeout_s", self.hook_timeout_s, true)?;
        if let Some(shortest) = schedule.shortest_s() {
            if self.handback_margin_s + crate::tidal::REAP_ALLOWANCE_S >= shortest {
                return Err(format!(
                    "tidal.handback_margin_s = {} leaves no time to train in a window of {} s \
                     (tidal.windows)",
                    self.handback_margin_s, shortest
                ));
            }
        }
        if !(self.safety_factor.is_finite() && self.safety_factor >= 1.0) {
            return Err(format!(
                "tidal.safety_factor: must be at least 1, got {}",
                self.safety_factor
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_keys_are_named() {
        let bad = |f: fn(&mut TidalOptions)| {
            let mut o = TidalOptions::default();
            f(&mut o);
            o.validate().expect_err("refused")
        };
        assert!(bad(|o| o.timezone = "Mars/Olympus".into()).contains("tidal.timezone"));
        assert!(bad(|o| o.windows = vec!["22:00".into()]).contains("tidal.windows"));
        assert!(bad(|o| o.windows = vec!["25:00-06:00".into()]).contains("`25:00`"));
        assert!(bad(|o| o.weekdays = vec!["someday".into()]).contains("tidal.weekdays"));
        assert!(bad(|o| o.skip_dates = vec!["12/25".into()]).contains("tidal.skip_dates"));
        assert!(bad(|o| o.grace_s = 0.0).contains("tidal.grace_s"));
        assert!(bad(|o| o.safety_factor = 0.5).contains("tidal.safety_factor"));
        let short = bad(|o| {
            o.windows = vec!["23:30-00:10".into()];
            o.handback_margin_s = 2400.0;
        });
        assert!(short.contains("tidal.handback_margin_s"), "{short}");
    }
}
