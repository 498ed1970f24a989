//! The node agent: one `launch` per node. Node 0's also hosts the coordinator. The agent
//! joins the job, spawns one worker per device with the rank environment, relays their
//! progress with its heartbeats, and stops every worker when any fails or the coordinator
//! says stop.

mod link;
pub mod spawn;

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::auth::{Attach, Token};
use crate::config::LaunchSection;
use crate::coordinator::state::{Policy, WorkerExit};
use crate::coordinator::{self, Coordinator, Settings};
use crate::error::{Error, Result};
use crate::events::EventLog;
use crate::progress::StepDisplay;
use crate::rpc;
use crate::rpc::coordinator_client::CoordinatorClient;
use link::LinkMsg;
pub use spawn::WorkerCommand;

/// Everything an agent needs to run its part of a job.
pub struct LaunchPlan {
    pub launch: LaunchSection,
    pub run_dir: PathBuf,
    pub worker: WorkerCommand,
    /// Fields of the job's `start` event (node 0).
    pub start: Value,
    /// Steps to show progress for (node 0); `None` for user programs.
    pub max_steps: Option<u64>,
}

const BEAT: Duration = Duration::from_millis(500);
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Run this node's agent until its workers finish (Ok) or the job stops (Err).
pub fn run(plan: LaunchPlan) -> Result<()> {
    // One thread: workers are spawned from it, so PR_SET_PDEATHSIG ties them to this process.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Launch(format!("starting the agent runtime: {e}")))?;
    rt.block_on(agent(plan))
}

fn launch_err(what: &str) -> impl FnOnce(String) -> Error + '_ {
    move |e| Error::Launch(format!("{what}: {e}"))
}

