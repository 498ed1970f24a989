//! The job's coordinator (one per job, inside node 0's agent): rendezvous, rank
//! assignment, the peer table, heartbeats, fault detection and recovery, the event log.
//!
//! The job runs in generations. When [`detect`] finds a fault, [`recover::decide`] says
//! what to do; a restart bumps the generation: every agent hears it in its next heartbeat
//! reply, kills its workers, waits for them and joins again; the new generation's
//! rendezvous completes only when every member has, so two generations never train at
//! once (and each generation's data plane has its own connection token). A lost node is
//! left out, a spare takes its place or the job shrinks: the workers of the new
//! generation get the layout re-planned for their world and resume from the last
//! committed checkpoint ([`Settings::replan`]).

pub mod detect;
pub mod recover;
pub mod service;
pub mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::Notify;
use tonic::Status;

use crate::events::EventLog;
use crate::progress::StepDisplay;
use detect::{DetectPolicy, Detector, Fault};
use recover::{Action, Cluster, RecoveryPolicy};
use state::{JobState, WorkerExit};

pub use service::serve;

/// Worker arguments for a new generation of `world` ranks (`local` per node), and the
/// plan for its `restart` event.
pub type Replan = Arc<dyn Fn(usize, usize) -> Result<(Vec<String>, Value), String> + Send + Sync>;

/// What the coordinator needs to know up front.
pub struct Settings {
    pub nnodes: usize,
    pub detect: DetectPolicy,
    pub recover: RecoveryPolicy,
    pub rdzv_timeout: Duration,
    /// Fields of the `start` event.
    pub start: Value,
    /// Shown as a bar (or log lines) from rank 0's step reports.
    pub display: StepDisplay,
    /// How a restarted generation's workers are told to resume (and, for a changed world,
    /// their new layout); `None`: the same command again.
    pub replan: Option<Replan>,
}

/// Failed workers reported within this long of the first are one crash (and it is acted on
/// only once every node has beaten since): the one a signal ended is blamed, not the peers
/// that lost their connection to it.
const CRASH_WINDOW: Duration = Duration::from_millis(500);

struct Inner {
    state: JobState,
    detector: Detector,
    events: EventLog,
    display: StepDisplay,
    /// Failed workers of the current generation, as reported.
    crashes: Vec<(Instant, WorkerExit)>,
    /// Faults per node so far.
    node_faults: BTreeMap<usize, u32>,
    /// When the fault being recovered from was detected (until the next step).
    recovering: Option<Instant>,
    /// The fault a restart was decided for, until every fault seen with it is handled: two
    /// nodes lost at once cost one restart.
    pending: Option<Fault>,
    finish_logged: bool,
    done_logged: bool,
}

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
    nonce: u64,
    policy: RecoveryPolicy,
    replan: Option<Replan>,
    rdzv_timeout: Duration,
    started: Instant,
}

/// Unix seconds of an instant in the past (or now).
fn unix(at: Instant) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    now - Instant::now().saturating_duration_since(at).as_secs_f64()
}

fn log(events: &mut EventLog, kind: &str, rank: Option<usize>, node: Option<usize>, fields: Value) {
    if let Err(e) = events.emit_as(kind, rank, node, fields) {
        tracing::warn!("event log: {e:#}");
    }
}

