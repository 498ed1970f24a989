//! What to do about a fault, as a pure function of the fault, the cluster and the policy;
//! the reason goes into the `decision` event.
//!
//! Restart in place after a transient crash, hang or agent restart; exclude a node after a
//! lost heartbeat or `exclude_after` faults; take a registered spare for it if there is one, otherwise
//! shrink (re-plan for the nodes left and reshard from the last committed checkpoint); give
//! up below `min_nodes` or past `max_restarts`. Stragglers are reported, and excluded only
//! when configured. Workers are always killed before any restart.

use std::collections::{BTreeMap, BTreeSet};

use super::detect::{Fault, Kind};
use crate::config::LaunchOptions;
use crate::events;

/// The node whose agent hosts the coordinator: it cannot be excluded.
pub const COORDINATOR_NODE: usize = 0;

/// The nodes of the job and its history.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cluster {
    pub active: BTreeSet<usize>,
    pub spares: BTreeSet<usize>,
    pub restarts: u32,
    pub faults: BTreeMap<usize, u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Report only; training goes on.
    Continue,
    /// Kill every worker and start the same layout again from the last checkpoint.
    RestartInPlace,
    /// Kill every worker, put `spare` where `lost` was, restart with the same layout.
    Replace { lost: usize, spare: usize },
    /// Kill every worker, drop `lost`, re-plan for the nodes left, reshard and restart.
    Shrink { lost: usize, nodes: usize },
    /// Stop the job with an error.
    GiveUp,
}

impl Action {
    /// As the `decision` event names it.
    pub fn kind(&self) -> events::Action {
        match self {
            Action::Continue => events::Action::Continue,
            Action::RestartInPlace => events::Action::RestartInPlace,
            Action::Replace { .. } => events::Action::ReplaceNode,
            Action::Shrink { .. } => events::Action::Shrink,
            Action::GiveUp => events::Action::GiveUp,
        }
    }
}

/// The action for `fault` under `policy` (the job's `[launch]` section), and why.
pub fn decide(fault: &Fault, cluster: &Cluster, policy: &LaunchOptions) -> (Action, String) {
    let node = fault.node;
    let seen = node.map_or(0, |n| cluster.faults.get(&n).copied().unwrap_or(0) + 1);
    let exclude = match fault.kind {
        Kind::Straggler if !policy.exclude_stragglers => {
            return (
                Action::Continue,
                "stragglers are reported, not excluded (exclude_stragglers = false)".into(),
            )
        }
        Kind::Straggler | Kind::LostHeartbeat => true,
        Kind::Crash | Kind::Hang | Kind::AgentRestart => seen >= policy.exclude_after,
    };
    if fault.permanent {
        return (
            Action::GiveUp,
            "the worker reported an error in the job's input (exit status 2); restarting \
             would not help"
                .into(),
        );
    }
    if cluster.restarts >= policy.max_restarts {
        return (
            Action::GiveUp,
            format!(
                "{} restarts already, max_restarts = {}",
                cluster.restarts, policy.max_restarts
            ),
        );
    }
    let Some(lost) = node.filter(|_| exclude) else {
        return (
            Action::RestartInPlace,
            format!(
                "a {} is taken as transient ({seen} of {} faults on its node before exclusion): \
                 restart every worker from the last checkpoint",
                fault.kind.name(),
                policy.exclude_after
            ),
        );
    };
    let why = match fault.kind {
        Kind::LostHeartbeat => "its agent is lost".to_string(),
        Kind::Straggler => "it straggles and exclude_stragglers is set".to_string(),
        Kind::Crash | Kind::Hang | Kind::AgentRestart => format!(
            "{seen} faults there (exclude_after = {})",
            policy.exclude_after
        ),
    };
    exclude_node(lost, &why, cluster, policy)
}

