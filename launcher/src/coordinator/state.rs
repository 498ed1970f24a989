//! Who is in the job: the nodes that joined, the generation they run, spares, excluded
//! nodes. Pure bookkeeping (no clock, no network), tested directly; liveness and faults are
//! [`super::detect`]'s, what to do about them [`super::recover`]'s.

use std::collections::{BTreeMap, BTreeSet};

/// A node agent that joined.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub nproc: usize,
    pub host: String,
    pub spare: bool,
    /// The agent process (random per process): a new one for a known node means its agent
    /// was restarted.
    pub instance: u64,
}

/// What a join meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Joined {
    /// Registered, or joined the current generation: wait for the others.
    Waiting,
    /// This join completed the first rendezvous.
    Started,
    /// A new agent process for a member that had already joined the current generation (its
    /// workers may run or be about to): the old agent and its workers are gone, so the
    /// generation cannot go on.
    Returned,
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

/// The signal's name (`SIGKILL`), or `signal` for a number this platform does not name.
pub fn signal_name(sig: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(sig).map_or("signal", |s| s.as_str())
}

/// This node's part of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub generation: u64,
    pub world_size: usize,
    pub first_rank: usize,
    /// Nodes in the generation, and this node's place among them.
    pub nnodes: usize,
    pub index: usize,
}

/// What the coordinator knows about the job's membership.
#[derive(Clone, Debug)]
pub struct JobState {
    /// Nodes the job starts with.
    pub nnodes: usize,
    pub generation: u64,
    /// The first rendezvous completed.
    pub started: bool,
    /// Nodes of the current generation.
    pub members: BTreeSet<usize>,
    pub spares: BTreeSet<usize>,
    /// Nodes left out for good, and why.
    pub excluded: BTreeMap<usize, String>,
    /// Every agent that registered.
    pub nodes: BTreeMap<usize, Node>,
    /// Members that joined the current generation.
    pub joined: BTreeSet<usize>,
    pub peers: BTreeMap<usize, Vec<String>>,
    /// Members whose workers all finished this generation.
    pub done: BTreeSet<usize>,
    /// Why the job stopped for good.
    pub stopped: Option<String>,
    /// It stopped on bad input (a worker's exit status 2): every agent exits 2.
    pub input_error: bool,
    /// What the workers of the current generation run with (`launch train`'s layout).
    pub work: Option<super::Generation>,
    /// A tidal job: some node's workers stopped for the window's end (status 75).
    pub yielded: bool,
    /// A tidal job was preempted: every worker gone by these Unix seconds.
    pub yield_by: Option<f64>,
    pub restarts: u32,
}

impl JobState {
    pub fn new(nnodes: usize) -> Self {
        Self {
            nnodes,
            generation: 0,
            started: false,
            members: BTreeSet::new(),
            spares: BTreeSet::new(),
            excluded: BTreeMap::new(),
            nodes: BTreeMap::new(),
            joined: BTreeSet::new(),
            peers: BTreeMap::new(),
            done: BTreeSet::new(),
            stopped: None,
            input_error: false,
            work: None,
            yielded: false,
            yield_by: None,
            restarts: 0,
        }
    }