impl Coordinator {
    pub fn new(settings: Settings, mut events: EventLog) -> crate::Result<Self> {
        events.emit("start", settings.start)?;
        let now = Instant::now();
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                state: JobState::new(settings.nnodes),
                detector: Detector::new(settings.detect, 0, &[], now),
                events,
                display: settings.display,
                crashes: Vec::new(),
                node_faults: BTreeMap::new(),
                recovering: None,
                pending: None,
                finish_logged: false,
                done_logged: false,
            })),
            changed: Arc::new(Notify::new()),
            nonce: rand::random(),
            policy: settings.recover,
            replan: settings.replan,
            rdzv_timeout: settings.rdzv_timeout,
            started: now,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock already ended the job; keep serving what is left.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The data-plane token of `generation`: workers of another generation cannot connect.
    fn nonce(&self, generation: u64) -> u64 {
        self.nonce ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// Look for faults (on a timer and after every message) and act on them; log the end.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        let s = &inner.state;
        if s.started && s.stopped.is_none() && !s.finished() {
            // A crash is acted on once every node has been heard from since: a node that
            // died with it (its workers' peers crash first) is then found as a lost node,
            // not taken for a transient crash.
            let decided = inner.crashes.first().is_some_and(|(at, _)| {
                now.saturating_duration_since(*at) >= CRASH_WINDOW
                    && inner.detector.all_heard_since(*at)
            });
            if decided {
                let fault = culprit(&inner.crashes, now);
                inner.crashes.clear();
                self.handle(&mut inner, fault);
            }
            for fault in inner.detector.check(now) {
                if inner.state.stopped.is_some() {
                    break;
                }
                // Once a restart is decided only another lost node still matters: a hang
                // seen in this generation goes with its workers.
                if inner.pending.is_some() && fault.kind != detect::Kind::LostHeartbeat {
                    continue;
                }
                self.handle(&mut inner, fault);
            }
            self.settle(&mut inner, now);
        }
        if inner.state.stopped.is_some() {
            inner.display.abandon();
        } else if inner.state.finished() && !inner.finish_logged {
            inner.finish_logged = true;
            inner.display.finish();
            // `launch train`'s rank 0 logs its own `done` (steps, loss); a user program
            // gets one from here.
            if !inner.done_logged {
                let seconds = self.started.elapsed().as_secs_f64();
                log(
                    &mut inner.events,
                    "done",
                    None,
                    None,
                    json!({"seconds": seconds}),
                );
            }
            self.changed.notify_waiters();
        }
    }

    /// Log `fault`, decide and act: drop or replace a node, give up, go on, or mark a restart
    /// pending (started by [`Self::settle`]).
    fn handle(&self, inner: &mut Inner, fault: Fault) {
        let fields = json!({
            "kind": fault.kind.as_str(), "detail": fault.detail,
            "detected_at": unix(fault.detected_at),
            "detection_latency_s": fault.detection_latency(),
        });
        log(&mut inner.events, "fault", fault.rank, fault.node, fields);
        if let Some(n) = fault.node.filter(|n| inner.state.spares.contains(n)) {
            // A spare went silent: it just stops being one.
            drop_node(inner, n, &fault);
            let why = format!("spare node {n} dropped: {}", fault.detail);
            log(
                &mut inner.events,
                "decision",
                None,
                Some(n),
                json!({"action": "drop_spare", "reason": why}),
            );
            return;
        }
        let cluster = Cluster {
            active: inner.state.members.clone(),
            spares: inner.state.spares.clone(),
            restarts: inner.state.restarts,
            faults: inner.node_faults.clone(),
        };
        let (action, reason) = recover::decide(&fault, &cluster, &self.policy);
        if let Some(n) = fault.node.filter(|_| action != Action::Continue) {
            *inner.node_faults.entry(n).or_default() += 1;
        }
        let fields =
            json!({"action": action.name(), "reason": reason, "fault": fault.kind.as_str()});
        log(
            &mut inner.events,
            "decision",
            fault.rank,
            fault.node,
            fields,
        );
        tracing::warn!(
            "{}: {} → {}: {reason}",
            fault.kind.as_str(),
            fault.detail,
            action.name()
        );
        match action {
            Action::Continue => return,
            Action::GiveUp => {
                inner.state.stopped = Some(format!("{} (giving up: {reason})", fault.detail));
            }
            Action::RestartInPlace => {}
            Action::Replace { lost, spare } => {
                drop_node(inner, lost, &fault);
                inner.state.promote(spare);
            }
            Action::Shrink { lost, .. } => drop_node(inner, lost, &fault),
        }
        if action != Action::GiveUp {
            // Started by `settle`, once the faults seen with this one are handled.
            inner.pending.get_or_insert(fault);
        }
        self.changed.notify_waiters();
    }

    /// Start the restart decided since the last call, once (unless the job gave up since).
    fn settle(&self, inner: &mut Inner, now: Instant) {
        if let Some(fault) = inner.pending.take() {
            if inner.state.stopped.is_none() {
                self.restart(inner, &fault, now);
                self.changed.notify_waiters();
            }
        }
    }

    /// A new agent process for `node`, which had joined the current generation: its old
    /// agent and workers are gone. A fault like a crash (restart in place; exclusion after
    /// `exclude_after`); unless that ends the job or excludes the node, the new agent joins
    /// the next generation. Nothing to do once the job stopped or finished.
    fn returned(&self, inner: &mut Inner, node: usize, now: Instant) {
        let s = &inner.state;
        if s.stopped.is_some() || s.finished() {
            return;
        }
        let generation = inner.state.generation;
        let fault = Fault {
            kind: detect::Kind::AgentRestart,
            rank: None,
            node: Some(node),
            detail: format!(
                "node {node}'s agent joined again as a new process while generation \
                 {generation} ran (it was restarted, or two agents have --node-rank {node})"
            ),
            detected_at: now,
            healthy_at: inner.detector.last_heard(node).unwrap_or(now),
            permanent: false,
        };
        self.handle(inner, fault);
        self.settle(inner, now);
        if inner.state.generation != generation && inner.state.members.contains(&node) {
            inner.state.joined.insert(node);
        }
    }

    /// Start the next generation with the current members.
    fn restart(&self, inner: &mut Inner, fault: &Fault, now: Instant) {
        let world = inner.state.world_size();
        let local = inner.state.local_world();
        let (args, plan) = match &self.replan {
            None => (Vec::new(), Value::Null),
            Some(replan) => match replan(world, local) {
                Ok(v) => v,
                Err(e) => {
                    inner.state.stopped = Some(format!(
                        "{} (re-planning for {world} ranks failed: {e})",
                        fault.detail
                    ));
                    return;
                }
            },
        };
        inner.state.next_generation(args);
        inner.crashes.clear();
        let watched = inner.state.watched();
        inner.detector.reset(world, &watched, now);
        let members: Vec<usize> = inner.state.members.iter().copied().collect();
        let generation = inner.state.generation;
        inner.events.set_generation(generation);
        let fields =
            json!({"generation": generation, "world": world, "nodes": members, "plan": plan});
        log(&mut inner.events, "restart", None, None, fields);
        inner.recovering = Some(fault.detected_at);
    }

    /// Wait until `ready` gives an answer, or `timeout` passes.
    async fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        ready: impl Fn(&JobState) -> Option<Result<T, Status>>,
    ) -> Result<T, Status> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            {
                let inner = self.lock();
                if let Some(why) = &inner.state.stopped {
                    return Err(Status::aborted(format!("the job stopped: {why}")));
                }
                if let Some(answer) = ready(&inner.state) {
                    return answer;
                }
                if tokio::time::Instant::now() >= deadline {
                    let s = &inner.state;
                    let joined: Vec<usize> = s.nodes.keys().copied().collect();
                    return Err(Status::deadline_exceeded(format!(
                        "{what} did not happen within {:.0} s (generation {}; nodes joined: \
                         {joined:?}; members {:?})",
                        timeout.as_secs_f64(),
                        s.generation,
                        s.members
                    )));
                }
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// A call refused for want of the job's token: logged, the job goes on.
    fn rejected(&self, peer: String, why: &str) {
        tracing::warn!(peer, why, "control-plane call rejected");
        let mut inner = self.lock();
        log(
            &mut inner.events,
            "auth_rejected",
            None,
            None,
            json!({"peer": peer, "reason": why}),
        );
    }
}

