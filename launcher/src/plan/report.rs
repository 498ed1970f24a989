//! How a plan is shown: a table for people, JSON for programs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use parallel::plan::{Candidate, Plan, Priced, GIB};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use trainer::{PipelineSchedule, Strategy};

/// One candidate as `launch plan --format json` lists it (and the `start` event of a job
/// under `strategy = "auto"`). Sizes (`*_gb`) are GiB (2³⁰ bytes, as `nvidia-smi`
/// counts), times seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateReport {
    #[serde(flatten)]
    pub candidate: Candidate,
    pub step_time_s: f64,
    pub tflops_per_gpu: f64,
    pub mfu: f64,
    pub mem_gb_per_gpu: f64,
    pub breakdown: Breakdown,
}

/// Where a candidate's step time and memory go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    pub pipeline_s: f64,
    pub bubble_s: f64,
    pub tp_comm_s: f64,
    pub ep_comm_s: f64,
    pub pp_comm_s: f64,
    pub dp_comm_s: f64,
    pub optimizer_s: f64,
    pub weights_gb: f64,
    pub grads_gb: f64,
    pub optimizer_gb: f64,
    pub activations_gb: f64,
    pub reserved_gb: f64,
}

impl CandidateReport {
    pub fn of(p: &Priced) -> Self {
        let (c, e) = (&p.candidate, &p.estimate);
        let m = &e.memory;
        Self {
            candidate: *c,
            step_time_s: e.step_time_s,
            tflops_per_gpu: e.tflops_per_gpu,
            mfu: e.mfu,
            mem_gb_per_gpu: m.total() / GIB,
            breakdown: Breakdown {
                pipeline_s: e.pipeline_s,
                bubble_s: e.bubble_s,
                tp_comm_s: e.tp_comm_s,
                ep_comm_s: e.ep_comm_s,
                pp_comm_s: e.pp_comm_s,
                dp_comm_s: e.dp_comm_s,
                optimizer_s: e.optimizer_s,
                weights_gb: m.weights / GIB,
                grads_gb: m.grads / GIB,
                optimizer_gb: m.optimizer / GIB,
                activations_gb: m.activations / GIB,
                reserved_gb: m.reserved / GIB,
            },
        }
    }
}

/// The layout a generation runs with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanEvent {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    pub ep: usize,
    pub zero1: bool,
    pub sequence_parallel: bool,
    pub schedule: PipelineSchedule,
    pub virtual_stages: usize,
    pub micro_batch: usize,
    pub strategy: Strategy,
    /// Under `strategy = "auto"`: the search's pick and its predictions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<AutoPick>,
}

/// The candidate the strategy search picked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoPick {
    #[serde(flatten)]
    pub candidate: CandidateReport,
    pub hardware: String,
    /// Candidates that fit, and layouts or variants rejected.
    pub considered: usize,
    pub rejected: usize,
    pub search_s: f64,
}

/// `{"world","hardware","search_s","considered","candidates":[…best first, top K],
/// "rejected":[…all]}`; `considered`: how many candidates fit.
pub fn json_report(plan: &Plan, top: usize, hardware: &str, search_s: f64) -> Value {
    json!({
        "world": plan.world,
        "hardware": hardware,
        "search_s": search_s,
        "considered": plan.candidates.len(),
        "candidates": plan.candidates.iter().take(top).map(CandidateReport::of).collect::<Vec<_>>(),
        "rejected": plan.rejected,
    })
}

/// The top candidates as a table, then what was rejected, grouped by reason.
pub fn table(plan: &Plan, top: usize, hardware: &str, search_s: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} devices of {hardware}: {} candidates fit, {} rejected; searched in {:.3} s",
        plan.world,
        plan.candidates.len(),
        plan.rejected.len(),
        search_s
    );
    let _ = writeln!(
        out,
        "{:>3} {:>5} {:>3} {:>4} {:>3} {:>4} {:>2} {:>5} {:>5} {:>10} {:>9} {:>6} {:>8}   bubble / tp / dp s",
        "#",
        "dp",
        "tp",
        "pp",
        "ep",
        "mb",
        "v",
        "recmp",
        "zero1",
        "step s",
        "TFLOP/s",
        "MFU",
        "mem GiB",
    );
    for (i, p) in plan.candidates.iter().take(top).enumerate() {
        let (c, e) = (&p.candidate, &p.estimate);
        let yes = |b: bool| if b { "yes" } else { "-" };
        let _ = writeln!(
            out,
            "{:>3} {:>5} {:>3} {:>4} {:>3} {:>4} {:>2} {:>5} {:>5} {:>10.4} {:>9.1} {:>5.1}% {:>8.2}   {:.3} / {:.3} / {:.3}",
            i + 1,
            c.dp,
            c.tp,
            c.pp,
            c.ep,
            c.micro_batch,
            c.virtual_stages,
            yes(c.recompute),
            yes(c.zero1),
            e.step_time_s,
            e.tflops_per_gpu,
            e.mfu * 100.0,
            e.memory.total() / GIB,
            e.bubble_s,
            e.tp_comm_s,
            e.dp_comm_s
        );
    }
    if !plan.rejected.is_empty() {
        // Grouped by the reason's wording up to its first number; one example each.
        let mut kinds: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for (i, r) in plan.rejected.iter().enumerate() {
            let kind = r
                .reason
                .split(|ch: char| ch.is_ascii_digit())
                .next()
                .unwrap_or("");
            kinds.entry(kind).or_insert((0, i)).0 += 1;
        }
        let mut shown: Vec<(usize, usize)> = kinds.into_values().collect();
        shown.sort_by_key(|&(n, _)| std::cmp::Reverse(n));
        let _ = writeln!(out, "rejected, by reason (--format json lists each):");
        for (n, i) in shown {
            let r = &plan.rejected[i];
            let _ = writeln!(out, "  {n:>6} × e.g. {}: {}", r.layout, r.reason);
        }
    }
    out
}
