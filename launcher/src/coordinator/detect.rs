//! Fault detection, as pure functions of what the workers and agents reported and `now`:
//! tested by editing timestamps, with no network and no sleeps.
//!
//! - **crash**: a worker exited non-zero or by a signal ([`crash`]).
//! - **lost heartbeat**: an agent silent for `heartbeat_timeout`.
//! - **hang**: no progress (a finished step, or a rank entering a collective no rank had
//!   entered) for max(`hang_factor` × the median recent step time, `hang_floor`), once the
//!   generation finished its first step; the culprit is the rank whose collective sequence number lags the
//!   others' (it never entered the collective they wait in), else the one that stopped
//!   reporting its position, named with its node, the collective and its number, and its
//!   phase.
//! - **straggler**: a rank whose busy time (its step time less the time it waited in
//!   collectives) exceeds the median's `straggler_factor` for `straggler_steps` steps in a row.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use parallel::runtime::Phase;

use super::state::WorkerExit;
use crate::config::LaunchOptions;
pub use crate::events::FaultKind as Kind;

/// Recent steps the median step time is taken over.
const WINDOW: usize = 20;

/// A detected fault, as the `fault` event records it.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub kind: Kind,
    pub rank: Option<usize>,
    pub node: Option<usize>,
    pub detail: String,
    pub detected_at: Instant,
    /// The last moment the thing was known healthy (its last heartbeat, the last step).
    pub healthy_at: Instant,
    /// Restarting cannot help (a worker reported an error in the job's input, exit
    /// status 2).
    pub permanent: bool,
    /// What the worker said of it, for a permanent fault: the job ends with these words.
    pub cause: Option<String>,
}

impl Fault {
    /// Seconds from the last sign of health to detection.
    pub fn detection_latency(&self) -> f64 {
        self.detected_at
            .saturating_duration_since(self.healthy_at)
            .as_secs_f64()
    }
}

/// A crashed worker as a fault.
pub fn crash(exit: &WorkerExit, now: Instant, healthy_at: Instant) -> Fault {
    Fault {
        kind: Kind::Crash,
        rank: Some(exit.rank),
        node: Some(exit.node),
        detail: exit.describe(),
        detected_at: now,
        healthy_at,
        permanent: exit.code == Some(2),
        cause: Some(exit.message.clone()).filter(|m| !m.is_empty() && exit.code == Some(2)),
    }
}

/// Where a rank was last seen.
#[derive(Clone, Debug, Default, PartialEq)]
struct Position {
    node: usize,
    step: u64,
    /// Collectives it has entered, and the kind of the last.
    seq: u64,
    collective: String,
    /// Collectives it had entered when its last step ended, and how many its last step took
    /// (ranks of different pipeline stages or expert groups take different numbers).
    step_seq: u64,
    per_step: u64,
    phase: Phase,
    /// When its last position report arrived.
    reported_at: Option<Instant>,
    slow_streak: u32,
    /// When the first step of the current slow streak was judged.
    slow_since: Option<Instant>,
    straggling: bool,
}

impl Position {
    /// Steps done plus the share of the next one entered, in this rank's collectives.
    fn progress(&self) -> f64 {
        let into = self.seq.saturating_sub(self.step_seq) as f64;
        self.step as f64
            + if self.per_step > 0 {
                into / self.per_step as f64
            } else {
                0.0
            }
    }
}

/// What the detectors know of one generation of the job.
#[derive(Clone, Debug)]
pub struct Detector {
    policy: LaunchOptions,
    ranks: BTreeMap<usize, Position>,
    nodes: BTreeMap<usize, Instant>,
    recent: VecDeque<f64>,
    /// The last progress: a finished step, or any rank entering a collective none had.
    last_step_at: Instant,
    /// The most collectives any rank has entered.
    max_seq: u64,
    /// Busy seconds of each rank at the step being assembled.
    busy: BTreeMap<u64, BTreeMap<usize, f64>>,
    world: usize,
    hang_reported: bool,
    /// Hangs are looked for once the generation finished a step (loading a model may take
    /// longer than any step).
    armed: bool,
}

