//! The node agent: one `launch` per node. Node 0's also hosts the coordinator. The agent
//! joins the job, spawns one worker per device with the rank environment, relays their
//! progress with its heartbeats, and stops every worker when any fails or the coordinator
//! says stop.

mod link;
pub mod spawn;
mod workers;

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::auth::{Attach, Token};
use crate::config::LaunchOptions;
use crate::coordinator::{self, Coordinator, Generation, Settings};
use crate::error::{Error, Result};
use crate::events::{EventLog, Start};
use crate::progress::StepDisplay;
use crate::rpc;
use crate::rpc::coordinator_client::CoordinatorClient;
use crate::tls::Tls;
pub use spawn::WorkerCommand;

/// Everything an agent needs to run its part of a job.
pub struct LaunchPlan {
    pub launch: LaunchOptions,
    pub run_dir: PathBuf,
    pub worker: WorkerCommand,
    /// The job's `start` event (node 0).
    pub start: Start,
    /// Steps to show progress for (node 0); `None` for user programs.
    pub max_steps: Option<u64>,
    /// What the first generation's workers run with (node 0's coordinator; `None` for user
    /// programs).
    pub first: Option<Generation>,
    /// How a restarted generation's layout is decided (see [`Settings::replan`]).
    pub replan: Option<coordinator::Replan>,
    /// A tidal window: when this node's workers must be gone, what a preemption grants.
    pub tidal: Option<AgentTide>,
}

/// What an agent of a tidal job needs to know of its window.
#[derive(Clone, Debug)]
pub struct AgentTide {
    pub window: coordinator::TidalWindow,
    /// Seconds a preemption (SIGTERM, SIGUSR1, `launch preempt`) grants.
    pub grace_s: f64,
    /// `tidal.on_release`, run after this node's GPUs are free, within `hook_timeout_s`.
    pub on_release: Option<String>,
    pub hook_timeout_s: f64,
}

/// How this node's part of the job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every step done.
    Finished,
    /// A tidal window ended (or a preemption came) first: run again to go on.
    Yielded {
        /// By a preemption rather than the window's end.
        preempted: bool,
    },
}

const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Run this node's agent until its workers finish or yield (Ok) or the job stops (Err).
pub fn run(mut plan: LaunchPlan) -> Result<Outcome> {
    let nccl = spawn::NcclLink::make();
    plan.worker.env.extend(nccl.env());
    // One thread: workers are spawned from it, so PR_SET_PDEATHSIG ties them to this process.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Launch(format!("starting the agent runtime: {e}")))?;
    let outcome = rt.block_on(agent(plan));
    drop(nccl);
    outcome
}

fn launch_err(what: &str) -> impl FnOnce(String) -> Error + '_ {
    move |e| Error::Launch(format!("{what}: {e}"))
}

async fn agent(plan: LaunchPlan) -> Result<Outcome> {
    let l = &plan.launch;
    let node = l.node_rank;
    let rdzv_timeout = l.rdzv_timeout();
    let token = Token::resolve(l)?;
    let tls = Tls::load(l)?;
    let mut stop = Stop::new(plan.tidal.is_some())?;
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
            policy: l.clone(),
            start: plan.start.clone(),
            display: StepDisplay::new(plan.max_steps),
            first: plan.first.clone(),
            replan: plan.replan.clone(),
            tidal: plan.tidal.as_ref().map(|t| t.window),
        };
        let coordinator = Coordinator::new(settings, events)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(coordinator::serve(
            coordinator,
            listener,
            token.clone(),
            tls.server.clone(),
            async {
                let _ = stop_rx.await;
            },
        ));
        (addr.to_string(), Some((stop_tx, task)))
    } else {
        (l.rdzv.clone().unwrap_or_default(), None)
    };
    let result = node_agent(&plan, &rdzv, rdzv_timeout, &token, &tls, &mut stop).await;
    if let Some((stop, mut task)) = server {
        // Graceful shutdown waits for open connections; a stopped (or wedged) agent's
        // never closes, so give the others a moment and then stop serving.
        let _ = stop.send(());
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    result
}

