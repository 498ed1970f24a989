//! One generation of this node's workers: spawn them with their ranks, relay their reports
//! with the heartbeats, report failures, and kill and reap every one of them before the
//! agent joins the next generation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use parallel::runtime::ToAgent;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use super::link::{self, LinkMsg};
use super::{
    beat, launch_err, spawn, status, stopped, Client, Ended, LaunchPlan, Me, Silence, Stop,
    RPC_TIMEOUT,
};
use crate::coordinator::service::exit_of;
use crate::coordinator::Generation as Work;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::rpc;

struct Worker {
    rank: usize,
    pid: u32,
    running: bool,
}

type Exits = UnboundedReceiver<(usize, std::io::Result<std::process::ExitStatus>)>;
type PeerTable = std::result::Result<rpc::PeersReply, tonic::Status>;

/// What the workers' side of the agent has to work with during a generation.
struct Generation<'a> {
    plan: &'a LaunchPlan,
    me: &'a Me,
    join: &'a rpc::JoinReply,
    workers: Vec<Worker>,
    reports: Vec<String>,
    links: UnboundedReceiver<LinkMsg>,
    exits: Exits,
    /// One of this node's workers failed.
    failed: bool,
    /// A tidal window: when what is left of the workers is killed (Unix seconds).
    kill_at: Option<f64>,
    /// Where a preemption's deadline is written for the workers (`TIDEMILL_CONTROL`).
    control: Option<std::path::PathBuf>,
    /// The workers are stopping for the window's end or a preemption.
    yielding: bool,
    /// A worker exited 75, or the deadline's kill came: the node yielded (unless every
    /// worker finished).
    yielded: bool,
    /// Moves the deadline of the task that kills the workers (whatever the agent is busy
    /// with then).
    kill_tx: Option<tokio::sync::watch::Sender<f64>>,
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
    let link_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| launch_err("the worker link")(e.to_string()))?;
    let agent_addr = link_listener
        .local_addr()
        .map_err(|e| launch_err("the worker link")(e.to_string()))?;
    let (link_tx, links) = unbounded_channel();
    let accept = tokio::spawn(link::accept(link_listener, link_tx));
    let (exit_tx, exits) = unbounded_channel();
    let mut g = Generation {
        plan,
        me,
        join,
        workers: Vec::new(),
        reports: Vec::new(),
        links,
        exits,
        failed: false,
        kill_at: plan.tidal.as_ref().map(|t| t.window.deadline),
        control: plan.tidal.as_ref().map(|_| {
            std::env::temp_dir().join(format!(
                "tidemill-control-{}-{}-{}",
                std::process::id(),
                me.instance,
                join.generation
            ))
        }),
        yielding: false,
        yielded: false,
        kill_tx: None,
    };
    if me.preempt_by.get() > 0.0 {
        preempt(&mut g, me.preempt_by.get());
    }
    // SIGINT, SIGTERM or SIGUSR1 before this agent listened (while the job was being
    // planned, or joined): a stop before any worker starts; a preemption from now.
    if plan.tidal.is_some() && crate::tidal::signals::interrupted() {
        return Err(Error::JobStopped("interrupted (SIGINT)".into()));
    }
    if let Some(tide) = plan
        .tidal
        .as_ref()
        .filter(|_| crate::tidal::signals::signalled())
    {
        if me.preempt_by.get() == 0.0 {
            preempt_now(&mut g, tide);
        }
    }
    let mut killer = None;
    let outcome = match spawn_all(&mut g, &agent_addr.to_string(), rdzv, exit_tx) {
        Ok(()) => {
            killer = deadline_killer(&mut g);
            supervise(&mut g, client, stop).await
        }
        Err(e) => Err(e),
    };
    if let Some(k) = killer {
        k.abort();
    }
    kill_and_reap(&mut g, client).await;
    accept.abort();
    drain_links(&mut g.links, &mut g.reports, &mut BTreeMap::new());
    if let Some(path) = &g.control {
        let _ = std::fs::remove_file(path);
    }
    if let (Ok(Ended::Yielded | Ended::Done), Some(tide)) = (&outcome, &plan.tidal) {
        released(&mut g, tide).await;
    }
    let _ = beat(client, me, join.generation, &mut g.reports).await;
    outcome
}