    /// Register a node, or take a member's join for the current generation; errors name
    /// what disagrees.
    pub fn join(
        &mut self,
        node: usize,
        nnodes: usize,
        nproc: usize,
        host: &str,
        spare: bool,
        instance: u64,
    ) -> Result<Joined, String> {
        if nnodes != self.nnodes {
            return Err(format!(
                "node {node} says nnodes = {nnodes}, the coordinator runs with {}",
                self.nnodes
            ));
        }
        if let Some(why) = self.exclusion(node) {
            return Err(why);
        }
        if nproc == 0 {
            return Err(format!("node {node} has no workers"));
        }
        if let Some(known) = self.nodes.get_mut(&node) {
            // A node joining again: for the next generation, or as a new agent process.
            if known.nproc != nproc || known.spare != spare {
                return Err(format!(
                    "node rank {node} joined twice with different settings (two agents with \
                     the same --node-rank?)"
                ));
            }
            if !self.started {
                return Err(format!(
                    "node rank {node} joined twice (two agents with the same --node-rank?)"
                ));
            }
            let returned = std::mem::replace(&mut known.instance, instance) != instance;
            if self.members.contains(&node) && !self.joined.insert(node) && returned {
                return Ok(Joined::Returned);
            }
            return Ok(Joined::Waiting);
        }
        if !spare && (self.started || node >= self.nnodes) {
            return Err(format!(
                "node rank {node} is outside the job's nodes 0..{} (a spare sets launch.spare)",
                self.nnodes
            ));
        }
        let record = Node {
            nproc,
            host: host.into(),
            spare,
            instance,
        };
        self.nodes.insert(node, record);
        if spare {
            self.spares.insert(node);
            return Ok(Joined::Waiting);
        }
        let regular: BTreeSet<usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.spare)
            .map(|(&r, _)| r)
            .collect();
        if regular.len() == self.nnodes {
            self.started = true;
            self.joined = regular.clone();
            self.members = regular;
            return Ok(Joined::Started);
        }
        Ok(Joined::Waiting)
    }

    /// `node`'s ranks once every member joined the current generation.
    pub fn assignment(&self, node: usize) -> Option<Assignment> {
        let ready =
            self.started && self.members.contains(&node) && self.members.is_subset(&self.joined);
        ready.then(|| Assignment {
            generation: self.generation,
            world_size: self.world_size(),
            first_rank: self.first_rank(node),
            nnodes: self.members.len(),
            index: self.members.range(..node).count(),
        })
    }

    fn nproc(&self, node: usize) -> usize {
        self.nodes.get(&node).map_or(0, |n| n.nproc)
    }

    /// Ranks are assigned member by member: a node gets the ranks after those of the
    /// members before it.
    pub fn first_rank(&self, node: usize) -> usize {
        self.members.range(..node).map(|&n| self.nproc(n)).sum()
    }

    pub fn world_size(&self) -> usize {
        self.members.iter().map(|&n| self.nproc(n)).sum()
    }

    /// Workers per node of the current generation (the fewest, if they differ).
    pub fn local_world(&self) -> usize {
        self.members
            .iter()
            .map(|&n| self.nproc(n))
            .min()
            .unwrap_or(1)
    }

    /// The nodes whose heartbeats matter: members and spares.
    pub fn watched(&self) -> Vec<usize> {
        self.members.union(&self.spares).copied().collect()
    }

    /// The full peer table once every member posted its addresses.
    pub fn peer_table(&self) -> Option<Vec<String>> {
        let all = self.peers.len() == self.members.len()
            && self.members.iter().all(|m| self.peers.contains_key(m));
        all.then(|| self.peers.values().flatten().cloned().collect())
    }

    /// Every member's workers finished this generation.
    pub fn finished(&self) -> bool {
        self.started && !self.members.is_empty() && self.members.is_subset(&self.done)
    }

    /// Why `node` may not take part any more, if it was excluded.
    pub fn exclusion(&self, node: usize) -> Option<String> {
        let why = self.excluded.get(&node)?;
        Some(format!("node {node} was excluded from the job: {why}"))
    }

    /// Leave `node` out of every later generation.
    pub fn exclude(&mut self, node: usize, why: String) {
        self.members.remove(&node);
        self.spares.remove(&node);
        self.excluded.insert(node, why);
    }

    /// Bring spare `node` into the members.
    pub fn promote(&mut self, node: usize) {
        if self.spares.remove(&node) {
            self.members.insert(node);
        }
    }

    /// Start the next generation with the current members, its workers running `work`:
    /// nobody has joined it yet.
    pub fn next_generation(&mut self, work: Option<super::Generation>) {
        self.generation += 1;
        self.restarts += 1;
        self.work = work;
        self.joined.clear();
        self.peers.clear();
        self.done.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_follow_node_order_and_joins_are_checked() {
        let mut s = JobState::new(3);
        assert_eq!(s.join(2, 3, 4, "c", false, 7), Ok(Joined::Waiting));
        assert_eq!(s.join(0, 3, 2, "a", false, 7), Ok(Joined::Waiting));
        assert_eq!(s.assignment(0), None);
        assert!(s
            .join(0, 3, 2, "a", false, 7)
            .expect_err("twice")
            .contains("twice"));
        assert!(s
            .join(1, 2, 2, "b", false, 7)
            .expect_err("nnodes")
            .contains("nnodes"));
        assert!(s.join(5, 3, 2, "b", false, 7).is_err());
        assert_eq!(s.join(1, 3, 3, "b", false, 7), Ok(Joined::Started));
        let a = s.assignment(2).expect("all joined");
        assert_eq!((a.first_rank, a.world_size, a.nnodes), (5, 9, 3));
        assert_eq!(
            (s.first_rank(0), s.first_rank(1), s.world_size()),
            (0, 2, 9)
        );
        assert_eq!(s.peer_table(), None);
        for n in 0..3 {
            s.peers.insert(n, vec![format!("n{n}")]);
        }
        assert_eq!(s.peer_table().expect("all posted"), ["n0", "n1", "n2"]);
    }

    #[test]
    fn a_generation_starts_when_its_members_joined_again() {
        let mut s = JobState::new(2);
        s.join(0, 2, 2, "a", false, 7).expect("join");
        s.join(9, 2, 2, "spare", true, 7).expect("a spare");
        s.join(1, 2, 2, "b", false, 7).expect("join");
        s.done.insert(0);
        s.exclude(1, "lost".into());
        s.promote(9);
        s.next_generation(None);
        assert_eq!((s.generation, s.restarts), (1, 1));
        assert!(s.done.is_empty() && s.assignment(0).is_none());
        s.join(0, 2, 2, "a", false, 7).expect("rejoin");
        assert_eq!(s.assignment(0), None, "the spare has not joined yet");
        s.join(9, 2, 2, "spare", true, 7).expect("the spare joins");
        let a = s.assignment(9).expect("ready");
        assert_eq!((a.generation, a.first_rank, a.world_size), (1, 2, 4));
        // The excluded node cannot come back.
        let e = s.join(1, 2, 2, "b", false, 7).expect_err("excluded");
        assert!(e.contains("excluded") && e.contains("lost"), "{e}");
        assert!(!s.finished());
        s.done.extend([0, 9]);
        assert!(s.finished());
    }

    #[test]
    fn a_new_agent_for_a_member_that_joined_the_generation_is_a_return() {
        let mut s = JobState::new(2);
        s.join(0, 2, 1, "a", false, 10).expect("join");
        assert_eq!(s.join(1, 2, 1, "b", false, 20), Ok(Joined::Started));
        // The same agent asking again (a retried join) is not a return.
        assert_eq!(s.join(1, 2, 1, "b", false, 20), Ok(Joined::Waiting));
        assert_eq!(s.join(1, 2, 1, "b", false, 21), Ok(Joined::Returned));
        s.next_generation(None);
        // The new agent joining the next generation is an ordinary join…
        assert_eq!(s.join(1, 2, 1, "b", false, 21), Ok(Joined::Waiting));
        // …and a node not yet rejoined may come back as a new process without harm.
        assert_eq!(s.join(0, 2, 1, "a", false, 11), Ok(Joined::Waiting));
        assert!(s.assignment(0).is_some());
        assert_eq!(s.join(0, 2, 1, "a", false, 12), Ok(Joined::Returned));
    }

    #[test]
    fn a_shrunk_generation_renumbers_the_ranks() {
        let mut s = JobState::new(3);
        for n in 0..3 {
            s.join(n, 3, 2, "h", false, 7).expect("join");
        }
        s.exclude(1, "lost".into());
        s.next_generation(None);
        for n in [0, 2] {
            s.join(n, 3, 2, "h", false, 7).expect("rejoin");
        }
        let a = s.assignment(2).expect("ready");
        assert_eq!((a.first_rank, a.world_size, a.nnodes), (2, 4, 2));
        assert_eq!(s.local_world(), 2);
    }
}
