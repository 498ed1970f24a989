//! One generation of this node's workers: spawn them with their ranks, relay their reports
//! with the heartbeats, report failures, and kill and reap every one of them before the
//! agent joins the next generation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::link::{self, LinkMsg};
use super::{
    beat, is_rejoin, launch_err, spawn, status, stopped, Client, Ended, LaunchPlan, Me, Silence,
    Stop, RPC_TIMEOUT,
};
use crate::coordinator::service::exit_of;
use crate::error::{Error, Result};
use crate::rpc;

struct Worker {
    rank: usize,
    pid: u32,
    running: bool,
}

type Exits = UnboundedReceiver<(usize, std::io::Result<std::process::ExitStatus>)>;

/// What the workers' side of the agent has to work with during a generation.
struct Generation<'a> {
    plan: &'a LaunchPlan,
    me: &'a Me,
    join: &'a rpc::JoinReply,
    workers: Vec<Worker>,
    reports: Vec<String>,
    links: UnboundedReceiver<LinkMsg>,
    exits: Exits,
    /// Exit status of this node's last failed worker, if one failed.
    own_failure: Option<u8>,
}

/// Run this node's workers for the generation `join` describes, until they all finish
/// (Done), the coordinator starts another generation (Restart) or stops the job (Err).
/// Every worker is dead and reaped when this returns.
pub(super) async fn run_generation(
    plan: &LaunchPlan,
    client: &mut Client,
    join: &rpc::JoinReply,
    me: &Me,
    rdzv: &str,
    stop: &mut Stop,
) -> Result<Ended> {
    let l = &plan.launch;
    let link_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| launch_err("the worker link")(e.to_string()))?;
    let agent_addr = link_listener
        .local_addr()
        .map_err(|e| launch_err("the worker link")(e.to_string()))?;
    let (link_tx, links) = unbounded_channel();
    let accept = tokio::spawn(link::accept(link_listener, link_tx));

    let (master_host, master_port) = rdzv.rsplit_once(':').unwrap_or((rdzv, "0"));
    let (exit_tx, exits) = unbounded_channel();
    let mut g = Generation {
        plan,
        me,
        join,
        workers: Vec::new(),
        reports: Vec::new(),
        links,
        exits,
        own_failure: None,
    };
    let mut command = plan.worker.clone();
    command.args.extend(join.args.iter().cloned());
    for local_rank in 0..l.nproc_per_node {
        let env = parallel::runtime::env::WorkerEnv {
            rank: join.first_rank as usize + local_rank,
            local_rank,
            world_size: join.world_size as usize,
            local_world_size: l.nproc_per_node,
            node_rank: join.node_index as usize,
            nnodes: join.nnodes as usize,
            generation: join.generation,
            agent_addr: agent_addr.to_string(),
            data_host: me.host.clone(),
            master_addr: master_host.to_string(),
            master_port: master_port.parse().unwrap_or(0),
            run_dir: Some(plan.run_dir.clone()),
            collective_timeout: Duration::from_secs_f64(l.collective_timeout_s),
            connect_timeout: Duration::from_secs_f64(l.rdzv_timeout_s),
        };
        let mut child = match spawn::spawn(&command, &env) {
            Ok(c) => c,
            Err(e) => {
                kill_and_reap(&mut g, client).await;
                accept.abort();
                return Err(Error::Launch(format!(
                    "starting {}: {e}",
                    plan.worker.program.display()
                )));
            }
        };
        let pid = child.id().unwrap_or(0);
        g.reports.push(
            json!({"type": "spawn", "rank": env.rank, "pid": pid, "local_rank": local_rank})
                .to_string(),
        );
        let tx = exit_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((local_rank, status));
        });
        g.workers.push(Worker {
            rank: env.rank,
            pid,
            running: true,
        });
    }

    let outcome = supervise(&mut g, client, stop).await;
    kill_and_reap(&mut g, client).await;
    accept.abort();
    drain_links(&mut g.links, &mut g.reports, &mut BTreeMap::new());
    let _ = beat(client, me, join.generation, &mut g.reports).await;
    outcome
}

/// SIGKILL every worker's process group (a stopped process dies of it too) and wait, at
/// most 30 s, beating meanwhile, until each is reaped: no worker of this generation
/// outlives it.
async fn kill_and_reap(g: &mut Generation<'_>, client: &mut Client) {
    for w in g.workers.iter().filter(|w| w.pid != 0) {
        spawn::kill_now(w.pid);
    }
    let l = &g.plan.launch;
    let every = Duration::from_secs_f64(l.heartbeat_interval_s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while g.workers.iter().any(|w| w.running) && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(every, g.exits.recv()).await {
            Ok(Some((local, _))) => g.workers[local].running = false,
            Ok(None) => break,
            Err(_) => {
                let _ = beat(client, g.me, g.join.generation, &mut g.reports).await;
            }
        }
    }
}