impl Generation<'_> {
    /// The workers' process ids (their process groups').
    fn pids(&self) -> Vec<u32> {
        self.workers
            .iter()
            .map(|w| w.pid)
            .filter(|p| *p != 0)
            .collect()
    }
}

/// A preemption with the window's grace, from now.
fn preempt_now(g: &mut Generation<'_>, tide: &super::AgentTide) {
    let by = crate::tidal::now() + tide.grace_s - crate::tidal::REAP_ALLOWANCE_S;
    preempt(g, by);
}

/// A tidal window's end (or the job's) for this node: its workers are reaped; check their process
/// groups are gone and (CUDA) that no process of ours holds GPU memory, report
/// `gpus_released`, then run `tidal.on_release`.
async fn released(g: &mut Generation<'_>, tide: &super::AgentTide) {
    let pids = g.pids();
    let checked = crate::tidal::handback::check_released(&pids, tide.window.handback).await;
    let at = crate::tidal::now();
    let event = Event::GpusReleased {
        at,
        margin_s: tide.window.handback - at,
        checked,
    };
    let rank = g.workers.first().map_or(0, |w| w.rank);
    if let Ok(line) = serde_json::to_string(&ToAgent::Event { rank, event }) {
        g.reports.push(line);
    }
    // The operator's hook runs beside the agent, which goes on beating (a node silent for
    // the hook's minute would count as lost); the agent waits for it before it exits.
    if let Some(cmd) = tide.on_release.clone() {
        let (timeout, node, run_dir) = (tide.hook_timeout_s, g.me.node, g.plan.run_dir.clone());
        let hook = tokio::spawn(async move {
            crate::tidal::handback::hook("tidal.on_release", &cmd, timeout, node, &run_dir).await;
        });
        g.me.hooks.borrow_mut().push(hook);
    }
}