/// Leave `node` out for good because of `fault`, and stop watching it.
fn drop_node(inner: &mut Inner, node: usize, fault: &Fault) {
    inner.state.exclude(node, fault.detail.clone());
    inner.detector.forget_node(node);
}

/// The crash to act on: among the failures reported together, the one a signal ended (its
/// peers fail after it, having lost their connection), else the first.
fn culprit(crashes: &[(Instant, WorkerExit)], now: Instant) -> Fault {
    let (at, exit) = crashes
        .iter()
        .find(|(_, e)| e.signal.is_some())
        .unwrap_or(&crashes[0]);
    let first = crashes[0].0.min(*at);
    detect::crash(exit, now, first)
}

/// One report line from an agent in `generation`: a worker's message (see
/// `parallel::runtime::link`) or the agent's own (`spawn`). Returns the faults it reveals
/// (a straggler).
fn ingest(inner: &mut Inner, node: usize, generation: u64, line: &str, now: Instant) -> Vec<Fault> {
    let Ok(Value::Object(mut msg)) = serde_json::from_str::<Value>(line) else {
        tracing::warn!("node {node} sent an unreadable report: {line}");
        return Vec::new();
    };
    let kind = msg
        .remove("type")
        .and_then(|t| t.as_str().map(String::from))
        .unwrap_or_default();
    let rank = msg
        .remove("rank")
        .and_then(|r| r.as_u64())
        .map(|r| r as usize);
    let current = generation == inner.state.generation;
    let text = |m: &serde_json::Map<String, Value>, k: &str| {
        m.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let number = |m: &serde_json::Map<String, Value>, k: &str| m.get(k).and_then(Value::as_u64);
    let mut faults = Vec::new();
    match kind.as_str() {
        "position" => {
            if let (true, Some(r)) = (current, rank) {
                let seq = number(&msg, "collectives").unwrap_or(0);
                let (collective, phase) = (text(&msg, "collective"), text(&msg, "phase"));
                inner
                    .detector
                    .position(r, node, seq, &collective, &phase, now);
            }
            return faults;
        }
        "progress" => {
            let train = msg.get("phase").and_then(Value::as_str) == Some("train");
            if let (true, true, Some(r)) = (current, train, rank) {
                let step = number(&msg, "step").unwrap_or(0);
                // Worker input: only finite, non-negative seconds count.
                let secs = |k: &str| {
                    msg.get(k)
                        .and_then(Value::as_f64)
                        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
                };
                let seconds = secs("step_time").unwrap_or(0.0);
                let busy = secs("busy").unwrap_or(seconds);
                let seq = number(&msg, "collectives").unwrap_or(0);
                faults.extend(inner.detector.step(r, node, step, seconds, busy, seq, now));
                if let Some(since) = inner.recovering.take() {
                    let seconds = now.saturating_duration_since(since).as_secs_f64();
                    let fields = json!({"step": step, "seconds_since_fault": seconds});
                    log(&mut inner.events, "recovered", None, None, fields);
                }
            }
            if let Some(Value::Object(extra)) = msg.remove("extra") {
                msg.extend(extra);
            }
            if rank == Some(0) && train && current {
                inner.display.step(&msg);
            }
            msg.insert("generation".into(), json!(generation));
            log(
                &mut inner.events,
                "step",
                rank,
                Some(node),
                Value::Object(msg),
            );
        }
        "event" => {
            let event = text(&msg, "event");
            let mut fields = msg.remove("fields").unwrap_or(Value::Null);
            if let Value::Object(f) = &mut fields {
                f.insert("generation".into(), json!(generation));
            }
            inner.done_logged |= event == "done";
            log(&mut inner.events, &event, rank, Some(node), fields);
        }
        "error" | "spawn" => {
            msg.insert("generation".into(), json!(generation));
            log(
                &mut inner.events,
                &kind,
                rank,
                Some(node),
                Value::Object(msg),
            );
        }
        _ => {}
    }
    faults
}
