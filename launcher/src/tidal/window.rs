//! When a tidal job may train: the daily windows of `[tidal]` in their timezone (DST,
//! weekdays, skipped dates), and `--until`. Pure: every function takes `now`, so the tests
//! play any date with fake time. Times are Unix seconds (f64) outside this module.

use std::collections::BTreeSet;

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// One window: `[start, end)` in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub start: f64,
    pub end: f64,
}

impl Window {
    /// By when every process of the job must be gone: `end − margin`.
    pub fn handback(&self, margin_s: f64) -> f64 {
        self.end - margin_s
    }
}

/// A daily window: local start and end (an end at or before the start is the next day's).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Daily {
    start: Time,
    end: Time,
}

/// The windows of a job file, ready to be asked for the next one.
#[derive(Clone, Debug)]
pub struct Schedule {
    daily: Vec<Daily>,
    tz: TimeZone,
    /// Days a window may start on; empty: all.
    weekdays: BTreeSet<i8>,
    skip: BTreeSet<Date>,
}

/// How far ahead [`Schedule::next`] looks (a schedule whose every day is skipped has none).
const HORIZON_DAYS: i32 = 800;

fn time_of_day(key: &str, s: &str) -> Result<Time, String> {
    let bad = || format!("{key}: `{s}` is not a time of day (HH:MM or HH:MM:SS)");
    let parts: Vec<&str> = s.trim().split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
        return Err(bad());
    }
    let num = |p: &str| p.parse::<i8>().map_err(|_| bad());
    let (h, m) = (num(parts[0])?, num(parts[1])?);
    let sec = match parts.get(2) {
        Some(p) => num(p)?,
        None => 0,
    };
    Time::new(h, m, sec, 0).map_err(|_| bad())
}

fn weekday(key: &str, s: &str) -> Result<Weekday, String> {
    let w = match s.trim().to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Monday,
        "tue" | "tuesday" => Weekday::Tuesday,
        "wed" | "wednesday" => Weekday::Wednesday,
        "thu" | "thursday" => Weekday::Thursday,
        "fri" | "friday" => Weekday::Friday,
        "sat" | "saturday" => Weekday::Saturday,
        "sun" | "sunday" => Weekday::Sunday,
        _ => return Err(format!("{key}: `{s}` is not a weekday (mon … sun)")),
    };
    Ok(w)
}