/// Leave `lost` out (for `why`): a spare takes its place, else the job shrinks, unless
/// that leaves too few nodes or `lost` hosts the coordinator.
fn exclude_node(
    lost: usize,
    why: &str,
    cluster: &Cluster,
    policy: &LaunchOptions,
) -> (Action, String) {
    if lost == COORDINATOR_NODE {
        return (
            Action::GiveUp,
            format!(
                "node {lost} should be excluded ({why}), but it hosts the coordinator; \
                 restart the job (a fault there is likely not the node's)"
            ),
        );
    }
    if let Some(&spare) = cluster.spares.iter().next() {
        return (
            Action::Replace { lost, spare },
            format!("exclude node {lost} ({why}); spare node {spare} takes its place"),
        );
    }
    let left = cluster.active.iter().filter(|&&n| n != lost).count();
    if left < policy.min_nodes.max(1) {
        return (
            Action::GiveUp,
            format!(
                "excluding node {lost} ({why}) leaves {left} node(s), below min_nodes = {}",
                policy.min_nodes
            ),
        );
    }
    (
        Action::Shrink { lost, nodes: left },
        format!(
            "exclude node {lost} ({why}); no spare: re-plan for {left} node(s) and reshard from \
             the last committed checkpoint"
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn fault(kind: Kind, node: usize) -> Fault {
        let now = Instant::now();
        Fault {
            kind,
            rank: Some(node * 2),
            node: Some(node),
            detail: String::new(),
            detected_at: now,
            healthy_at: now,
            permanent: false,
            cause: None,
        }
    }

    fn two_nodes() -> Cluster {
        Cluster {
            active: [0, 1].into(),
            ..Cluster::default()
        }
    }

    #[test]
    fn transient_faults_restart_in_place_until_a_node_has_too_many() {
        let p = LaunchOptions::default();
        let mut c = two_nodes();
        for kind in [Kind::Crash, Kind::Hang] {
            assert_eq!(decide(&fault(kind, 1), &c, &p).0, Action::RestartInPlace);
        }
        c.faults.insert(1, 2);
        let (a, why) = decide(&fault(Kind::Crash, 1), &c, &p);
        assert_eq!(a, Action::Shrink { lost: 1, nodes: 1 }, "{why}");
        assert!(why.contains("3 faults"), "{why}");
        // The coordinator's node is never excluded: the job gives up instead.
        c.faults.insert(0, 2);
        let (a, why) = decide(&fault(Kind::Crash, 0), &c, &p);
        assert_eq!(a, Action::GiveUp, "{why}");
        assert!(why.contains("hosts the coordinator"), "{why}");
    }

    #[test]
    fn a_lost_node_is_replaced_by_a_spare_else_the_job_shrinks_else_gives_up() {
        let p = LaunchOptions::default();
        let mut c = two_nodes();
        assert_eq!(
            decide(&fault(Kind::LostHeartbeat, 1), &c, &p).0,
            Action::Shrink { lost: 1, nodes: 1 }
        );
        c.spares.insert(7);
        assert_eq!(
            decide(&fault(Kind::LostHeartbeat, 1), &c, &p).0,
            Action::Replace { lost: 1, spare: 7 }
        );
        c.spares.clear();
        let strict = LaunchOptions {
            min_nodes: 2,
            ..p.clone()
        };
        let (a, why) = decide(&fault(Kind::LostHeartbeat, 1), &c, &strict);
        assert_eq!(a, Action::GiveUp);
        assert!(why.contains("min_nodes = 2"), "{why}");
        c.restarts = p.max_restarts;
        let (a, why) = decide(&fault(Kind::Crash, 0), &c, &p);
        assert_eq!(a, Action::GiveUp);
        assert!(why.contains("max_restarts"), "{why}");
    }

    #[test]
    fn stragglers_are_reported_unless_exclusion_is_configured() {
        let c = two_nodes();
        let p = LaunchOptions::default();
        assert_eq!(
            decide(&fault(Kind::Straggler, 1), &c, &p).0,
            Action::Continue
        );
        let p = LaunchOptions {
            exclude_stragglers: true,
            ..p
        };
        assert_eq!(
            decide(&fault(Kind::Straggler, 1), &c, &p).0,
            Action::Shrink { lost: 1, nodes: 1 }
        );
    }
}