/// In a tidal window: a task that SIGKILLs every worker's process group at the deadline
/// (moved earlier by a preemption), whatever the agent is waiting for then (a slow
/// coordinator's reply included).
fn deadline_killer(g: &mut Generation<'_>) -> Option<tokio::task::JoinHandle<()>> {
    let at = g.kill_at?;
    let (tx, mut rx) = tokio::sync::watch::channel(at);
    g.kill_tx = Some(tx);
    let pids = g.pids();
    Some(tokio::spawn(async move {
        loop {
            let at = *rx.borrow_and_update();
            let left = Duration::from_secs_f64((at - crate::tidal::now()).max(0.0));
            tokio::select! {
                _ = tokio::time::sleep(left) => break,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
        // By process group only: a worker reaped before the deadline leaves its pid free
        // for another process, never its group while a member lives.
        for pid in pids {
            spawn::kill_group(pid);
        }
    }))
}

/// Every worker is to be gone by `by` (Unix seconds): a preemption here or on another
/// node. The workers read it from the control file at their next step boundary; what is
/// left at `by` is killed.
fn preempt(g: &mut Generation<'_>, by: f64) {
    let by = g.kill_at.map_or(by, |k| k.min(by));
    g.kill_at = Some(by);
    g.yielding = true;
    if let Some(tx) = &g.kill_tx {
        let _ = tx.send(by);
    }
    let mine = g.me.preempt_by.get();
    if mine == 0.0 || by < mine {
        g.me.preempt_by.set(by);
    }
    if let Some(path) = &g.control {
        let tmp = path.with_extension("tmp");
        let written =
            std::fs::write(&tmp, format!("{by}\n")).and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!("writing the preemption to {}: {e}", path.display());
        }
    }
}

/// Sleep until Unix seconds `at` (forever for `None`).
async fn until(at: Option<f64>) {
    match at {
        Some(at) => {
            let left = (at - crate::tidal::now()).max(0.0);
            tokio::time::sleep(Duration::from_secs_f64(left)).await;
        }
        None => std::future::pending().await,
    }
}

/// `launch preempt RUN_DIR` on this node (node 0, whose run directory it is): the deadline
/// it asked for, once (the file is removed).
fn preempt_request(g: &Generation<'_>) -> Option<f64> {
    if g.me.node != 0 || g.plan.tidal.is_none() {
        return None;
    }
    let path = crate::tidal::handback::preempt_file(&g.plan.run_dir);
    let text = std::fs::read_to_string(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    // A request whose grace ran out before this window opened is not for this window.
    let opened = g.plan.tidal.as_ref().map_or(0.0, |t| t.window.window.start);
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|t| t.is_finite() && *t > opened)
}

/// The worker command of this generation: the plan's, plus for `launch train` the layout
/// the coordinator decided and whether to resume.
fn command(plan: &LaunchPlan, join: &rpc::JoinReply) -> Result<spawn::WorkerCommand> {
    let mut command = plan.worker.clone();
    if join.work.is_empty() {
        return Ok(command);
    }
    let bad = |e: serde_json::Error| launch_err("the coordinator's plan")(e.to_string());
    let work: Work = serde_json::from_str(&join.work).map_err(bad)?;
    command.args.extend([
        "--plan".to_string(),
        serde_json::to_string(&work.plan).map_err(bad)?,
    ]);
    if work.resume {
        command.args.push("--resume".into());
    }
    if let Some(window) = &work.window {
        command.args.extend([
            "--window".to_string(),
            serde_json::to_string(window).map_err(bad)?,
        ]);
    }
    Ok(command)
}

/// Start one worker per local rank, each reporting its exit on `exits`.
fn spawn_all(
    g: &mut Generation<'_>,
    agent_addr: &str,
    rdzv: &str,
    exits: UnboundedSender<(usize, std::io::Result<std::process::ExitStatus>)>,
) -> Result<()> {
    let (l, join) = (&g.plan.launch, g.join);
    let mut command = command(g.plan, join)?;
    if let Some(path) = &g.control {
        command.ignore_stop_signals = true;
        command.env.push((
            crate::tidal::worker::CONTROL_ENV.to_string(),
            path.display().to_string(),
        ));
    }
    let (master_host, master_port) = rdzv.rsplit_once(':').unwrap_or((rdzv, "0"));
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
            data_host: g.me.host.clone(),
            master_addr: master_host.to_string(),
            master_port: master_port.parse().unwrap_or(0),
            run_dir: Some(g.plan.run_dir.clone()),
            collective_timeout: l.collective_timeout(),
            connect_timeout: l.rdzv_timeout(),
        };
        let mut child = spawn::spawn(&command, &env).map_err(|e| {
            Error::Launch(format!("starting {}: {e}", g.plan.worker.program.display()))
        })?;
        let pid = child.id().unwrap_or(0);
        let spawned = ToAgent::Event {
            rank: env.rank,
            event: Event::Spawn { pid, local_rank },
        };
        if let Ok(line) = serde_json::to_string(&spawned) {
            g.reports.push(line);
        }
        let tx = exits.clone();
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
    Ok(())
}