/// Unix seconds of a timestamp.
pub fn unix(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

/// The timestamp of Unix seconds (to the millisecond).
pub fn timestamp(t: f64) -> Timestamp {
    Timestamp::from_millisecond((t * 1000.0).round() as i64).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// What a schedule is made of: `[tidal]`'s keys of the same names.
pub struct Spec<'a> {
    pub windows: &'a [String],
    pub timezone: &'a str,
    pub weekdays: &'a [String],
    pub skip_dates: &'a [String],
}

impl Schedule {
    /// `[tidal]` read and checked: errors name the key and the value.
    pub fn new(o: Spec<'_>) -> Result<Self, String> {
        let tz = TimeZone::get(o.timezone).map_err(|e| {
            format!(
                "tidal.timezone: `{}` is not an IANA timezone (e.g. \"Asia/Shanghai\"): {e}",
                o.timezone
            )
        })?;
        let mut daily = Vec::new();
        for w in o.windows {
            let (a, b) = w.split_once('-').ok_or_else(|| {
                format!("tidal.windows: `{w}` is not START-END (\"22:00-06:30\")")
            })?;
            let d = Daily {
                start: time_of_day("tidal.windows", a)?,
                end: time_of_day("tidal.windows", b)?,
            };
            daily.push(d);
        }
        let weekdays = o
            .weekdays
            .iter()
            .map(|w| weekday("tidal.weekdays", w).map(|w| w.to_monday_one_offset()))
            .collect::<Result<_, _>>()?;
        let skip = o
            .skip_dates
            .iter()
            .map(|d| {
                d.trim()
                    .parse::<Date>()
                    .map_err(|e| format!("tidal.skip_dates: `{d}` is not a date YYYY-MM-DD: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            daily,
            tz,
            weekdays,
            skip,
        })
    }

    /// The shortest daily window's length on its clock, seconds (DST may move it by an
    /// hour).
    pub fn shortest_s(&self) -> Option<f64> {
        let secs = |t: Time| {
            f64::from(t.hour()) * 3600.0 + f64::from(t.minute()) * 60.0 + f64::from(t.second())
        };
        self.daily
            .iter()
            .map(|d| (secs(d.end) - secs(d.start)).rem_euclid(86_400.0))
            .map(|l| if l == 0.0 { 86_400.0 } else { l })
            .reduce(f64::min)
    }

    /// Whether the job file gives windows (else `--until` must).
    pub fn is_empty(&self) -> bool {
        self.daily.is_empty()
    }

    /// Whether a window may start on `date`.
    fn open_on(&self, date: Date) -> bool {
        (self.weekdays.is_empty()
            || self
                .weekdays
                .contains(&date.weekday().to_monday_one_offset()))
            && !self.skip.contains(&date)
    }

    /// The window of `d` starting on `date`. A start that does not exist (in the hour DST
    /// skips) is taken after the gap and one that occurs twice the first time (jiff's
    /// "compatible" rule, as most schedulers do); an end that does not exist is read with
    /// the offset after the gap, the earlier of its two readings (02:30 in New York's
    /// skipped hour is 01:30 EST): the GPUs go back early rather than late.
    fn on(&self, d: Daily, date: Date) -> Option<Window> {
        let start = self.tz.to_zoned(date.to_datetime(d.start)).ok()?;
        let end_date = if d.end <= d.start {
            date.tomorrow().ok()?
        } else {
            date
        };
        let end = self
            .tz
            .to_ambiguous_zoned(end_date.to_datetime(d.end))
            .earlier()
            .ok()?;
        Some(Window {
            start: unix(start.timestamp()),
            end: unix(end.timestamp()),
        })
    }

    /// The window open at `now`, else the next one to open; `None` if no window opens in
    /// the next [`HORIZON_DAYS`] days.
    pub fn next(&self, now: f64) -> Option<Window> {
        let today = timestamp(now).to_zoned(self.tz.clone()).date();
        // Yesterday's window may cross midnight into now.
        let mut date = today.yesterday().ok()?;
        for _ in 0..HORIZON_DAYS {
            let best = self
                .daily
                .iter()
                .filter(|_| self.open_on(date))
                .filter_map(|d| self.on(*d, date))
                .filter(|w| w.end > now)
                .min_by(|a, b| a.start.total_cmp(&b.start));
            if best.is_some() {
                return best;
            }
            date = date.tomorrow().ok()?;
        }
        None
    }

    /// `--until TIME`: RFC 3339 (`2026-12-08T06:30:00+08:00`), a date and time without
    /// offset (Slurm's `EndTime`, `2026-12-08T06:30:00`) or `HH:MM[:SS]` (its next
    /// occurrence after `now`), both in the job's timezone. The window is `[now, TIME)`.
    pub fn until(&self, time: &str, now: f64) -> Result<Window, String> {
        let civil = time.parse::<jiff::civil::DateTime>().ok();
        let end = match time.parse::<Timestamp>() {
            Ok(t) => unix(t),
            // Slurm's `EndTime` has no offset: local time in the job's timezone.
            Err(_) if civil.is_some() && time.contains('T') => {
                let dt = civil.ok_or("--until")?;
                let z = self.tz.to_zoned(dt).map_err(|e| format!("--until: {e}"))?;
                unix(z.timestamp())
            }
            Err(_) => {
                let t = time_of_day("--until", time).map_err(|_| {
                    format!(
                        "--until: `{time}` is neither an RFC 3339 time \
                         (2026-12-08T06:30:00+08:00) nor HH:MM[:SS]"
                    )
                })?;
                let today = timestamp(now).to_zoned(self.tz.clone()).date();
                let at = |date: Date| {
                    self.tz
                        .to_zoned(date.to_datetime(t))
                        .map(|z| unix(z.timestamp()))
                        .map_err(|e| format!("--until: {e}"))
                };
                match at(today)? {
                    end if end > now => end,
                    _ => at(today.tomorrow().map_err(|e| e.to_string())?)?,
                }
            }
        };
        if end <= now {
            return Err(format!("--until: `{time}` is in the past"));
        }
        Ok(Window { start: now, end })
    }

    /// A time as the operator reads it: local time in the job's timezone.
    pub fn local(&self, t: f64) -> String {
        timestamp(t)
            .to_zoned(self.tz.clone())
            .strftime("%Y-%m-%d %H:%M:%S %Z")
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn with(windows: &[&str], tz: &str, weekdays: &[&str], skip: &[&str]) -> Schedule {
        let (w, d, k) = (strings(windows), strings(weekdays), strings(skip));
        let spec = Spec {
            windows: &w,
            timezone: tz,
            weekdays: &d,
            skip_dates: &k,
        };
        Schedule::new(spec).expect("valid")
    }

    fn schedule(windows: &[&str], tz: &str) -> Schedule {
        with(windows, tz, &[], &[])
    }

    fn at(s: &str) -> f64 {
        unix(s.parse::<Timestamp>().expect("timestamp"))
    }

    #[test]
    fn a_window_crossing_midnight_is_open_after_midnight_and_next_before_its_start() {
        let s = schedule(&["22:00-06:30"], "Asia/Shanghai");
        // 2026-12-07 01:00 in Shanghai (UTC+8): inside the window opened the evening before.
        let w = s.next(at("2026-12-06T17:00:00Z")).expect("a window");
        assert_eq!(w.start, at("2026-12-06T14:00:00Z"));
        assert_eq!(w.end, at("2026-12-06T22:30:00Z"));
        // 12:00 local: the next one opens at 22:00 tonight.
        let w = s.next(at("2026-12-07T04:00:00Z")).expect("a window");
        assert_eq!(w.start, at("2026-12-07T14:00:00Z"));
        assert_eq!(w.end - w.start, 8.5 * 3600.0);
        // At the end exactly, the window is over.
        let w = s.next(at("2026-12-06T22:30:00Z")).expect("a window");
        assert_eq!(w.start, at("2026-12-07T14:00:00Z"));
    }

    #[test]
    fn dst_shortens_and_lengthens_the_night_and_a_skipped_hour_starts_after_the_gap() {
        let s = schedule(&["22:00-06:00"], "America/New_York");
        // Clocks go forward 2026-03-08 02:00: that night has 7 hours.
        let w = s.next(at("2026-03-07T12:00:00-05:00")).expect("a window");
        assert_eq!(w.start, at("2026-03-07T22:00:00-05:00"));
        assert_eq!(w.end, at("2026-03-08T06:00:00-04:00"));
        assert_eq!(w.end - w.start, 7.0 * 3600.0);
        // And back 2026-11-01: 9 hours.
        let w = s.next(at("2026-10-31T12:00:00-04:00")).expect("a window");
        assert_eq!(w.end - w.start, 9.0 * 3600.0);
        // A window starting in the skipped hour starts when the clock reads 03:30.
        let s = schedule(&["02:30-05:00"], "America/New_York");
        let w = s.next(at("2026-03-08T00:00:00-05:00")).expect("a window");
        assert_eq!(w.start, at("2026-03-08T03:30:00-04:00"));
        // An end in the skipped hour is the instant before the gap: early, not late.
        let s = schedule(&["22:00-02:30"], "America/New_York");
        let w = s.next(at("2026-03-07T12:00:00-05:00")).expect("a window");
        assert_eq!(w.end, at("2026-03-08T01:30:00-05:00"));
    }

    #[test]
    fn weekdays_and_skipped_dates_move_the_next_window() {
        let windows = ["22:00-06:00", "12:00-13:00"];
        let weekdays = ["fri", "sat"];
        // Monday 2026-12-07: Friday the 11th is skipped, Saturday the 12th's noon window is next.
        let s = with(&windows, "UTC", &weekdays, &["2026-12-11"]);
        let w = s.next(at("2026-12-07T10:00:00Z")).expect("a window");
        assert_eq!(w.start, at("2026-12-12T12:00:00Z"));
        let s = with(&windows, "UTC", &weekdays, &[]);
        let w = s.next(at("2026-12-07T10:00:00Z")).expect("a window");
        assert_eq!(w.start, at("2026-12-11T12:00:00Z"));
        // Friday night's window, open on Saturday at 03:00, is still Friday's.
        let w = s.next(at("2026-12-12T03:00:00Z")).expect("a window");
        assert_eq!(w.start, at("2026-12-11T22:00:00Z"));
    }

    #[test]
    fn until_takes_rfc3339_or_the_next_local_time_of_day() {
        let s = schedule(&[], "Asia/Shanghai");
        let now = at("2026-12-07T13:00:00Z"); // 21:00 local
        let w = s.until("06:30", now).expect("until");
        assert_eq!((w.start, w.end), (now, at("2026-12-07T22:30:00Z")));
        let w = s.until("21:30:15", now).expect("until");
        assert_eq!(w.end, at("2026-12-07T13:30:15Z"));
        let w = s.until("2026-12-08T06:30:00+08:00", now).expect("until");
        assert_eq!(w.end, at("2026-12-07T22:30:00Z"));
        let w = s.until("2026-12-08T06:30:00", now).expect("until");
        assert_eq!(w.end, at("2026-12-07T22:30:00Z"));
        let e = s.until("2026-12-01T00:00:00Z", now).expect_err("past");
        assert!(e.contains("in the past"), "{e}");
        let e = s.until("tomorrow", now).expect_err("bad");
        assert!(e.contains("--until") && e.contains("tomorrow"), "{e}");
    }
}