async fn agent(plan: LaunchPlan) -> Result<()> {
    let l = &plan.launch;
    let node = l.node_rank;
    let rdzv_timeout = Duration::from_secs_f64(l.rdzv_timeout_s);
    let token = Token::resolve(l)?;
    // Node 0 hosts the coordinator.
    let (rdzv, server) = if node == 0 {
        let bind = l.rdzv.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let listener = tokio::net::TcpListener::bind(&bind)
            .await
            .map_err(|e| Error::Launch(format!("launch.rdzv: cannot listen on {bind}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| launch_err("rendezvous")(e.to_string()))?;
        let events = EventLog::open(&plan.run_dir.join("events.jsonl"))?;
        let settings = Settings {
            nnodes: l.nnodes,
            policy: Policy {
                heartbeat_timeout: Duration::from_secs_f64(l.heartbeat_timeout_s),
            },
            rdzv_timeout,
            start: plan.start.clone(),
            display: StepDisplay::new(plan.max_steps),
        };
        let coordinator = Coordinator::new(settings, events)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(coordinator::serve(
            coordinator,
            listener,
            token.clone(),
            async {
                let _ = stop_rx.await;
            },
        ));
        (addr.to_string(), Some((stop_tx, task)))
    } else {
        (l.rdzv.clone().unwrap_or_default(), None)
    };
    let result = node_agent(&plan, &rdzv, rdzv_timeout, &token).await;
    if let Some((stop, task)) = server {
        let _ = stop.send(());
        let _ = task.await;
    }
    result
}

/// A coordinator client whose every call carries the job's token.
type Client = CoordinatorClient<InterceptedService<Channel, Attach>>;

async fn connect(rdzv: &str, timeout: Duration, token: &Token) -> Result<Client> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let endpoint = Channel::from_shared(format!("http://{rdzv}"))
            .map_err(|e| Error::Launch(format!("launch.rdzv: `{rdzv}`: {e}")))?;
        match endpoint.connect().await {
            Ok(channel) => {
                return Ok(CoordinatorClient::with_interceptor(
                    channel,
                    Attach(token.clone()),
                ))
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(Error::Launch(format!(
                    "cannot reach the coordinator at {rdzv} (launch.rdzv): {e}"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The address this node's workers listen on: the configured host, else the local address
/// used to reach the coordinator.
fn data_host(l: &LaunchSection, rdzv: &str) -> String {
    if let Some(h) = &l.host {
        return h.clone();
    }
    let local = || -> Option<String> {
        let target: SocketAddr = rdzv.to_socket_addrs().ok()?.next()?;
        let sock = UdpSocket::bind(if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })
        .ok()?;
        sock.connect(target).ok()?;
        Some(sock.local_addr().ok()?.ip().to_string())
    };
    local().unwrap_or_else(|| "127.0.0.1".into())
}

fn status(what: &str) -> impl FnOnce(tonic::Status) -> Error + '_ {
    move |s| Error::Launch(format!("{what}: {}", s.message()))
}

struct Worker {
    rank: usize,
    pid: u32,
    running: bool,
}

async fn node_agent(
    plan: &LaunchPlan,
    rdzv: &str,
    rdzv_timeout: Duration,
    token: &Token,
) -> Result<()> {
    let l = &plan.launch;
    let node = l.node_rank;
    let mut client = connect(rdzv, rdzv_timeout, token).await?;
    let host = data_host(l, rdzv);
    let join = client
        .join(rpc::JoinRequest {
            node_rank: node as u32,
            nnodes: l.nnodes as u32,
            nproc: l.nproc_per_node as u32,
            host: host.clone(),
        })
        .await
        .map_err(status("rendezvous"))?
        .into_inner();
    let world = join.world_size as usize;
    let first = join.first_rank as usize;

    let link_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| launch_err("the worker link")(e.to_string()))?;
    let agent_addr = link_listener
        .local_addr()
        .map_err(|e| launch_err("the worker link")(e.to_string()))?;
    let (link_tx, mut link_rx) = unbounded_channel();
    let accept = tokio::spawn(link::accept(link_listener, link_tx));

    let (master_host, master_port) = rdzv.rsplit_once(':').unwrap_or((rdzv, "0"));
    let (exit_tx, mut exit_rx) = unbounded_channel();
    let mut workers = Vec::new();
    let mut reports: Vec<String> = Vec::new();
    for local_rank in 0..l.nproc_per_node {
        let env = parallel::runtime::env::WorkerEnv {
            rank: first + local_rank,
            local_rank,
            world_size: world,
            local_world_size: l.nproc_per_node,
            node_rank: node,
            nnodes: l.nnodes,
            generation: join.generation,
            agent_addr: agent_addr.to_string(),
            data_host: host.clone(),
            master_addr: master_host.to_string(),
            master_port: master_port.parse().unwrap_or(0),
            run_dir: Some(plan.run_dir.clone()),
            collective_timeout: Duration::from_secs_f64(l.collective_timeout_s),
            connect_timeout: rdzv_timeout,
        };
        let mut child = match spawn::spawn(&plan.worker, &env) {
            Ok(c) => c,
            Err(e) => {
                kill_all(&mut workers);
                return Err(Error::Launch(format!(
                    "starting {}: {e}",
                    plan.worker.program.display()
                )));
            }
        };
        let pid = child.id().unwrap_or(0);
        reports.push(
            json!({"type": "spawn", "rank": env.rank, "pid": pid, "local_rank": local_rank})
                .to_string(),
        );
        let tx = exit_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((local_rank, status));
        });
        workers.push(Worker {
            rank: env.rank,
            pid,
            running: true,
        });
    }

    let outcome = supervise(
        plan,
        &mut client,
        &mut workers,
        &mut reports,
        &mut link_rx,
        &mut exit_rx,
        join.nonce,
    )
    .await;
    kill_all(&mut workers);
    // Reap what is left so nothing outlives the agent, then send the last reports.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while workers.iter().any(|w| w.running) {
        match tokio::time::timeout_at(deadline, exit_rx.recv()).await {
            Ok(Some((local, _))) => workers[local].running = false,
            _ => break,
        }
    }
    accept.abort();
    drain_links(&mut link_rx, &mut reports, &mut BTreeMap::new());
    let _ = beat(&mut client, node, &mut reports).await;
    match outcome {
        Ok(()) => {
            let _ = tokio::time::timeout(
                RPC_TIMEOUT,
                client.node_done(rpc::NodeDoneRequest {
                    node_rank: node as u32,
                }),
            )
            .await;
            if node == 0 {
                wait_finished(&mut client, node).await
            } else {
                Ok(())
            }
        }
        Err(e) => Err(e),
    }
}

fn drain_links(
    link_rx: &mut UnboundedReceiver<LinkMsg>,
    reports: &mut Vec<String>,
    errors: &mut BTreeMap<usize, String>,
) {
    while let Ok(msg) = link_rx.try_recv() {
        match msg {
            LinkMsg::Report(line) => reports.push(line),
            LinkMsg::Error { rank, message } => {
                errors.insert(rank, message);
            }
            LinkMsg::Hello { .. } | LinkMsg::Closed { .. } => {}
        }
    }
}

/// After every worker exited cleanly: read what they sent until each link closed (rank 0's
/// last events, e.g. `done`, may still be in flight), at most `limit`.
async fn read_to_close(
    link_rx: &mut UnboundedReceiver<LinkMsg>,
    reports: &mut Vec<String>,
    mut open: std::collections::BTreeSet<usize>,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while !open.is_empty() {
        match tokio::time::timeout_at(deadline, link_rx.recv()).await {
            Ok(Some(LinkMsg::Report(line))) => reports.push(line),
            Ok(Some(LinkMsg::Closed { rank })) => {
                open.remove(&rank);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

/// Node 0 keeps the coordinator up until every node is done (or the job stops).
async fn wait_finished(client: &mut Client, node: usize) -> Result<()> {
    loop {
        let reply = beat(client, node, &mut Vec::new()).await?;
        if reply.stop {
            return Err(Error::JobStopped(reply.reason));
        }
        if reply.finished {
            return Ok(());
        }
        tokio::time::sleep(BEAT).await;
    }
}

async fn beat(
    client: &mut Client,
    node: usize,
    reports: &mut Vec<String>,
) -> Result<rpc::HeartbeatReply> {
    let request = rpc::HeartbeatRequest {
        node_rank: node as u32,
        reports: std::mem::take(reports),
    };
    match tokio::time::timeout(RPC_TIMEOUT, client.heartbeat(request)).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(s)) => Err(Error::Launch(format!(
            "heartbeat to the coordinator: {}",
            s.message()
        ))),
        Err(_) => Err(Error::Launch(format!(
            "the coordinator did not answer a heartbeat within {} s",
            RPC_TIMEOUT.as_secs()
        ))),
    }
}

fn code_and_signal(status: &std::io::Result<std::process::ExitStatus>) -> (i32, i32) {
    match status {
        Ok(s) => spawn::code_and_signal(s),
        Err(_) => (-1, 0),
    }
}

/// SIGKILL every worker's process group: the running workers and whatever any worker left
/// behind (a background process of a `launch run` script).
fn kill_all(workers: &mut [Worker]) {
    for w in workers.iter() {
        spawn::kill_now(w.pid);
    }
}

#[allow(clippy::too_many_arguments)]
async fn supervise(
    plan: &LaunchPlan,
    client: &mut Client,
    workers: &mut [Worker],
    reports: &mut Vec<String>,
    link_rx: &mut UnboundedReceiver<LinkMsg>,
    exit_rx: &mut UnboundedReceiver<(usize, std::io::Result<std::process::ExitStatus>)>,
    nonce: u64,
) -> Result<()> {
    let node = plan.launch.node_rank;
    let nproc = workers.len();
    let first = workers.first().map_or(0, |w| w.rank);
    let mut hellos: BTreeMap<usize, (String, tokio::net::tcp::OwnedWriteHalf)> = BTreeMap::new();
    let mut errors: BTreeMap<usize, String> = BTreeMap::new();
    let mut closed = std::collections::BTreeSet::new();
    let (peers_tx, mut peers_rx) =
        unbounded_channel::<std::result::Result<Vec<String>, tonic::Status>>();
    let mut peers_sent = false;
    let mut heartbeat = tokio::time::interval(BEAT);
    use tokio::signal::unix::{signal, SignalKind};
    let handler = |e: std::io::Error| launch_err("signal handler")(e.to_string());
    let mut terminate = signal(SignalKind::terminate()).map_err(handler)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(handler)?;
    let mut silent_since: Option<tokio::time::Instant> = None;
    let heartbeat_timeout = Duration::from_secs_f64(plan.launch.heartbeat_timeout_s);
    loop {
        tokio::select! {
            Some(msg) = link_rx.recv() => match msg {
                LinkMsg::Hello { rank, data_addr, writer } => {
                    hellos.insert(rank, (data_addr, writer));
                    if hellos.len() == nproc && !peers_sent {
                        peers_sent = true;
                        let addrs: Vec<String> = (first..first + nproc)
                            .map(|r| hellos.get(&r).map(|h| h.0.clone()).unwrap_or_default())
                            .collect();
                        let mut c = client.clone();
                        let tx = peers_tx.clone();
                        tokio::spawn(async move {
                            let reply = c.exchange_peers(rpc::PeersRequest { node_rank: node as u32, addrs }).await;
                            let _ = tx.send(reply.map(|r| r.into_inner().addrs));
                        });
                    }
                }
                LinkMsg::Report(line) => reports.push(line),
                LinkMsg::Error { rank, message } => { errors.insert(rank, message); }
                LinkMsg::Closed { rank } => { closed.insert(rank); }
            },
            Some(table) = peers_rx.recv() => {
                let table = table.map_err(status("peer exchange"))?;
                for (_, writer) in hellos.values_mut() {
                    link::send_peers(writer, &table, nonce)
                        .await
                        .map_err(|e| launch_err("sending the peer table")(e.to_string()))?;
                }
            },
            Some((local, status)) = exit_rx.recv() => {
                workers[local].running = false;
                let (code, signal) = code_and_signal(&status);
                if code == 0 {
                    if workers.iter().all(|w| !w.running) {
                        let open = hellos.keys().copied().filter(|r| !closed.contains(r)).collect();
                        read_to_close(link_rx, reports, open, Duration::from_secs(5)).await;
                        return Ok(());
                    }
                    continue;
                }
                // Its last words may still be in flight on the link, and its peers usually
                // fail right after it (their connection to it broke): wait a moment, then
                // blame the one a signal ended, if any, else the first.
                tokio::time::sleep(Duration::from_millis(200)).await;
                drain_links(link_rx, reports, &mut errors);
                let mut failed = vec![(local, code, signal)];
                while let Ok((other, status)) = exit_rx.try_recv() {
                    workers[other].running = false;
                    let (code, signal) = code_and_signal(&status);
                    if code != 0 {
                        failed.push((other, code, signal));
                    }
                }
                let (local, code, signal) = failed.iter().find(|f| f.2 != 0).copied().unwrap_or(failed[0]);
                let w = &workers[local];
                let message = errors.get(&w.rank).cloned().unwrap_or_default();
                let _ = beat(client, node, reports).await;
                let exit = rpc::WorkerExitRequest {
                    node_rank: node as u32,
                    rank: w.rank as u32,
                    pid: w.pid,
                    code,
                    signal,
                    message: message.clone(),
                };
                let _ = tokio::time::timeout(RPC_TIMEOUT, client.worker_exit(exit)).await;
                let text = WorkerExit {
                    node,
                    rank: w.rank,
                    pid: w.pid,
                    code: (signal == 0).then_some(code),
                    signal: (signal != 0).then_some(signal),
                    message,
                }
                .describe();
                return Err(Error::WorkerFailed { message: text, code: if code == 2 { 2 } else { 1 } });
            },
            _ = heartbeat.tick() => {
                match beat(client, node, reports).await {
                    Ok(reply) => {
                        silent_since = None;
                        if reply.stop {
                            return Err(Error::JobStopped(reply.reason));
                        }
                    }
                    Err(e) => {
                        let since = *silent_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() > heartbeat_timeout {
                            return Err(Error::JobStopped(format!("lost the coordinator: {e}")));
                        }
                    }
                }
            },
            _ = interrupt.recv() => return Err(Error::JobStopped("interrupted (SIGINT)".into())),
            _ = terminate.recv() => return Err(Error::JobStopped("terminated (SIGTERM)".into())),
        }
    }
}

/// One call to the coordinator at `rdzv` carrying `token` (a heartbeat from no node, which
/// changes nothing): Ok if the coordinator accepts the token. For health checks and tests.
pub fn probe(rdzv: &str, token: &str) -> Result<()> {
    let token = Token::parse(token, "--token")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Launch(format!("starting a runtime: {e}")))?;
    runtime.block_on(async {
        let mut client = connect(rdzv, Duration::from_secs(5), &token).await?;
        client
            .heartbeat(rpc::HeartbeatRequest {
                node_rank: u32::MAX,
                reports: Vec::new(),
            })
            .await
            .map_err(status("probe"))?;
        Ok(())
    })
}
