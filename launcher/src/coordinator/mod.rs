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

use parallel::runtime::{Phase, ToAgent};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tonic::Status;

use crate::config::LaunchOptions;
use crate::events::{Event, EventLog, Start, StepEvent};
use crate::plan::Decided;
use crate::progress::StepDisplay;
use detect::{Detector, Fault};
use recover::{Action, Cluster};
use state::{JobState, WorkerExit};

pub use service::serve;

/// What the workers of a generation of `launch train` run with: the decided layout, and
/// whether they resume from the last committed checkpoint (every restart does).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub plan: Decided,
    pub resume: bool,
    /// A tidal window's deadline and estimates (kept by every generation of the window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::tidal::WindowWork>,
}

/// The layout for a new generation of `world` ranks (`local` per node), given the current
/// one; the error says why none fits.
pub type Replan =
    Arc<dyn Fn(usize, usize, Option<&Decided>) -> Result<Decided, String> + Send + Sync>;

/// What the coordinator needs to know up front.
pub struct Settings {
    pub nnodes: usize,
    /// Detection thresholds and recovery limits: the job's `[launch]` section.
    pub policy: LaunchOptions,
    /// The `start` event.
    pub start: Start,
    /// Shown as a bar (or log lines) from rank 0's step reports.
    pub display: StepDisplay,
    /// What the first generation's workers run with (`None`: a user program, `launch run`).
    pub first: Option<Generation>,
    /// How a restarted generation's layout is decided; `None`: the same command again.
    pub replan: Option<Replan>,
    /// A tidal window this run of the job trains in.
    pub tidal: Option<TidalWindow>,
}

/// The window a tidal job's coordinator runs in (Unix seconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TidalWindow {
    pub window: crate::tidal::Window,
    /// By when every process of the job must be gone: the window's end − the margin.
    pub handback: f64,
    /// When the agents kill what is left of the workers.
    pub deadline: f64,
}

/// What the coordinator follows of a tidal window.
struct Tide {
    window: TidalWindow,
    preempted: bool,
    /// Rank 0 said it stopped for the window (a `yield` event).
    yield_seen: bool,
    /// Rank 0's newest step, and the step of the newest checkpoint (or resume).
    last_step: u64,
    saved_step: u64,
    closed: bool,
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
    tide: Option<Tide>,
}

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
    nonce: u64,
    policy: Arc<LaunchOptions>,
    replan: Option<Replan>,
    started: Instant,
}

/// Unix seconds of an instant in the past (or now).
fn unix(at: Instant) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    now - Instant::now().saturating_duration_since(at).as_secs_f64()
}

fn log(events: &mut EventLog, event: Event, rank: Option<usize>, node: Option<usize>) {
    if let Err(e) = events.emit(event, rank, node) {
        tracing::warn!("event log: {e:#}");
    }
}