/// SIGKILL every worker's process group (a stopped process dies of it too) and wait, at
/// most 30 s, beating meanwhile, until each is reaped: no worker of this generation
/// outlives it.
async fn kill_and_reap(g: &mut Generation<'_>, client: &mut Client) {
    for w in g.workers.iter().filter(|w| w.pid != 0) {
        spawn::kill_now(w.pid);
    }
    let every = g.plan.launch.heartbeat_interval();
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.workers.iter().any(|w| w.running) && Instant::now() < deadline {
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
    let deadline = Instant::now() + limit;
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
fn obey(reply: &rpc::HeartbeatReply) -> Option<Result<Ended>> {
    if reply.stop {
        return Some(Err(stopped(reply)));
    }
    reply.restart.then_some(Ok(Ended::Restart))
}

/// How long a worker's report waits before the agent relays it.
const RELAY_WITHIN: Duration = Duration::from_millis(100);

/// The agent's side of the worker links during a generation.
#[derive(Default)]
struct Links {
    hellos: BTreeMap<usize, (String, OwnedWriteHalf)>,
    errors: BTreeMap<usize, String>,
    closed: BTreeSet<usize>,
    peers_sent: bool,
}

async fn supervise(g: &mut Generation<'_>, client: &mut Client, stop: &mut Stop) -> Result<Ended> {
    let generation = g.join.generation;
    let mut links = Links::default();
    let (peers_tx, mut peers_rx) = unbounded_channel::<PeerTable>();
    let period = g.plan.launch.heartbeat_interval();
    let mut heartbeat = tokio::time::interval(period);
    // A prompt report brings the next heartbeat forward (never back), so the run's log
    // trails the workers by at most RELAY_WITHIN rather than a heartbeat interval.
    let mut next_beat = Instant::now();
    let mut silent = Silence::new(&g.plan.launch);
    // How often node 0 looks for `launch preempt`'s request.
    let mut requests = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            Some(msg) = g.links.recv() => {
                if let Some(soon) = on_link(g, client, &mut links, &peers_tx, msg) {
                    if soon < next_beat {
                        next_beat = soon;
                        heartbeat.reset_at(soon);
                    }
                }
            }
            Some(table) = peers_rx.recv() => match table {
                Ok(reply) if reply.rejoin => {}
                Ok(reply) => {
                    for (_, writer) in links.hellos.values_mut() {
                        link::send_peers(writer, &reply.addrs, g.join.nonce)
                            .await
                            .map_err(|e| launch_err("sending the peer table")(e.to_string()))?;
                    }
                }
                Err(s) => return Err(status("peer exchange")(s)),
            },
            Some((local, status)) = g.exits.recv() => {
                if let Some(outcome) = on_exit(g, client, &mut links, local, &status).await {
                    return outcome;
                }
            },
            _ = requests.tick() => {
                if let Some(by) = preempt_request(g) {
                    preempt(g, by - crate::tidal::REAP_ALLOWANCE_S);
                    next_beat = Instant::now();
                    heartbeat.reset_at(next_beat);
                }
            }
            _ = heartbeat.tick() => {
                next_beat = Instant::now() + period;
                let reply = beat(client, g.me, generation, &mut g.reports).await;
                let reply = silent.check(reply)?;
                if let Some(r) = reply.as_ref().filter(|r| r.yield_by > 0.0 && g.kill_at.is_some()) {
                    preempt(g, r.yield_by);
                }
                if let Some(outcome) = reply.and_then(|r| obey(&r)) {
                    return outcome;
                }
            },
            _ = until(g.kill_at) => {
                tracing::info!("the tidal window's deadline: stopping what is left of the workers");
                g.yielded = true;
                return Ok(Ended::Yielded);
            }
            sig = stop.next() => match (sig, &g.plan.tidal) {
                (super::Sig::Terminate | super::Sig::User1, Some(tide)) => {
                    tracing::warn!("{sig:?}: preempted, every worker gone within {} s", tide.grace_s);
                    preempt_now(g, tide);
                    // Tell the coordinator now rather than at the next beat.
                    next_beat = Instant::now();
                    heartbeat.reset_at(next_beat);
                }
                _ => return Err(stop.error(sig)),
            },
        }
    }
}

