//! The coordinator's gRPC service and its server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use super::state::{JobState, Joined, WorkerExit};
use super::{ingest, log, Coordinator};
use crate::events::Event;
use crate::rpc;

/// How often the coordinator looks for faults between messages.
const TICK: Duration = Duration::from_millis(100);

/// A spare waits this long to be called in.
const SPARE_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The answer that tells an agent to join again: the generation moved on while it waited.
fn rejoin(generation: u64) -> rpc::JoinReply {
    rpc::JoinReply {
        generation,
        rejoin: true,
        ..Default::default()
    }
}

/// The peer exchange's answer when the generation moved on.
fn moved_on() -> rpc::PeersReply {
    rpc::PeersReply {
        addrs: Vec::new(),
        rejoin: true,
    }
}

fn node_of(n: u32) -> usize {
    n as usize
}

/// A worker's end as an agent reports it.
pub fn exit_of(r: &rpc::WorkerExitRequest) -> WorkerExit {
    WorkerExit {
        node: node_of(r.node_rank),
        rank: r.rank as usize,
        pid: r.pid,
        code: (r.signal == 0).then_some(r.code),
        signal: (r.signal != 0).then_some(r.signal),
        message: r.message.clone(),
    }
}

/// What a heartbeat (or worker exit) from `node`, whose workers run `generation`, is told.
fn reply_for(state: &JobState, node: usize, generation: u64) -> rpc::HeartbeatReply {
    let stop = |reason: String| rpc::HeartbeatReply {
        stop: true,
        reason,
        ..Default::default()
    };
    if let Some(why) = &state.stopped {
        return rpc::HeartbeatReply {
            input: state.input_error,
            ..stop(why.clone())
        };
    }
    if let Some(why) = state.exclusion(node) {
        return stop(why);
    }
    if state.finished() {
        return rpc::HeartbeatReply {
            finished: true,
            yielded: state.yielded,
            ..Default::default()
        };
    }
    let yield_by = state.yield_by.unwrap_or(0.0);
    if state.members.contains(&node) && generation < state.generation {
        return rpc::HeartbeatReply {
            restart: true,
            generation: state.generation,
            yield_by,
            ..Default::default()
        };
    }
    rpc::HeartbeatReply {
        yield_by,
        ..Default::default()
    }
}