impl Coordinator {
    pub fn new(settings: Settings, mut events: EventLog) -> crate::Result<Self> {
        let world = settings.start.world_size;
        events.emit(Event::Start(settings.start), None, None)?;
        if let Some(t) = &settings.tidal {
            let open = Event::WindowOpen {
                start: t.window.start,
                end: t.window.end,
                handback: t.handback,
                world,
            };
            events.emit(open, None, None)?;
        }
        let tide = settings.tidal.map(|window| Tide {
            window,
            preempted: false,
            yield_seen: false,
            last_step: 0,
            saved_step: 0,
            closed: false,
        });
        let now = Instant::now();
        let mut state = JobState::new(settings.nnodes);
        state.work = settings.first;
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                state,
                detector: Detector::new(settings.policy.clone(), 0, &[], now),
                events,
                display: settings.display,
                crashes: Vec::new(),
                node_faults: BTreeMap::new(),
                recovering: None,
                pending: None,
                finish_logged: false,
                done_logged: false,
                tide,
            })),
            changed: Arc::new(Notify::new()),
            nonce: rand::random(),
            policy: Arc::new(settings.policy),
            replan: settings.replan,
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
            close_window(&mut inner);
        } else if inner.state.finished() && !inner.finish_logged {
            inner.finish_logged = true;
            inner.display.finish();
            let yielded = inner.state.yielded;
            close_window(&mut inner);
            // `launch train`'s rank 0 logs its own `done` (steps, loss); a user program
            // gets one from here.
            if !inner.done_logged && !yielded {
                let seconds = self.started.elapsed().as_secs_f64();
                let done = Event::Done {
                    steps: None,
                    loss: None,
                    seconds,
                };
                log(&mut inner.events, done, None, None);
            }
            self.changed.notify_waiters();
        }
    }

    /// A tidal job preempted on `node` (or by `launch preempt`): every worker is to be
    /// gone by `by` (Unix seconds); every agent hears it in its next heartbeat reply.
    fn preempt(&self, inner: &mut Inner, node: usize, by: f64) {
        let Some(tide) = &mut inner.tide else {
            return;
        };
        let earlier = inner.state.yield_by.is_none_or(|t| by < t);
        if earlier {
            tide.preempted = true;
            inner.state.yield_by = Some(by);
            log(&mut inner.events, Event::Preempt { by }, None, Some(node));
            self.changed.notify_waiters();
        }
    }

    /// Whether a tidal window is ending: its workers stop (or are stopped) on purpose, so a
    /// worker exiting or falling silent then is no fault.
    fn yielding(inner: &Inner) -> bool {
        inner.tide.as_ref().is_some_and(|t| {
            t.yield_seen
                || inner.state.yielded
                || inner.state.yield_by.is_some()
                || crate::tidal::now() >= t.window.deadline - 1.0
        })
    }

    /// Log `fault`, decide and act: drop or replace a node, give up, go on, or mark a restart
    /// pending (started by [`Self::settle`]).
    fn handle(&self, inner: &mut Inner, fault: Fault) {
        if Self::yielding(inner) {
            // A node lost while the window ends (its host went, its agent was killed) has
            // stopped too: counted as done, so that the window still closes.
            let lost = fault.node.filter(|n| {
                fault.kind == detect::Kind::LostHeartbeat
                    && inner.state.members.contains(n)
                    && !inner.state.done.contains(n)
            });
            if let Some(n) = lost {
                log_fault(inner, &fault);
                let decision = Event::Decision {
                    action: crate::events::Action::Continue,
                    reason: format!("the tidal window is ending: node {n} counts as stopped"),
                    fault: Some(fault.kind),
                };
                log(&mut inner.events, decision, None, Some(n));
                inner.detector.forget_node(n);
                inner.state.done.insert(n);
                inner.state.yielded = true;
                self.changed.notify_waiters();
            } else {
                tracing::info!("the tidal window is ending; not a fault: {}", fault.detail);
            }
            return;
        }
        log_fault(inner, &fault);
        if let Some(n) = fault.node.filter(|n| inner.state.spares.contains(n)) {
            // A spare went silent: it just stops being one.
            drop_node(inner, n, &fault);
            let decision = Event::Decision {
                action: crate::events::Action::DropSpare,
                reason: format!("spare node {n} dropped: {}", fault.detail),
                fault: Some(fault.kind),
            };
            log(&mut inner.events, decision, None, Some(n));
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
        let decision = Event::Decision {
            action: action.kind(),
            reason: reason.clone(),
            fault: Some(fault.kind),
        };
        log(&mut inner.events, decision, fault.rank, fault.node);
        tracing::warn!(
            "{}: {} → {:?}: {reason}",
            fault.kind.name(),
            fault.detail,
            action.kind()
        );
        match action {
            Action::Continue => return,
            // Bad input: the worker's own words are the whole story.
            Action::GiveUp if fault.permanent => {
                inner.state.stopped = Some(fault.cause.clone().unwrap_or(fault.detail.clone()));
                inner.state.input_error = true;
            }
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
            cause: None,
        };
        self.handle(inner, fault);
        self.settle(inner, now);
        if inner.state.generation != generation && inner.state.members.contains(&node) {
            inner.state.joined.insert(node);
        }
    }

    /// Start the next generation with the current members: the same layout for the same
    /// world, else one decided for the new one; its workers resume.
    fn restart(&self, inner: &mut Inner, fault: &Fault, now: Instant) {
        let world = inner.state.world_size();
        let local = inner.state.local_world();
        let current = inner.state.work.as_ref().map(|w| &w.plan);
        let window = inner.state.work.as_ref().and_then(|w| w.window);
        let work = match &self.replan {
            None => None,
            Some(replan) => match replan(world, local, current) {
                Ok(plan) => Some(Generation {
                    plan,
                    resume: true,
                    window,
                }),
                Err(e) => {
                    inner.state.stopped = Some(format!(
                        "{} (re-planning for {world} ranks failed: {e})",
                        fault.detail
                    ));
                    return;
                }
            },
        };
        let plan = work.as_ref().map(|w| w.plan.event(world));
        inner.state.next_generation(work);
        inner.crashes.clear();
        let watched = inner.state.watched();
        inner.detector.reset(world, &watched, now);
        let nodes: Vec<usize> = inner.state.members.iter().copied().collect();
        inner.events.set_generation(inner.state.generation);
        let restart = Event::Restart { world, nodes, plan };
        log(&mut inner.events, restart, None, None);
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
        let event = Event::AuthRejected {
            peer,
            reason: why.into(),
        };
        log(&mut inner.events, event, None, None);
    }
}

/// The `fault` event of `fault`.
fn log_fault(inner: &mut Inner, fault: &Fault) {
    let logged = Event::Fault {
        kind: fault.kind,
        detail: fault.detail.clone(),
        detected_at: unix(fault.detected_at),
        detection_latency_s: fault.detection_latency(),
    };
    log(&mut inner.events, logged, fault.rank, fault.node);
}