/// SIGINT and SIGTERM (and, for a tidal job, SIGUSR1), listened for from the agent's start
/// to its end: once tokio installs its handler the default action is gone for the process,
/// so every wait for the coordinator or the other nodes listens (killing and reaping
/// workers, bounded, does not).
pub(super) struct Stop {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    /// A tidal job's: SIGTERM and SIGUSR1 preempt it (the window ends now, with its grace).
    user1: Option<tokio::signal::unix::Signal>,
}

/// A signal the agent got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sig {
    Interrupt,
    Terminate,
    User1,
}

impl Stop {
    fn new(tidal: bool) -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let handler = |e: std::io::Error| launch_err("signal handler")(e.to_string());
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).map_err(handler)?,
            terminate: signal(SignalKind::terminate()).map_err(handler)?,
            user1: match tidal {
                true => Some(signal(SignalKind::user_defined1()).map_err(handler)?),
                false => None,
            },
        })
    }

    /// Whether SIGTERM and SIGUSR1 preempt (a tidal job) rather than stop.
    pub(super) fn preempts(&self) -> bool {
        self.user1.is_some()
    }

    /// The next signal.
    pub(super) async fn next(&mut self) -> Sig {
        let user1 = async {
            match &mut self.user1 {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = self.interrupt.recv() => Sig::Interrupt,
            _ = self.terminate.recv() => Sig::Terminate,
            _ = user1 => Sig::User1,
        }
    }

    /// The error a signal stops the agent with where no worker runs: a tidal job's
    /// preemption yields (exit status 75).
    pub(super) fn error(&self, sig: Sig) -> Error {
        match (sig, self.preempts()) {
            (Sig::Interrupt, _) => Error::JobStopped("interrupted (SIGINT)".into()),
            (Sig::Terminate, false) => Error::JobStopped("terminated (SIGTERM)".into()),
            (Sig::Terminate | Sig::User1, true) => {
                Error::Yielded(format!("preempted ({sig:?}) while no worker ran"))
            }
            (Sig::User1, false) => Error::JobStopped("SIGUSR1".into()),
        }
    }

    /// The error the agent stops with once a signal arrives.
    pub(super) async fn recv(&mut self) -> Error {
        let sig = self.next().await;
        self.error(sig)
    }

    /// Sleep for `d`, or the stop error if a signal comes first.
    async fn sleep(&mut self, d: Duration) -> Result<()> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            e = self.recv() => Err(e),
        }
    }
}

/// A coordinator client whose every call carries the job's token.
type Client = CoordinatorClient<InterceptedService<Channel, Attach>>;

async fn connect(rdzv: &str, timeout: Duration, token: &Token, tls: &Tls) -> Result<Client> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut endpoint = Channel::from_shared(format!("{}://{rdzv}", tls.scheme()))
            .map_err(|e| Error::Launch(format!("launch.rdzv: `{rdzv}`: {e}")))?;
        if let Some(config) = &tls.client {
            endpoint = endpoint
                .tls_config(config.clone())
                .map_err(|e| Error::Launch(format!("launch.tls_ca: {e}")))?;
        }
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
fn data_host(l: &LaunchOptions, rdzv: &str) -> String {
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

/// How this node's part of a generation ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Every worker exited 0.
    Done,
    /// Every worker exited 75 (or was stopped) for a tidal window's end or a preemption.
    Yielded,
    /// The coordinator started a new generation: join it.
    Restart,
}

/// A stop as the agent's error: a job stopped on bad input (a worker's exit status 2, on
/// any node) exits 2 with the worker's words alone.
fn stopped(reply: &rpc::HeartbeatReply) -> Error {
    if reply.input {
        Error::WorkerFailed {
            message: reply.reason.clone(),
            code: 2,
        }
    } else {
        Error::JobStopped(reply.reason.clone())
    }
}