impl Coordinator {
    fn reply(&self, node: usize, generation: u64) -> rpc::HeartbeatReply {
        self.tick();
        reply_for(&self.lock().state, node, generation)
    }
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
            let inner = &mut *inner;
            let joined = inner
                .state
                .join(
                    node,
                    r.nnodes as usize,
                    r.nproc as usize,
                    &r.host,
                    r.spare,
                    r.instance,
                )
                .map_err(Status::failed_precondition)?;
            let now = Instant::now();
            if joined == Joined::Returned {
                self.returned(inner, node, now);
            }
            inner.detector.heartbeat(node, now);
            if joined == Joined::Started {
                let watched = inner.state.watched();
                inner
                    .detector
                    .reset(inner.state.world_size(), &watched, now);
            } else if r.spare {
                inner.detector.watch(node, now);
            }
            let event = Event::Join {
                host: r.host.clone(),
                nproc: r.nproc,
                spare: r.spare,
            };
            log(&mut inner.events, event, None, Some(node));
        }
        self.changed.notify_waiters();
        let timeout = if r.spare {
            SPARE_WAIT
        } else {
            self.policy.rdzv_timeout()
        };
        let reply = self
            .wait_for(timeout, "rendezvous", |s| {
                if let Some(why) = s.exclusion(node) {
                    return Some(Err(Status::failed_precondition(why)));
                }
                // A spare the job never needed, or an agent restarted after the end.
                if s.finished() {
                    return Some(Ok(rpc::JoinReply {
                        finished: true,
                        ..Default::default()
                    }));
                }
                if let Some(a) = s.assignment(node) {
                    let work = s.work.as_ref().map(serde_json::to_string).transpose();
                    let work = work.map_err(|e| Status::internal(e.to_string()));
                    return Some(work.map(|work| rpc::JoinReply {
                        world_size: a.world_size as u32,
                        first_rank: a.first_rank as u32,
                        generation: a.generation,
                        nonce: self.nonce(a.generation),
                        work: work.unwrap_or_default(),
                        nnodes: a.nnodes as u32,
                        node_index: a.index as u32,
                        finished: false,
                        rejoin: false,
                    }));
                }
                // A restart while this node waited: it must join the new generation.
                let moved_on = s.started && s.members.contains(&node) && !s.joined.contains(&node);
                moved_on.then(|| Ok(rejoin(s.generation)))
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn exchange_peers(
        &self,
        request: Request<rpc::PeersRequest>,
    ) -> Result<Response<rpc::PeersReply>, Status> {
        let r = request.into_inner();
        let generation = r.generation;
        {
            let mut inner = self.lock();
            let node = node_of(r.node_rank);
            if inner.state.generation != generation {
                return Ok(Response::new(moved_on()));
            }
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
        let reply = self
            .wait_for(self.policy.rdzv_timeout(), "the peer exchange", |s| {
                if s.generation != generation {
                    return Some(Ok(moved_on()));
                }
                s.peer_table().map(|addrs| {
                    Ok(rpc::PeersReply {
                        addrs,
                        rejoin: false,
                    })
                })
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn heartbeat(
        &self,
        request: Request<rpc::HeartbeatRequest>,
    ) -> Result<Response<rpc::HeartbeatReply>, Status> {
        let r = request.into_inner();
        let node = node_of(r.node_rank);
        let now = Instant::now();
        {
            let mut inner = self.lock();
            let inner = &mut *inner;
            // A beat from another agent process than the one that joined (a restarted agent
            // before its join gets through) vouches for nothing on that node.
            let current = inner
                .state
                .nodes
                .get(&node)
                .is_none_or(|n| r.instance == 0 || n.instance == r.instance);
            if !current {
                return Ok(Response::new(reply_for(&inner.state, node, r.generation)));
            }
            inner.detector.heartbeat(node, now);
            if r.preempt_by > 0.0 && r.preempt_by.is_finite() {
                self.preempt(inner, node, r.preempt_by);
            }
            let mut faults = Vec::new();
            for line in &r.reports {
                faults.extend(ingest(inner, node, r.generation, line, now));
            }
            for fault in faults {
                self.handle(inner, fault);
            }
            self.settle(inner, now);
        }
        Ok(Response::new(self.reply(node, r.generation)))
    }

    async fn worker_exit(
        &self,
        request: Request<rpc::WorkerExitRequest>,
    ) -> Result<Response<rpc::HeartbeatReply>, Status> {
        let r = request.into_inner();
        let exit = exit_of(&r);
        {
            let mut inner = self.lock();
            let event = Event::Exit {
                pid: exit.pid,
                code: exit.code,
                signal: exit.signal,
                message: exit.message.clone(),
            };
            let at = inner.events.generation();
            inner.events.set_generation(r.generation);
            log(&mut inner.events, event, Some(exit.rank), Some(exit.node));
            inner.events.set_generation(at);
            let s = &inner.state;
            if !exit.success() && r.generation == s.generation && s.stopped.is_none() {
                inner.crashes.push((Instant::now(), exit.clone()));
            }
        }
        Ok(Response::new(self.reply(exit.node, r.generation)))
    }

    async fn node_done(
        &self,
        request: Request<rpc::NodeDoneRequest>,
    ) -> Result<Response<rpc::Ack>, Status> {
        let r = request.into_inner();
        {
            let mut inner = self.lock();
            if r.generation == inner.state.generation {
                inner.state.done.insert(node_of(r.node_rank));
                inner.state.yielded |= r.yielded;
            }
        }
        self.tick();
        Ok(Response::new(rpc::Ack {}))
    }
}

/// Serve the coordinator on `listener` until `shutdown` resolves, looking for faults every
/// [`TICK`] (over TLS when `tls` is given); only calls carrying `token` get through.
pub async fn serve(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    token: crate::auth::Token,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let ticker = coordinator.clone();
    let tick = tokio::spawn(async move {
        let mut every = tokio::time::interval(TICK);
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
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let result = server
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