impl Detector {
    /// A generation of `world` ranks on `nodes` (all heard from at `now`).
    pub fn new(policy: LaunchOptions, world: usize, nodes: &[usize], now: Instant) -> Self {
        Self {
            policy,
            ranks: BTreeMap::new(),
            nodes: nodes.iter().map(|&n| (n, now)).collect(),
            recent: VecDeque::new(),
            last_step_at: now,
            max_seq: 0,
            busy: BTreeMap::new(),
            world,
            hang_reported: false,
            armed: false,
        }
    }

    /// A new generation of `world` ranks, watching `nodes`: positions and step times start
    /// over, and every node counts as heard from at `now`.
    pub fn reset(&mut self, world: usize, nodes: &[usize], now: Instant) {
        // Every node gets a full timeout to kill, reap and join again.
        *self = Self::new(self.policy.clone(), world, nodes, now);
    }

    /// Every watched node has been heard from at or after `t`.
    pub fn all_heard_since(&self, t: Instant) -> bool {
        self.nodes.values().all(|&seen| seen >= t)
    }

    /// When `node` was last heard from, if it is watched.
    pub fn last_heard(&self, node: usize) -> Option<Instant> {
        self.nodes.get(&node).copied()
    }

    /// Watch `node`'s heartbeats from `now` on (a spare that registered).
    pub fn watch(&mut self, node: usize, now: Instant) {
        self.nodes.insert(node, now);
    }

    /// Stop watching `node` (excluded, or finished for good).
    pub fn forget_node(&mut self, node: usize) {
        self.nodes.remove(&node);
    }

    pub fn heartbeat(&mut self, node: usize, now: Instant) {
        if let Some(t) = self.nodes.get_mut(&node) {
            *t = now;
        }
    }

    /// A rank's position at `now`: collectives entered, the last one's kind, its phase.
    pub fn position(
        &mut self,
        rank: usize,
        node: usize,
        seq: u64,
        collective: &str,
        phase: Phase,
        now: Instant,
    ) {
        let p = self.ranks.entry(rank).or_default();
        p.node = node;
        if seq >= p.seq {
            p.seq = seq;
            p.collective = collective.into();
        }
        p.phase = phase;
        p.reported_at = Some(now);
        if seq > self.max_seq {
            self.max_seq = seq;
            self.last_step_at = now;
        }
    }