async fn node_agent(
    plan: &LaunchPlan,
    rdzv: &str,
    rdzv_timeout: Duration,
    token: &Token,
    tls: &Tls,
    stop: &mut Stop,
) -> Result<Outcome> {
    let l = &plan.launch;
    let node = l.node_rank;
    let mut client = tokio::select! {
        client = connect(rdzv, rdzv_timeout, token, tls) => client?,
        e = stop.recv() => return Err(e),
    };
    let host = data_host(l, rdzv);
    let me = Me {
        node,
        host,
        instance: rand::random(),
        preempt_by: std::cell::Cell::new(0.0),
        hooks: Default::default(),
    };
    let outcome = generations(plan, &mut client, &me, rdzv, stop).await;
    // The operator's hooks finish before this agent exits, whatever the outcome.
    let hooks = std::mem::take(&mut *me.hooks.borrow_mut());
    for hook in hooks {
        let _ = hook.await;
    }
    outcome
}

/// Join and run generations until the job ends for this node.
async fn generations(
    plan: &LaunchPlan,
    client: &mut Client,
    me: &Me,
    rdzv: &str,
    stop: &mut Stop,
) -> Result<Outcome> {
    let l = &plan.launch;
    let node = l.node_rank;
    let beat_every = l.heartbeat_interval();
    // The generation this node last ran: heartbeats carry it.
    let mut generation = 0;
    loop {
        let Some(join) = join(client, plan, me, generation, beat_every, stop).await? else {
            // A spare the job never needed, or an agent restarted after the job finished.
            return Ok(Outcome::Finished);
        };
        generation = join.generation;
        let ended = workers::run_generation(plan, client, &join, me, rdzv, stop).await?;
        if let Ended::Done | Ended::Yielded = ended {
            let yielded = ended == Ended::Yielded;
            // The coordinator must hear it: without it the job never finishes.
            let mut silent = Silence::new(l);
            loop {
                let request = rpc::NodeDoneRequest {
                    node_rank: node as u32,
                    generation,
                    yielded,
                };
                let sent = match tokio::time::timeout(RPC_TIMEOUT, client.node_done(request)).await
                {
                    Ok(Ok(_)) => Ok(rpc::HeartbeatReply::default()),
                    Ok(Err(s)) => Err(status("reporting this node done")(s)),
                    Err(_) => Err(Error::Launch("reporting this node done: no answer".into())),
                };
                if silent.check(sent)?.is_some() {
                    break;
                }
                stop.sleep(beat_every).await?;
            }
            match wait_finished(client, plan, me, (generation, ended), beat_every, stop).await? {
                Ended::Restart => {}
                Ended::Done => return Ok(Outcome::Finished),
                Ended::Yielded => {
                    return Ok(Outcome::Yielded {
                        preempted: me.preempt_by.get() > 0.0,
                    })
                }
            }
        }
    }
}

/// This agent: its node rank, the host its workers listen on, and its process's random id
/// (on every join and heartbeat, so the coordinator can tell a restarted agent).
pub(super) struct Me {
    pub(super) node: usize,
    pub(super) host: String,
    pub(super) instance: u64,
    /// A tidal job's preemption: Unix seconds by which every worker must be gone (0:
    /// none); every heartbeat carries it to the coordinator, which tells the other nodes.
    pub(super) preempt_by: std::cell::Cell<f64>,
    /// `tidal.on_release` hooks running beside the agent: waited for before it returns.
    pub(super) hooks: std::cell::RefCell<Vec<tokio::task::JoinHandle<()>>>,
}

/// Join the coordinator's current generation, beating while the others join (a node that
/// dies meanwhile is noticed); `None` for a spare released at the end of the job (or an
/// agent that came back after it).
async fn join(
    client: &mut Client,
    plan: &LaunchPlan,
    me: &Me,
    generation: u64,
    beat_every: Duration,
    stop: &mut Stop,
) -> Result<Option<rpc::JoinReply>> {
    let l = &plan.launch;
    loop {
        let request = rpc::JoinRequest {
            node_rank: l.node_rank as u32,
            nnodes: l.nnodes as u32,
            nproc: l.nproc_per_node as u32,
            host: me.host.clone(),
            spare: l.spare,
            instance: me.instance,
        };
        let mut joining = client.clone();
        let call = joining.join(request);
        tokio::pin!(call);
        // The first beat one interval on: the coordinator must hear a restarted agent's
        // join before its beats (a beat first would vouch for the node's old workers).
        let mut beats =
            tokio::time::interval_at(tokio::time::Instant::now() + beat_every, beat_every);
        let mut silent = Silence::new(l);
        let answer = loop {
            tokio::select! {
                answer = &mut call => break answer,
                e = stop.recv() => return Err(e),
                _ = beats.tick() => {
                    let reply = beat(client, me, generation, &mut Vec::new()).await;
                    if let Some(reply) = silent.check(reply)? {
                        if reply.stop {
                            return Err(stopped(&reply));
                        }
                    }
                }
            }
        };
        match answer {
            Ok(reply) if reply.get_ref().rejoin => {}
            Ok(reply) => {
                let reply = reply.into_inner();
                return Ok((!reply.finished).then_some(reply));
            }
            Err(s) => return Err(status("rendezvous")(s)),
        }
    }
}