/// A tidal window's end, once every node is done (or the job stopped): why it closed, the step reached, the
/// steps since the last checkpoint (to do again).
fn close_window(inner: &mut Inner) {
    let yielded = inner.state.yielded;
    let Some(t) = inner.tide.as_mut().filter(|t| !t.closed) else {
        return;
    };
    t.closed = true;
    let stopped = inner.state.stopped.is_some();
    let reason = match (stopped, yielded, t.preempted) {
        (true, _, _) => crate::tidal::CloseReason::Stopped,
        (false, false, _) => crate::tidal::CloseReason::Finished,
        (false, true, true) => crate::tidal::CloseReason::Preempted,
        (false, true, false) => crate::tidal::CloseReason::Deadline,
    };
    let lost_steps = if yielded || stopped {
        t.last_step.saturating_sub(t.saved_step)
    } else {
        0
    };
    let close = Event::WindowClose {
        reason,
        steps: t.last_step,
        lost_steps,
    };
    log(&mut inner.events, close, None, None);
}

/// Leave `node` out for good because of `fault`, and stop watching it.
fn drop_node(inner: &mut Inner, node: usize, fault: &Fault) {
    inner.state.exclude(node, fault.detail.clone());
    inner.detector.forget_node(node);
}

/// The crash to act on: among the failures reported together, one that says its input is
/// bad (exit status 2: restarting cannot help, whoever else failed with it), else the one
/// a signal ended (its peers fail after it, having lost their connection), else the first.
fn culprit(crashes: &[(Instant, WorkerExit)], now: Instant) -> Fault {
    let (at, exit) = crashes
        .iter()
        .find(|(_, e)| e.code == Some(2))
        .or_else(|| crashes.iter().find(|(_, e)| e.signal.is_some()))
        .unwrap_or(&crashes[0]);
    let first = crashes[0].0.min(*at);
    detect::crash(exit, now, first)
}

/// How a report of a worker (or of its agent) goes into the event log, with the rank it
/// concerns: positions are not logged.
pub fn logged(msg: ToAgent<Event>) -> Option<(usize, Event)> {
    match msg {
        ToAgent::Progress(p) => Some((
            p.rank,
            Event::Step(StepEvent {
                phase: p.phase,
                seq: p.seq,
                busy: p.busy,
                collectives: p.collectives,
                stats: p.stats,
            }),
        )),
        ToAgent::Phase { rank, phase, step } => Some((rank, Event::Phase { phase, step })),
        ToAgent::Event { rank, event } => Some((rank, event)),
        ToAgent::Error { rank, message } => Some((rank, Event::Error { message })),
        ToAgent::Hello { .. } | ToAgent::Position(_) => None,
    }
}

/// One report line from an agent in `generation`: a worker's message (see
/// `parallel::runtime::link`) or the agent's own (`spawn`). Returns the faults it reveals
/// (a straggler).
fn ingest(inner: &mut Inner, node: usize, generation: u64, line: &str, now: Instant) -> Vec<Fault> {
    let msg = match crate::events::parse_report(line) {
        Ok(msg) => msg,
        Err(e) => {
            tracing::warn!("node {node} sent an unreadable report ({e}): {line}");
            return Vec::new();
        }
    };
    let current = generation == inner.state.generation;
    let mut faults = Vec::new();
    match &msg {
        ToAgent::Position(p) if current => {
            let phase = p.phase;
            let (seq, collective) = (p.collectives, p.collective.as_str());
            inner
                .detector
                .position(p.rank, node, seq, collective, phase, now);
        }
        ToAgent::Progress(p) if current && p.phase == Phase::Train => {
            let s = &p.stats;
            // Worker input: only finite, non-negative seconds count.
            let secs = |v: f64| Some(v).filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9);
            let seconds = secs(s.step_time).unwrap_or(0.0);
            let busy = secs(p.busy).unwrap_or(seconds);
            faults.extend(inner.detector.step(
                p.rank,
                node,
                s.step,
                seconds,
                busy,
                p.collectives,
                now,
            ));
            if let Some(since) = inner.recovering.take() {
                let seconds_since_fault = now.saturating_duration_since(since).as_secs_f64();
                let event = Event::Recovered {
                    step: s.step,
                    seconds_since_fault,
                };
                log(&mut inner.events, event, None, None);
            }
            if p.rank == 0 {
                inner.display.step(s);
                if let Some(t) = &mut inner.tide {
                    t.last_step = s.step;
                }
            }
        }
        ToAgent::Event { event, .. } if current && inner.tide.is_some() => {
            if let Some(t) = &mut inner.tide {
                match event {
                    Event::Checkpoint { step, .. } | Event::Resumed { step, .. } => {
                        t.saved_step = t.saved_step.max(*step);
                        t.last_step = t.last_step.max(*step);
                    }
                    Event::Yield { .. } => t.yield_seen = true,
                    _ => {}
                }
            }
            if let Event::Done { .. } = event {
                inner.done_logged = true;
            }
        }
        ToAgent::Event {
            event: Event::Done { .. },
            ..
        } => inner.done_logged = true,
        _ => {}
    }
    if let Some((rank, event)) = logged(msg) {
        let at = inner.events.generation();
        inner.events.set_generation(generation);
        log(&mut inner.events, event, Some(rank), Some(node));
        inner.events.set_generation(at);
    }
    faults
}