    /// A rank finished `step` in `seconds`, `busy` of them not waiting for others. Returns
    /// a straggler fault the first time a rank has been slow `straggler_steps` in a row.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        rank: usize,
        node: usize,
        step: u64,
        seconds: f64,
        busy: f64,
        seq: u64,
        now: Instant,
    ) -> Option<Fault> {
        let p = self.ranks.entry(rank).or_default();
        p.node = node;
        if step > p.step {
            p.per_step = seq.saturating_sub(p.step_seq);
            p.step_seq = seq;
            p.step = step;
        }
        p.seq = p.seq.max(seq);
        p.phase = Phase::Train;
        p.reported_at = Some(now);
        self.hang_reported = false;
        self.armed = true;
        if rank == 0 {
            self.last_step_at = now;
            self.recent.push_back(seconds);
            while self.recent.len() > WINDOW {
                self.recent.pop_front();
            }
        }
        let at = self.busy.entry(step).or_default();
        at.insert(rank, busy);
        if at.len() < self.world {
            return None;
        }
        let done = self.busy.remove(&step).unwrap_or_default();
        self.busy.retain(|&s, _| s > step);
        self.judge_stragglers(&done, now)
    }

    fn judge_stragglers(&mut self, busy: &BTreeMap<usize, f64>, now: Instant) -> Option<Fault> {
        let median = median(busy.values().copied())?;
        let limit = median * self.policy.straggler_factor;
        let mut found = None;
        for (&rank, &b) in busy {
            let Some(p) = self.ranks.get_mut(&rank) else {
                continue;
            };
            if b > limit && median > 0.0 {
                p.slow_streak += 1;
                p.slow_since.get_or_insert(now);
            } else {
                p.slow_streak = 0;
                p.slow_since = None;
                p.straggling = false;
            }
            if p.slow_streak >= self.policy.straggler_steps && !p.straggling && found.is_none() {
                p.straggling = true;
                found = Some(Fault {
                    kind: Kind::Straggler,
                    rank: Some(rank),
                    node: Some(p.node),
                    detail: format!(
                        "rank {rank} (node {}) was busy {b:.3} s a step, over {:.1}× the median \
                         {median:.3} s, for {} steps in a row",
                        p.node, self.policy.straggler_factor, p.slow_streak
                    ),
                    detected_at: now,
                    // Its first slow step: the latency is the streak's length.
                    healthy_at: p.slow_since.unwrap_or(now),
                    permanent: false,
                    cause: None,
                });
            }
        }
        found
    }

    /// The progress limit now: max(hang_factor × median recent step, hang_floor).
    pub fn hang_limit(&self) -> Duration {
        let typical = median(self.recent.iter().copied()).unwrap_or(0.0);
        Duration::try_from_secs_f64(typical * self.policy.hang_factor)
            .unwrap_or(Duration::MAX)
            .max(self.policy.hang_floor())
    }

    /// Faults visible at `now`: silent agents (each once per call), and a hang (once, until
    /// a step finishes again).
    pub fn check(&mut self, now: Instant) -> Vec<Fault> {
        let mut out = Vec::new();
        for (&node, &seen) in &self.nodes {
            let silent = now.saturating_duration_since(seen);
            if silent > self.policy.heartbeat_timeout() {
                out.push(Fault {
                    kind: Kind::LostHeartbeat,
                    rank: None,
                    node: Some(node),
                    detail: format!(
                        "node {node}: no heartbeat for {:.1} s (limit {:.1} s)",
                        silent.as_secs_f64(),
                        self.policy.heartbeat_timeout_s
                    ),
                    detected_at: now,
                    healthy_at: seen,
                    permanent: false,
                    cause: None,
                });
            }
        }
        let stalled = now.saturating_duration_since(self.last_step_at);
        // Eval, export and the end of a run are not steps: only training can hang here.
        let training = self.ranks.values().all(|p| p.phase == Phase::Train);
        if self.armed && training && !self.hang_reported && stalled > self.hang_limit() {
            self.hang_reported = true;
            out.push(self.hang(now, stalled));
        }
        out
    }

    /// The hang fault: a rank that stopped reporting its position (a stopped or wedged
    /// process), else the one least far through its steps; on a tie the stalest, then the
    /// lowest rank. How far is counted in the rank's own collectives per step, so ranks that
    /// take different numbers per step (pipeline stages) compare fairly.
    fn hang(&self, now: Instant, stalled: Duration) -> Fault {
        let silent_for = |p: &Position| {
            p.reported_at
                .map_or(stalled, |t| now.saturating_duration_since(t))
        };
        let silent = |p: &Position| silent_for(p) > self.policy.position_silence();
        let most = self
            .ranks
            .values()
            .map(Position::progress)
            .fold(f64::NEG_INFINITY, f64::max);
        let culprit = self
            .ranks
            .iter()
            .min_by(|(ra, a), (rb, b)| {
                (!silent(a))
                    .cmp(&!silent(b))
                    .then(a.progress().total_cmp(&b.progress()))
                    .then(silent_for(b).cmp(&silent_for(a)))
                    .then(ra.cmp(rb))
            })
            .map(|(&r, p)| (r, p.clone()));
        let ahead = self.ranks.values().map(|p| p.seq).max().unwrap_or(0);
        let waiting_in = self
            .ranks
            .values()
            .find(|p| p.seq == ahead)
            .map_or(String::new(), |p| p.collective.clone());
        let limits = format!(
            "no progress for {:.1} s (limit {:.1} s)",
            stalled.as_secs_f64(),
            self.hang_limit().as_secs_f64()
        );
        let (rank, node, detail) = match culprit {
            Some((r, p)) if silent(&p) || p.progress() < most => {
                let why = if silent(&p) {
                    format!(", silent for {:.1} s,", silent_for(&p).as_secs_f64())
                } else {
                    String::new()
                };
                (
                    Some(r),
                    Some(p.node),
                    format!(
                        "{limits}: rank {r} (node {}){why} is at collective #{} ({}, phase {}, \
                         step {}) while the others wait in #{ahead} ({waiting_in})",
                        p.node,
                        p.seq,
                        Some(p.collective.as_str())
                            .filter(|c| !c.is_empty())
                            .unwrap_or("none yet"),
                        p.phase.name(),
                        p.step,
                    ),
                )
            }
            _ => (
                None,
                None,
                format!(
                    "{limits}; every rank is at collective #{ahead} ({waiting_in}) and \
                     reporting: no single rank lags"
                ),
            ),
        };
        Fault {
            kind: Kind::Hang,
            rank,
            node,
            detail,
            detected_at: now,
            healthy_at: self.last_step_at,
            permanent: false,
            cause: None,
        }
    }
}

fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    #[test]
    fn a_silent_agent_is_lost_after_the_timeout_and_not_before() {
        let t0 = Instant::now();
        let mut d = Detector::new(LaunchOptions::default(), 4, &[0, 1], t0);
        d.heartbeat(0, secs(t0, 2.5));
        assert!(d.check(secs(t0, 3.0)).is_empty());
        let f = d.check(secs(t0, 3.2));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!((f[0].kind, f[0].node), (Kind::LostHeartbeat, Some(1)));
        assert!((f[0].detection_latency() - 3.2).abs() < 1e-9);
        assert!(f[0].detail.contains("node 1"), "{}", f[0].detail);
    }

    #[test]
    fn a_hang_names_the_rank_whose_collectives_lag() {
        let t0 = Instant::now();
        let mut d = Detector::new(LaunchOptions::default(), 4, &[0, 1], t0);
        for step in 1..=5u64 {
            let now = secs(t0, step as f64 * 0.5);
            for rank in 0..4 {
                d.heartbeat(rank / 2, now);
                assert_eq!(d.step(rank, rank / 2, step, 0.5, 0.4, step * 10, now), None);
            }
        }
        // Rank 3 stops inside step 6; the others enter collective #61 and wait there.
        for rank in 0..3 {
            d.position(
                rank,
                rank / 2,
                61,
                "all_reduce",
                Phase::Train,
                secs(t0, 2.5),
            );
        }
        d.position(3, 1, 60, "all_reduce", Phase::Train, secs(t0, 2.5));
        // The limit is the floor (10 × 0.5 s < 120 s): nothing at 122.4 s, a hang after 122.5 s.
        assert_eq!(d.hang_limit(), Duration::from_secs(120));
        for node in [0, 1] {
            d.heartbeat(node, secs(t0, 122.4));
        }
        assert!(d.check(secs(t0, 122.4)).is_empty());
        let f = d.check(secs(t0, 122.6));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            (f[0].kind, f[0].rank, f[0].node),
            (Kind::Hang, Some(3), Some(1))
        );
        assert!(
            f[0].detail.contains("#60") && f[0].detail.contains("#61"),
            "{}",
            f[0].detail
        );
        assert!((f[0].detection_latency() - 120.1).abs() < 1e-6);
        // Reported once, until steps resume.
        assert!(d.check(secs(t0, 122.8)).is_empty());
    }

    #[test]
    fn a_silent_rank_is_the_culprit_when_no_count_lags_and_setup_is_not_a_hang() {
        let t0 = Instant::now();
        let mut d = Detector::new(LaunchOptions::default(), 2, &[0], t0);
        // Loading the model for a minute is not a hang: nothing is armed before a step.
        d.heartbeat(0, secs(t0, 60.0));
        assert!(d.check(secs(t0, 60.0)).is_empty());
        d.step(0, 0, 1, 0.5, 0.4, 10, secs(t0, 60.5));
        d.step(1, 0, 1, 0.5, 0.4, 10, secs(t0, 60.5));
        // Both entered collective #11; rank 1 went silent (stopped), rank 0 reports from
        // inside the collective.
        d.position(1, 0, 11, "all_reduce", Phase::Train, secs(t0, 60.6));
        for t in [61.0, 100.0, 150.0, 180.7] {
            d.position(0, 0, 11, "all_reduce", Phase::Train, secs(t0, t));
            d.heartbeat(0, secs(t0, t));
        }
        let f = d.check(secs(t0, 180.7));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!((f[0].kind, f[0].rank), (Kind::Hang, Some(1)));
        assert!(
            f[0].detail.contains("silent for 120.1 s"),
            "{}",
            f[0].detail
        );
        // A new generation starts over, unarmed.
        d.reset(2, &[0], secs(t0, 181.0));
        d.heartbeat(0, secs(t0, 400.0));
        assert!(d.check(secs(t0, 400.0)).is_empty());
    }

    #[test]
    fn a_hang_among_pipeline_stages_names_the_rank_behind_in_its_own_collectives() {
        let t0 = Instant::now();
        let mut d = Detector::new(LaunchOptions::default(), 4, &[0, 1], t0);
        // Ranks 0 and 1 (one stage) enter 4 collectives a step, ranks 2 and 3 (the other) 10.
        let per_step = |rank: usize| if rank < 2 { 4 } else { 10 };
        for step in 1..=3u64 {
            for rank in 0..4 {
                let now = secs(t0, step as f64 * 0.5);
                d.step(rank, rank / 2, step, 0.5, 0.4, step * per_step(rank), now);
            }
        }
        // In step 4 rank 2 is stuck 2 collectives in (#32); the others are half way
        // through theirs (#14, #14, #35): rank 2 is behind though #14 < #32. Every rank
        // still reports (its reporter thread runs): none is silent.
        for t in [2.0, 60.0, 100.0, 122.5] {
            for (rank, seq) in [(0, 14), (1, 14), (2, 32), (3, 35)] {
                d.position(rank, rank / 2, seq, "send", Phase::Train, secs(t0, t));
            }
            for node in [0, 1] {
                d.heartbeat(node, secs(t0, t));
            }
        }
        let f = d.check(secs(t0, 122.5));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            (f[0].kind, f[0].rank, f[0].node),
            (Kind::Hang, Some(2), Some(1)),
            "{}",
            f[0].detail
        );
        assert!(f[0].detail.contains("#32"), "{}", f[0].detail);
    }

    #[test]
    fn the_hang_limit_follows_the_recent_step_time() {
        let t0 = Instant::now();
        let mut d = Detector::new(LaunchOptions::default(), 1, &[0], t0);
        // 10 × 30 s steps is over the 120 s floor.
        for step in 1..=25u64 {
            d.step(0, 0, step, 30.0, 30.0, step, secs(t0, step as f64 * 30.0));
        }
        assert_eq!(d.hang_limit(), Duration::from_secs(300));
    }

    #[test]
    fn a_rank_slow_for_m_steps_in_a_row_is_a_straggler_once() {
        let t0 = Instant::now();
        let mut d = Detector::new(LaunchOptions::default(), 4, &[0, 1], t0);
        let mut found = Vec::new();
        for step in 1..=8u64 {
            let now = secs(t0, step as f64);
            for rank in 0..4 {
                // Rank 2 is slow from step 3 on, but for one step rank 1 is too.
                let busy = match (rank, step) {
                    (2, s) if s >= 3 => 0.9,
                    (1, 4) => 0.9,
                    _ => 0.4,
                };
                found.extend(d.step(rank, rank / 2, step, 1.0, busy, step, now));
            }
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].kind, found[0].rank, found[0].node),
            (Kind::Straggler, Some(2), Some(1))
        );
        assert!(
            found[0].detail.contains("3 steps in a row"),
            "{}",
            found[0].detail
        );
    }
}
