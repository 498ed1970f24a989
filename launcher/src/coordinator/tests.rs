//! The coordinator driven through its gRPC methods, without a network: faults seen
//! together are one restart; a restarted agent rejoining the running generation is one;
//! its beats before it joined vouch for nothing; after the end it is told the job finished.

use std::time::Duration;

use tonic::Request;

use super::{Coordinator, Settings};
use crate::config::LaunchOptions;
use crate::events::{Event, EventLog, FaultKind, Record, Start};
use crate::progress::StepDisplay;
use crate::rpc;
use crate::rpc::coordinator_server::Coordinator as _;

const TIMEOUT: Duration = Duration::from_secs(1);

fn coordinator(nnodes: usize, dir: &std::path::Path) -> Coordinator {
    coordinator_in(nnodes, dir, None)
}

fn coordinator_in(
    nnodes: usize,
    dir: &std::path::Path,
    tidal: Option<super::TidalWindow>,
) -> Coordinator {
    // The job file's defaults, as production runs them, with a short heartbeat timeout.
    let policy = LaunchOptions {
        heartbeat_interval_s: TIMEOUT.as_secs_f64() / 4.0,
        heartbeat_timeout_s: TIMEOUT.as_secs_f64(),
        rdzv_timeout_s: 10.0,
        ..LaunchOptions::default()
    };
    let start = Start {
        job: None,
        model: None,
        mode: None,
        program: Some("test".into()),
        args: Vec::new(),
        world_size: 2 * nnodes,
        nnodes,
        nproc_per_node: 2,
        plan: None,
    };
    let settings = Settings {
        nnodes,
        policy,
        start,
        display: StepDisplay::new(None),
        first: None,
        replan: None,
        tidal,
    };
    let events = EventLog::open(&dir.join("events.jsonl")).expect("event log");
    Coordinator::new(settings, events).expect("coordinator")
}

fn join_request(node: u32, nnodes: u32, instance: u64) -> Request<rpc::JoinRequest> {
    Request::new(rpc::JoinRequest {
        node_rank: node,
        nnodes,
        nproc: 2,
        host: "127.0.0.1".into(),
        spare: false,
        instance,
    })
}

/// Join every node of `c` at once; the generation each was given.
async fn join_all(c: &Coordinator, nnodes: u32) -> Vec<u64> {
    let joins = (0..nnodes).map(|n| {
        let c = c.clone();
        tokio::spawn(async move { c.join(join_request(n, nnodes, 100 + n as u64)).await })
    });
    let mut replies = Vec::new();
    for j in joins.collect::<Vec<_>>() {
        replies.push(j.await.expect("join task"));
    }
    replies
        .into_iter()
        .map(|r| r.expect("joined").into_inner().generation)
        .collect()
}

/// A heartbeat from the agent process of `node` that joined in [`join_all`].
async fn beat(c: &Coordinator, node: u32, generation: u64) -> rpc::HeartbeatReply {
    beat_as(c, node, generation, 100 + node as u64).await
}

async fn beat_as(
    c: &Coordinator,
    node: u32,
    generation: u64,
    instance: u64,
) -> rpc::HeartbeatReply {
    let request = rpc::HeartbeatRequest {
        node_rank: node,
        reports: Vec::new(),
        generation,
        instance,
        preempt_by: 0.0,
    };
    c.heartbeat(Request::new(request))
        .await
        .expect("heartbeat")
        .into_inner()
}

/// The records of `dir`'s event log that `pick` selects.
fn events(dir: &std::path::Path, pick: impl Fn(&Event) -> bool) -> Vec<Record> {
    crate::events::read(&dir.join("events.jsonl"))
        .expect("events")
        .into_iter()
        .filter(|r| pick(&r.event))
        .collect()
}

fn fault(e: &Event) -> bool {
    matches!(e, Event::Fault { .. })
}

fn restart(e: &Event) -> bool {
    matches!(e, Event::Restart { .. })
}