/// Heartbeats that fail for longer than `launch.heartbeat_timeout_s`: the coordinator is lost.
pub(super) struct Silence {
    since: Option<tokio::time::Instant>,
    limit: Duration,
}

impl Silence {
    pub(super) fn new(l: &LaunchOptions) -> Self {
        Self {
            since: None,
            limit: l.heartbeat_timeout(),
        }
    }

    /// The reply, `None` for a failed beat still within the limit, or the error past it.
    pub(super) fn check(
        &mut self,
        beat: Result<rpc::HeartbeatReply>,
    ) -> Result<Option<rpc::HeartbeatReply>> {
        match beat {
            Ok(reply) => {
                self.since = None;
                Ok(Some(reply))
            }
            Err(e) => {
                let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > self.limit {
                    return Err(Error::JobStopped(format!("lost the coordinator: {e}")));
                }
                Ok(None)
            }
        }
    }
}

/// After this node's workers finished: beat until every node is done (Ok(Done), or
/// Ok(Yielded) when a tidal window ended first), or a restart makes this node run again
/// (Ok(Restart)). Node 0 keeps the coordinator up until
/// then; for the others a coordinator gone for good after they finished means the job
/// ended (node 0 stops serving once every node is done).
async fn wait_finished(
    client: &mut Client,
    plan: &LaunchPlan,
    me: &Me,
    (generation, mine): (u64, Ended),
    beat_every: Duration,
    stop: &mut Stop,
) -> Result<Ended> {
    let node = me.node;
    let mut silent = Silence::new(&plan.launch);
    loop {
        let reply = match silent.check(beat(client, me, generation, &mut Vec::new()).await) {
            Ok(Some(reply)) => reply,
            Ok(None) => {
                stop.sleep(beat_every).await?;
                continue;
            }
            Err(_) if node != 0 => return Ok(mine),
            Err(e) => return Err(e),
        };
        if reply.stop {
            return Err(stopped(&reply));
        }
        if reply.finished && reply.yielded {
            return Ok(Ended::Yielded);
        }
        if reply.finished {
            return Ok(Ended::Done);
        }
        if reply.restart {
            return Ok(Ended::Restart);
        }
        stop.sleep(beat_every).await?;
    }
}

async fn beat(
    client: &mut Client,
    me: &Me,
    generation: u64,
    reports: &mut Vec<String>,
) -> Result<rpc::HeartbeatReply> {
    let request = rpc::HeartbeatRequest {
        node_rank: me.node as u32,
        reports: std::mem::take(reports),
        generation,
        instance: me.instance,
        preempt_by: me.preempt_by.get(),
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

/// One call to the coordinator at `rdzv` carrying `token` (a heartbeat from no node, which
/// changes nothing), over TLS if `tls` says so: Ok if the coordinator accepts the call. For
/// health checks and tests.
pub fn probe(rdzv: &str, token: &str, tls: &Tls) -> Result<()> {
    let token = Token::parse(token, "--token")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Launch(format!("starting a runtime: {e}")))?;
    runtime.block_on(async {
        let mut client = connect(rdzv, Duration::from_secs(5), &token, tls).await?;
        client
            .heartbeat(rpc::HeartbeatRequest {
                node_rank: u32::MAX,
                reports: Vec::new(),
                generation: 0,
                instance: 0,
                preempt_by: 0.0,
            })
            .await
            .map_err(status("probe"))?;
        Ok(())
    })
}
