//! The coordinator's state and its decisions, as pure functions of (state, now): tested by
//! editing timestamps, with no network and no sleeps.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// A node agent that joined.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub nproc: usize,
    pub host: String,
    pub last_seen: Instant,
}

/// Why the job must stop.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub node: usize,
    pub rank: Option<usize>,
    pub reason: String,
}

/// How a worker process ended.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerExit {
    pub node: usize,
    pub rank: usize,
    pub pid: u32,
    /// Exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// What the worker said before exiting, if anything.
    pub message: String,
}

impl WorkerExit {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// "rank 1 (node 0, pid 4242) was killed by signal 9 (SIGKILL)" or "... exited with status 2: why".
    pub fn describe(&self) -> String {
        let who = format!("rank {} (node {}, pid {})", self.rank, self.node, self.pid);
        let how = match (self.code, self.signal) {
            (_, Some(sig)) => format!("was killed by signal {sig} ({})", signal_name(sig)),
            (Some(code), None) => format!("exited with status {code}"),
            (None, None) => "ended for an unknown reason".into(),
        };
        if self.message.is_empty() {
            format!("{who} {how}")
        } else {
            format!("{who} {how}: {}", self.message)
        }
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => "signal",
    }
}

/// Limits the decisions use.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub heartbeat_timeout: Duration,
}

/// What the coordinator knows about the job.
#[derive(Clone, Debug)]
pub struct JobState {
    pub nnodes: usize,
    pub generation: u64,
    pub nodes: BTreeMap<usize, Node>,
    pub peers: BTreeMap<usize, Vec<String>>,
    pub done: BTreeSet<usize>,
    pub fault: Option<Fault>,
}

/// The coordinator's verdict at a moment.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Keep going (rendezvous still open, or training).
    Continue,
    /// Stop every worker on every node.
    Stop(Fault),
    /// Every node finished cleanly.
    Finished,
}

impl JobState {
    pub fn new(nnodes: usize) -> Self {
        Self {
            nnodes,
            generation: 0,
            nodes: BTreeMap::new(),
            peers: BTreeMap::new(),
            done: BTreeSet::new(),
            fault: None,
        }
    }

    /// Register a node; errors name what disagrees.
    pub fn join(
        &mut self,
        now: Instant,
        node_rank: usize,
        nnodes: usize,
        nproc: usize,
        host: &str,
    ) -> Result<(), String> {
        if nnodes != self.nnodes {
            return Err(format!(
                "node {node_rank} says nnodes = {nnodes}, the coordinator runs with {}",
                self.nnodes
            ));
        }
        if node_rank >= self.nnodes {
            return Err(format!(
                "node rank {node_rank} is outside 0..{}",
                self.nnodes
            ));
        }
        if self.nodes.contains_key(&node_rank) {
            return Err(format!(
                "node rank {node_rank} joined twice (two agents with the same --node-rank?)"
            ));
        }
        if nproc == 0 {
            return Err(format!("node {node_rank} has no workers"));
        }
        self.nodes.insert(
            node_rank,
            Node {
                nproc,
                host: host.into(),
                last_seen: now,
            },
        );
        // Agents do not beat while they wait for the others: the clocks start together.
        if self.all_joined() {
            for n in self.nodes.values_mut() {
                n.last_seen = now;
            }
        }
        Ok(())
    }

    pub fn all_joined(&self) -> bool {
        self.nodes.len() == self.nnodes
    }

    /// Ranks are assigned node by node: node n gets the ranks after those of nodes < n.
    pub fn first_rank(&self, node_rank: usize) -> usize {
        self.nodes.range(..node_rank).map(|(_, n)| n.nproc).sum()
    }

    pub fn world_size(&self) -> usize {
        self.nodes.values().map(|n| n.nproc).sum()
    }

    /// The full peer table once every node posted its addresses.
    pub fn peer_table(&self) -> Option<Vec<String>> {
        (self.peers.len() == self.nnodes).then(|| self.peers.values().flatten().cloned().collect())
    }

    pub fn heartbeat(&mut self, now: Instant, node_rank: usize) {
        if let Some(n) = self.nodes.get_mut(&node_rank) {
            n.last_seen = now;
        }
    }

    /// Record a worker's end; the first failure becomes the job's fault.
    pub fn worker_exit(&mut self, exit: &WorkerExit) -> Option<Fault> {
        if exit.success() || self.fault.is_some() {
            return None;
        }
        let fault = Fault {
            node: exit.node,
            rank: Some(exit.rank),
            reason: exit.describe(),
        };
        self.fault = Some(fault.clone());
        Some(fault)
    }

    pub fn node_done(&mut self, now: Instant, node_rank: usize) {
        self.heartbeat(now, node_rank);
        self.done.insert(node_rank);
    }
}