#[tokio::test(flavor = "current_thread")]
async fn two_nodes_lost_together_cost_one_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = coordinator(3, dir.path());
    assert_eq!(join_all(&c, 3).await, [0, 0, 0]);
    // Nodes 1 and 2 fall silent together; node 0 beats on.
    let until = tokio::time::Instant::now() + 3 * TIMEOUT;
    let mut restarted = false;
    while tokio::time::Instant::now() < until && !restarted {
        restarted = beat(&c, 0, 0).await.restart;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(restarted, "node 0 was told to restart");
    let faults = events(dir.path(), fault);
    let nodes: Vec<Option<usize>> = faults.iter().map(|f| f.node).collect();
    assert_eq!(nodes, [Some(1), Some(2)], "{faults:?}");
    let restarts = events(dir.path(), restart);
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    match &restarts[0].event {
        Event::Restart { world, nodes, .. } => {
            assert_eq!((*world, nodes.as_slice()), (2, &[0][..]))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.lock().state.restarts, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn an_agent_joining_again_as_a_new_process_restarts_the_generation_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = coordinator(2, dir.path());
    join_all(&c, 2).await;
    // Node 1's agent is back as another process: the generation restarts and it is in.
    let node1 = {
        let c = c.clone();
        tokio::spawn(async move { c.join(join_request(1, 2, 999)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(beat(&c, 0, 0).await.restart, "node 0 is told to restart");
    let again = c
        .join(join_request(0, 2, 100))
        .await
        .expect("node 0 rejoins");
    let back = node1
        .await
        .expect("task")
        .expect("node 1 joins")
        .into_inner();
    assert_eq!((again.into_inner().generation, back.generation), (1, 1));
    let faults = events(dir.path(), fault);
    assert_eq!(faults.len(), 1, "{faults:?}");
    assert!(
        matches!(
            faults[0].event,
            Event::Fault {
                kind: FaultKind::AgentRestart,
                ..
            }
        ) && faults[0].node == Some(1),
        "{faults:?}"
    );
    assert_eq!(events(dir.path(), restart).len(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn beats_from_an_agent_process_that_has_not_joined_vouch_for_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = coordinator(2, dir.path());
    join_all(&c, 2).await;
    // Node 1's agent died; a new process beats before its join gets through.
    let until = tokio::time::Instant::now() + 3 * TIMEOUT;
    let lost = |dir: &std::path::Path| {
        events(dir, |e| {
            matches!(
                e,
                Event::Fault {
                    kind: FaultKind::LostHeartbeat,
                    ..
                }
            )
        })
        .iter()
        .any(|f| f.node == Some(1))
    };
    while tokio::time::Instant::now() < until && !lost(dir.path()) {
        beat(&c, 0, 0).await;
        beat_as(&c, 1, 0, 999).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        lost(dir.path()),
        "node 1 is lost: {:?}",
        events(dir.path(), fault)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_agent_restarted_after_the_job_finished_is_told_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = coordinator(2, dir.path());
    join_all(&c, 2).await;
    for node in 0..2 {
        let done = rpc::NodeDoneRequest {
            node_rank: node,
            generation: 0,
            yielded: false,
        };
        c.node_done(Request::new(done)).await.expect("done");
    }
    let reply = c
        .join(join_request(1, 2, 999))
        .await
        .expect("join")
        .into_inner();
    assert!(reply.finished, "{reply:?}");
    assert!(events(dir.path(), fault).is_empty());
    assert!(events(dir.path(), restart).is_empty());
}

/// A tidal window of an hour from `now`, handed back 100 s before its end.
fn hour_window(now: f64) -> super::TidalWindow {
    super::TidalWindow {
        window: crate::tidal::Window {
            start: now,
            end: now + 3600.0,
        },
        handback: now + 3500.0,
        deadline: now + 3499.5,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_preemption_on_one_node_reaches_the_others_and_its_stop_is_no_fault() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = crate::tidal::now();
    let c = coordinator_in(2, dir.path(), Some(hour_window(now)));
    join_all(&c, 2).await;
    assert_eq!(beat(&c, 0, 0).await.yield_by, 0.0, "no preemption yet");
    // Node 1's agent got SIGTERM with a 30 s grace.
    let by = now + 30.0;
    let request = rpc::HeartbeatRequest {
        node_rank: 1,
        reports: Vec::new(),
        generation: 0,
        instance: 100 + 1,
        preempt_by: by,
    };
    c.heartbeat(Request::new(request)).await.expect("beat");
    assert_eq!(beat(&c, 0, 0).await.yield_by, by, "node 0 hears it");
    // A later, looser request does not move the deadline.
    let looser = rpc::HeartbeatRequest {
        node_rank: 0,
        reports: Vec::new(),
        generation: 0,
        instance: 100,
        preempt_by: by + 10.0,
    };
    c.heartbeat(Request::new(looser)).await.expect("beat");
    assert_eq!(beat(&c, 1, 0).await.yield_by, by);
    // Node 1's worker exits 1 at the kill (its peer is gone): not a crash to restart for.
    let exit = rpc::WorkerExitRequest {
        node_rank: 1,
        rank: 2,
        pid: 4242,
        code: 1,
        signal: 0,
        message: "peer gone".into(),
        generation: 0,
    };
    c.worker_exit(Request::new(exit)).await.expect("exit");
    tokio::time::sleep(Duration::from_millis(600)).await;
    for node in 0..2 {
        beat(&c, node, 0).await;
        let done = rpc::NodeDoneRequest {
            node_rank: node,
            generation: 0,
            yielded: true,
        };
        c.node_done(Request::new(done)).await.expect("done");
    }
    let reply = beat(&c, 0, 0).await;
    assert!(reply.finished && reply.yielded, "{reply:?}");
    assert!(events(dir.path(), fault).is_empty());
    assert!(events(dir.path(), restart).is_empty());
    let closes = events(dir.path(), |e| matches!(e, Event::WindowClose { .. }));
    assert!(
        matches!(
            closes.as_slice(),
            [Record {
                event: Event::WindowClose {
                    reason: crate::tidal::CloseReason::Preempted,
                    ..
                },
                ..
            }]
        ),
        "{closes:?}"
    );
    assert!(events(dir.path(), |e| matches!(e, Event::Done { .. })).is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_lost_while_the_window_ends_counts_as_stopped_and_the_window_closes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = crate::tidal::now();
    let c = coordinator_in(2, dir.path(), Some(hour_window(now)));
    join_all(&c, 2).await;
    let request = rpc::HeartbeatRequest {
        node_rank: 0,
        reports: Vec::new(),
        generation: 0,
        instance: 100,
        preempt_by: now + 30.0,
    };
    c.heartbeat(Request::new(request)).await.expect("beat");
    let done = rpc::NodeDoneRequest {
        node_rank: 0,
        generation: 0,
        yielded: true,
    };
    c.node_done(Request::new(done)).await.expect("done");
    // Node 1 falls silent (its host went) before it said it was done.
    let until = tokio::time::Instant::now() + 4 * TIMEOUT;
    let mut reply = beat(&c, 0, 0).await;
    while !reply.finished && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.tick();
        reply = beat(&c, 0, 0).await;
    }
    assert!(reply.finished && reply.yielded, "{reply:?}");
    assert!(events(dir.path(), restart).is_empty());
    assert_eq!(
        events(dir.path(), |e| matches!(e, Event::WindowClose { .. })).len(),
        1
    );
}
