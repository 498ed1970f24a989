//! The job's coordinator (one per job, inside node 0's agent): rendezvous, rank
//! assignment, the peer table, heartbeats, the fault decision and the event log.
//! The decisions themselves are pure functions in [`state`].

pub mod detect;
pub mod recover;
pub mod state;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::events::EventLog;
use crate::progress::StepDisplay;
use crate::rpc;
use state::{decide, Decision, JobState, Policy, WorkerExit};

/// What the coordinator needs to know up front.
pub struct Settings {
    pub nnodes: usize,
    pub policy: Policy,
    pub rdzv_timeout: Duration,
    /// Fields of the `start` event.
    pub start: Value,
    /// Shown as a bar (or log lines) from rank 0's step reports.
    pub display: StepDisplay,
}

struct Inner {
    state: JobState,
    events: EventLog,
    display: StepDisplay,
    fault_logged: bool,
    done_logged: bool,
    finished: bool,
}

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
    nonce: u64,
    policy: Policy,
    rdzv_timeout: Duration,
    started: Instant,
}

impl Coordinator {
    pub fn new(settings: Settings, mut events: EventLog) -> crate::Result<Self> {
        events.emit("start", settings.start)?;
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                state: JobState::new(settings.nnodes),
                events,
                display: settings.display,
                fault_logged: false,
                done_logged: false,
                finished: false,
            })),
            changed: Arc::new(Notify::new()),
            nonce: rand::random(),
            policy: settings.policy,
            rdzv_timeout: settings.rdzv_timeout,
            started: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock already ended the job; keep serving what is left.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Re-evaluate the job (called on a timer and on every message): logs a fault once.
    pub fn tick(&self) -> Decision {
        let mut inner = self.lock();
        let decision = decide(Instant::now(), &inner.state, &self.policy);
        match &decision {
            Decision::Stop(fault) if !inner.fault_logged => {
                inner.fault_logged = true;
                // A lost node becomes the job's fault too: waiting RPCs abort on it.
                inner.state.fault.get_or_insert_with(|| fault.clone());
                inner.display.abandon();
                let fields =
                    json!({"node": fault.node, "fault_rank": fault.rank, "reason": fault.reason});
                log(
                    &mut inner.events,
                    "fault",
                    fault.rank,
                    Some(fault.node),
                    fields,
                );
                self.changed.notify_waiters();
            }
            Decision::Finished if !inner.finished => {
                inner.finished = true;
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
            }
            _ => {}
        }
        decision
    }

    /// Wait until `ready` holds (or the job stops, or `timeout` passes).
    async fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        ready: impl Fn(&JobState) -> Option<T>,
    ) -> Result<T, Status> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            {
                let inner = self.lock();
                if let Some(v) = ready(&inner.state) {
                    return Ok(v);
                }
                if let Some(f) = &inner.state.fault {
                    return Err(Status::aborted(format!("the job stopped: {}", f.reason)));
                }
                if tokio::time::Instant::now() >= deadline {
                    let joined: Vec<usize> = inner.state.nodes.keys().copied().collect();
                    return Err(Status::deadline_exceeded(format!(
                        "{what} did not happen within {:.0} s (nodes joined: {joined:?} of {})",
                        timeout.as_secs_f64(),
                        inner.state.nnodes
                    )));
                }
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

fn log(events: &mut EventLog, kind: &str, rank: Option<usize>, node: Option<usize>, fields: Value) {
    if let Err(e) = events.emit_as(kind, rank, node, fields) {
        tracing::warn!("event log: {e:#}");
    }
}

/// One report line from an agent: a worker's message (see `parallel::runtime::link`) or the
/// agent's own (`spawn`).
fn ingest(inner: &mut Inner, node: usize, line: &str) {
    let Ok(Value::Object(mut msg)) = serde_json::from_str::<Value>(line) else {
        tracing::warn!("node {node} sent an unreadable report: {line}");
        return;
    };
    let kind = msg
        .remove("type")
        .and_then(|t| t.as_str().map(String::from))
        .unwrap_or_default();
    let rank = msg
        .remove("rank")
        .and_then(|r| r.as_u64())
        .map(|r| r as usize);
    match kind.as_str() {
        "progress" => {
            let extra = msg.remove("extra");
            if let Some(Value::Object(extra)) = extra {
                msg.extend(extra);
            }
            if rank == Some(0) && msg.get("phase").and_then(Value::as_str) == Some("train") {
                inner.display.step(&msg);
            }
            log(
                &mut inner.events,
                "step",
                rank,
                Some(node),
                Value::Object(msg),
            );
        }
        "event" => {
            let event = msg
                .remove("event")
                .and_then(|e| e.as_str().map(String::from))
                .unwrap_or_default();
            let fields = msg.remove("fields").unwrap_or(Value::Null);
            inner.done_logged |= event == "done";
            log(&mut inner.events, &event, rank, Some(node), fields);
        }
        "error" | "spawn" => log(
            &mut inner.events,
            &kind,
            rank,
            Some(node),
            Value::Object(msg),
        ),
        _ => {}
    }
}

fn node_of(n: u32) -> usize {
    n as usize
}

#[tonic::async_trait]
impl rpc::coordinator_server::Coordinator for Coordinator {
    async fn join(
        &self,
        request: Request<rpc::JoinRequest>,
    ) -> Result<Response<rpc::JoinReply>, Status> {
        let r = request.into_inner();
        let node = node_of(r.node_rank);
        {
            let mut inner = self.lock();
            inner
                .state
                .join(
                    Instant::now(),
                    node,
                    r.nnodes as usize,
                    r.nproc as usize,
                    &r.host,
                )
                .map_err(Status::invalid_argument)?;
            let fields = json!({"host": r.host, "nproc": r.nproc});
            log(&mut inner.events, "join", None, Some(node), fields);
        }
        self.changed.notify_waiters();
        let (world, first, generation) = self
            .wait_for(self.rdzv_timeout, "rendezvous", |s| {
                s.all_joined()
                    .then(|| (s.world_size(), s.first_rank(node), s.generation))
            })
            .await?;
        Ok(Response::new(rpc::JoinReply {
            world_size: world as u32,
            first_rank: first as u32,
            generation,
            nonce: self.nonce,
        }))
    }

    async fn exchange_peers(
        &self,
        request: Request<rpc::PeersRequest>,
    ) -> Result<Response<rpc::PeersReply>, Status> {
        let r = request.into_inner();
        {
            let mut inner = self.lock();
            let node = node_of(r.node_rank);
            let expected = inner.state.nodes.get(&node).map(|n| n.nproc);
            if expected != Some(r.addrs.len()) {
                return Err(Status::invalid_argument(format!(
                    "node {node} posted {} addresses, expected {expected:?}",
                    r.addrs.len()
                )));
            }
            inner.state.peers.insert(node, r.addrs);
        }
        self.changed.notify_waiters();
        let addrs = self
            .wait_for(self.rdzv_timeout, "the peer exchange", JobState::peer_table)
            .await?;
        Ok(Response::new(rpc::PeersReply { addrs }))
    }

    async fn heartbeat(
        &self,
        request: Request<rpc::HeartbeatRequest>,
    ) -> Result<Response<rpc::HeartbeatReply>, Status> {
        let r = request.into_inner();
        let node = node_of(r.node_rank);
        {
            let mut inner = self.lock();
            inner.state.heartbeat(Instant::now(), node);
            for line in &r.reports {
                ingest(&mut inner, node, line);
            }
        }
        let reply = match self.tick() {
            Decision::Stop(f) => rpc::HeartbeatReply {
                stop: true,
                reason: f.reason,
                finished: false,
            },
            Decision::Finished => rpc::HeartbeatReply {
                stop: false,
                reason: String::new(),
                finished: true,
            },
            Decision::Continue => rpc::HeartbeatReply::default(),
        };
        Ok(Response::new(reply))
    }

    async fn worker_exit(
        &self,
        request: Request<rpc::WorkerExitRequest>,
    ) -> Result<Response<rpc::Ack>, Status> {
        let r = request.into_inner();
        let exit = WorkerExit {
            node: node_of(r.node_rank),
            rank: r.rank as usize,
            pid: r.pid,
            code: (r.signal == 0).then_some(r.code),
            signal: (r.signal != 0).then_some(r.signal),
            message: r.message,
        };
        {
            let mut inner = self.lock();
            let fields = json!({"pid": exit.pid, "code": exit.code, "signal": exit.signal, "message": exit.message});
            log(
                &mut inner.events,
                "exit",
                Some(exit.rank),
                Some(exit.node),
                fields,
            );
            inner.state.worker_exit(&exit);
        }
        self.tick();
        Ok(Response::new(rpc::Ack {}))
    }

    async fn node_done(
        &self,
        request: Request<rpc::NodeDoneRequest>,
    ) -> Result<Response<rpc::Ack>, Status> {
        let node = node_of(request.into_inner().node_rank);
        self.lock().state.node_done(Instant::now(), node);
        self.tick();
        Ok(Response::new(rpc::Ack {}))
    }
}

impl Coordinator {
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

/// Serve the coordinator on `listener` until `shutdown` resolves, re-deciding twice a
/// second; only calls carrying `token` get through.
pub async fn serve(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    token: crate::auth::Token,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let ticker = coordinator.clone();
    let tick = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(500));
        loop {
            every.tick().await;
            ticker.tick();
        }
    });
    let logger = coordinator.clone();
    let check = crate::auth::Check {
        token,
        rejected: Arc::new(move |peer, why| logger.rejected(peer, why)),
    };
    let result = tonic::transport::Server::builder()
        .add_service(
            rpc::coordinator_server::CoordinatorServer::with_interceptor(coordinator, check),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    tick.abort();
    result
}