/// The decision at `now`: a recorded fault stops the job; so does a node that joined but
/// has not been heard from for `heartbeat_timeout` (and is not done).
pub fn decide(now: Instant, state: &JobState, policy: &Policy) -> Decision {
    if let Some(f) = &state.fault {
        return Decision::Stop(f.clone());
    }
    if state.all_joined() && state.done.len() == state.nnodes {
        return Decision::Finished;
    }
    // Nobody beats during the rendezvous (its own timeout covers a node that never comes).
    if !state.all_joined() {
        return Decision::Continue;
    }
    for (&rank, node) in &state.nodes {
        let silent = now.saturating_duration_since(node.last_seen);
        if !state.done.contains(&rank) && silent > policy.heartbeat_timeout {
            return Decision::Stop(Fault {
                node: rank,
                rank: None,
                reason: format!(
                    "node {rank} ({}) lost: no heartbeat for {:.1} s (limit {:.1} s)",
                    node.host,
                    silent.as_secs_f64(),
                    policy.heartbeat_timeout.as_secs_f64()
                ),
            });
        }
    }
    Decision::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            heartbeat_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn ranks_follow_node_order_and_joins_are_checked() {
        let t0 = Instant::now();
        let mut s = JobState::new(3);
        s.join(t0, 2, 3, 4, "c").expect("join");
        s.join(t0, 0, 3, 2, "a").expect("join");
        assert!(!s.all_joined());
        assert!(s
            .join(t0, 0, 3, 2, "a")
            .expect_err("twice")
            .contains("twice"));
        assert!(s
            .join(t0, 1, 2, 2, "b")
            .expect_err("nnodes")
            .contains("nnodes"));
        assert!(s.join(t0, 5, 3, 2, "b").is_err());
        s.join(t0, 1, 3, 3, "b").expect("join");
        assert!(s.all_joined());
        assert_eq!(
            (
                s.first_rank(0),
                s.first_rank(1),
                s.first_rank(2),
                s.world_size()
            ),
            (0, 2, 5, 9)
        );
        assert_eq!(s.peer_table(), None);
        for n in 0..3 {
            s.peers.insert(n, vec![format!("n{n}")]);
        }
        assert_eq!(s.peer_table().expect("all posted"), ["n0", "n1", "n2"]);
    }

    #[test]
    fn first_failure_stops_the_job_and_names_the_rank() {
        let t0 = Instant::now();
        let mut s = JobState::new(1);
        s.join(t0, 0, 1, 2, "a").expect("join");
        let ok = WorkerExit {
            node: 0,
            rank: 0,
            pid: 10,
            code: Some(0),
            signal: None,
            message: String::new(),
        };
        assert_eq!(s.worker_exit(&ok), None);
        let killed = WorkerExit {
            rank: 1,
            pid: 11,
            code: None,
            signal: Some(9),
            ..ok.clone()
        };
        let fault = s.worker_exit(&killed).expect("a fault");
        assert_eq!(fault.rank, Some(1));
        assert_eq!(
            fault.reason,
            "rank 1 (node 0, pid 11) was killed by signal 9 (SIGKILL)"
        );
        // Later failures (the others losing their peer) do not replace the first.
        let after = WorkerExit {
            code: Some(1),
            message: "lost the connection to rank 1".into(),
            ..ok
        };
        assert_eq!(s.worker_exit(&after), None);
        assert_eq!(decide(t0, &s, &policy()), Decision::Stop(fault));
    }

    #[test]
    fn a_late_joiner_does_not_make_the_early_ones_lost() {
        let t0 = Instant::now();
        let mut s = JobState::new(2);
        s.join(t0, 0, 2, 1, "a").expect("join");
        assert_eq!(
            decide(t0 + Duration::from_secs(60), &s, &policy()),
            Decision::Continue
        );
        s.join(t0 + Duration::from_secs(60), 1, 2, 1, "b")
            .expect("join");
        assert_eq!(
            decide(t0 + Duration::from_secs(65), &s, &policy()),
            Decision::Continue
        );
    }

    #[test]
    fn silent_nodes_are_lost_done_nodes_are_not() {
        let t0 = Instant::now();
        let mut s = JobState::new(2);
        s.join(t0, 0, 2, 1, "a").expect("join");
        s.join(t0, 1, 2, 1, "b").expect("join");
        let p = policy();
        assert_eq!(
            decide(t0 + Duration::from_secs(9), &s, &p),
            Decision::Continue
        );
        s.heartbeat(t0 + Duration::from_secs(9), 0);
        match decide(t0 + Duration::from_secs(11), &s, &p) {
            Decision::Stop(f) => {
                assert!(f.node == 1 && f.reason.contains("node 1 (b) lost"), "{f:?}")
            }
            d => panic!("expected a stop, got {d:?}"),
        }
        s.node_done(t0 + Duration::from_secs(11), 1);
        s.heartbeat(t0 + Duration::from_secs(11), 0);
        assert_eq!(
            decide(t0 + Duration::from_secs(100), &s, &p).clone(),
            Decision::Stop(Fault {
                node: 0,
                rank: None,
                reason: "node 0 (a) lost: no heartbeat for 89.0 s (limit 10.0 s)".into(),
            })
        );
        s.node_done(t0 + Duration::from_secs(100), 0);
        assert_eq!(
            decide(t0 + Duration::from_secs(500), &s, &p),
            Decision::Finished
        );
    }
}