/// A message on a worker link; when it should be relayed soon, by when. The last hello
/// starts the peer exchange (the coordinator answers on `peers`).
fn on_link(
    g: &mut Generation<'_>,
    client: &Client,
    links: &mut Links,
    peers: &UnboundedSender<PeerTable>,
    msg: LinkMsg,
) -> Option<Instant> {
    match msg {
        LinkMsg::Hello {
            rank,
            data_addr,
            writer,
        } => {
            links.hellos.insert(rank, (data_addr, writer));
            let nproc = g.workers.len();
            if links.hellos.len() == nproc && !links.peers_sent {
                links.peers_sent = true;
                let first = g.workers.first().map_or(0, |w| w.rank);
                let addrs: Vec<String> = (first..first + nproc)
                    .map(|r| {
                        links
                            .hellos
                            .get(&r)
                            .map(|h| h.0.clone())
                            .unwrap_or_default()
                    })
                    .collect();
                let request = rpc::PeersRequest {
                    node_rank: g.me.node as u32,
                    addrs,
                    generation: g.join.generation,
                };
                let (mut c, tx) = (client.clone(), peers.clone());
                tokio::spawn(async move {
                    let reply = c.exchange_peers(request).await;
                    let _ = tx.send(reply.map(tonic::Response::into_inner));
                });
            }
            None
        }
        LinkMsg::Report { line, prompt } => {
            g.reports.push(line);
            prompt.then(|| Instant::now() + RELAY_WITHIN)
        }
        LinkMsg::Error { rank, message } => {
            links.errors.insert(rank, message);
            None
        }
        LinkMsg::Closed { rank } => {
            links.closed.insert(rank);
            None
        }
    }
}

/// A worker ended: when all did cleanly this node is done; a failure is reported to the
/// coordinator, whose answer may end the generation.
async fn on_exit(
    g: &mut Generation<'_>,
    client: &mut Client,
    links: &mut Links,
    local: usize,
    status: &std::io::Result<std::process::ExitStatus>,
) -> Option<Result<Ended>> {
    g.workers[local].running = false;
    let (code, signal) = code_and_signal(status);
    // In a tidal window a worker exits 75 at the agreed step; once the window is ending,
    // a worker that fails (its peer on another node was stopped at the deadline) is part
    // of the stop, not a crash.
    let ending = g
        .kill_at
        .is_some_and(|k| g.yielding || crate::tidal::now() >= k - 1.0);
    if code == i32::from(crate::tidal::YIELDED) && g.kill_at.is_some() || code != 0 && ending {
        if code != i32::from(crate::tidal::YIELDED) {
            // Part of the stop (its peer went first), but say what it said (what has come:
            // the hand-back does not wait for the rest).
            drain_links(&mut g.links, &mut g.reports, &mut links.errors);
            let w = &g.workers[local];
            let said = links.errors.get(&w.rank).cloned().unwrap_or_default();
            tracing::warn!(
                "rank {} exited with {code} (signal {signal}) while the window ended: {said}",
                w.rank
            );
        }
        g.yielding = true;
        g.yielded = true;
    }
    if code == 0 || g.yielding {
        // A node one of whose workers failed waits for the coordinator's word.
        if g.workers.iter().all(|w| !w.running) && !g.failed {
            let open = links
                .hellos
                .keys()
                .copied()
                .filter(|r| !links.closed.contains(r))
                .collect();
            read_to_close(&mut g.links, &mut g.reports, open, Duration::from_secs(5)).await;
            // Every worker finished (past the last step before the stop came): done.
            return Some(Ok(if g.yielded {
                Ended::Yielded
            } else {
                Ended::Done
            }));
        }
        return None;
    }
    // Its last words may still be in flight on the link.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drain_links(&mut g.links, &mut g.reports, &mut links.errors);
    let w = &g.workers[local];
    let exit = rpc::WorkerExitRequest {
        node_rank: g.me.node as u32,
        rank: w.rank as u32,
        pid: w.pid,
        code,
        signal,
        message: links.errors.get(&w.rank).cloned().unwrap_or_default(),
        generation: g.join.generation,
    };
    let _ = beat(client, g.me, g.join.generation, &mut g.reports).await;
    g.failed = true;
    tracing::warn!("{}", exit_of(&exit).describe());
    match tokio::time::timeout(RPC_TIMEOUT, client.worker_exit(exit)).await {
        Ok(Ok(reply)) => obey(&reply.into_inner()),
        Ok(Err(_)) | Err(_) => None,
    }
}