fn drain_links(
    links: &mut UnboundedReceiver<LinkMsg>,
    reports: &mut Vec<String>,
    errors: &mut BTreeMap<usize, String>,
) {
    while let Ok(msg) = links.try_recv() {
        match msg {
            LinkMsg::Report { line, .. } => reports.push(line),
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
    links: &mut UnboundedReceiver<LinkMsg>,
    reports: &mut Vec<String>,
    mut open: BTreeSet<usize>,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while !open.is_empty() {
        match tokio::time::timeout_at(deadline, links.recv()).await {
            Ok(Some(LinkMsg::Report { line, .. })) => reports.push(line),
            Ok(Some(LinkMsg::Closed { rank })) => {
                open.remove(&rank);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

fn code_and_signal(status: &std::io::Result<std::process::ExitStatus>) -> (i32, i32) {
    match status {
        Ok(s) => spawn::code_and_signal(s),
        Err(_) => (-1, 0),
    }
}

/// What the coordinator's reply means for this node.
fn obey(reply: &rpc::HeartbeatReply, own_failure: Option<u8>) -> Option<Result<Ended>> {
    if reply.stop {
        return Some(Err(stopped(reply.reason.clone(), own_failure)));
    }
    reply.restart.then_some(Ok(Ended::Restart))
}

/// How long a worker's report waits before the agent relays it.
const RELAY_WITHIN: Duration = Duration::from_millis(100);

async fn supervise(g: &mut Generation<'_>, client: &mut Client, stop: &mut Stop) -> Result<Ended> {
    let l = &g.plan.launch;
    let node = l.node_rank;
    let generation = g.join.generation;
    let nproc = g.workers.len();
    let first = g.workers.first().map_or(0, |w| w.rank);
    let mut hellos: BTreeMap<usize, (String, tokio::net::tcp::OwnedWriteHalf)> = BTreeMap::new();
    let mut errors: BTreeMap<usize, String> = BTreeMap::new();
    let mut closed = BTreeSet::new();
    let (peers_tx, mut peers_rx) =
        unbounded_channel::<std::result::Result<Vec<String>, tonic::Status>>();
    let mut peers_sent = false;
    let period = Duration::from_secs_f64(l.heartbeat_interval_s);
    let mut heartbeat = tokio::time::interval(period);
    // A prompt report brings the next heartbeat forward (never back), so the run's log
    // trails the workers by at most RELAY_WITHIN rather than a heartbeat interval.
    let mut next_beat = tokio::time::Instant::now();
    let mut silent = Silence::new(l);
    loop {
        tokio::select! {
            Some(msg) = g.links.recv() => match msg {
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
                            let request = rpc::PeersRequest { node_rank: node as u32, addrs, generation };
                            let reply = c.exchange_peers(request).await;
                            let _ = tx.send(reply.map(|r| r.into_inner().addrs));
                        });
                    }
                }
                LinkMsg::Report { line, prompt } => {
                    g.reports.push(line);
                    let soon = tokio::time::Instant::now() + RELAY_WITHIN;
                    if prompt && soon < next_beat {
                        next_beat = soon;
                        heartbeat.reset_at(soon);
                    }
                }
                LinkMsg::Error { rank, message } => { errors.insert(rank, message); }
                LinkMsg::Closed { rank } => { closed.insert(rank); }
            },
            Some(table) = peers_rx.recv() => match table {
                Ok(table) => {
                    for (_, writer) in hellos.values_mut() {
                        link::send_peers(writer, &table, g.join.nonce)
                            .await
                            .map_err(|e| launch_err("sending the peer table")(e.to_string()))?;
                    }
                }
                // The job moved on while the peers were exchanged: the next heartbeat says so.
                Err(s) if is_rejoin(&s) => {}
                Err(s) => return Err(status("peer exchange")(s)),
            },
            Some((local, status)) = g.exits.recv() => {
                g.workers[local].running = false;
                let (code, signal) = code_and_signal(&status);
                if code == 0 {
                    // A node one of whose workers failed waits for the coordinator's word.
                    if g.workers.iter().all(|w| !w.running) && g.own_failure.is_none() {
                        let open = hellos.keys().copied().filter(|r| !closed.contains(r)).collect();
                        read_to_close(&mut g.links, &mut g.reports, open, Duration::from_secs(5)).await;
                        return Ok(Ended::Done);
                    }
                    continue;
                }
                // Its last words may still be in flight on the link.
                tokio::time::sleep(Duration::from_millis(100)).await;
                drain_links(&mut g.links, &mut g.reports, &mut errors);
                let w = &g.workers[local];
                let message = errors.get(&w.rank).cloned().unwrap_or_default();
                let _ = beat(client, g.me, generation, &mut g.reports).await;
                let exit = rpc::WorkerExitRequest {
                    node_rank: node as u32,
                    rank: w.rank as u32,
                    pid: w.pid,
                    code,
                    signal,
                    message,
                    generation,
                };
                g.own_failure = Some(if code == 2 { 2 } else { 1 });
                tracing::warn!("{}", exit_of(&exit).describe());
                if let Ok(Ok(reply)) = tokio::time::timeout(RPC_TIMEOUT, client.worker_exit(exit)).await {
                    if let Some(outcome) = obey(&reply.into_inner(), g.own_failure) {
                        return outcome;
                    }
                }
            },
            _ = heartbeat.tick() => {
                next_beat = tokio::time::Instant::now() + period;
                let reply = beat(client, g.me, generation, &mut g.reports).await;
                if let Some(outcome) = silent.check(reply)?.and_then(|r| obey(&r, g.own_failure)) {
                    return outcome;
                }
            },
            e = stop.recv() => return Err(e),
        }
    }
}
