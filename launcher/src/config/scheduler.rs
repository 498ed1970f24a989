//! Rank, node count and rendezvous from the scheduler that started us, so that no flag is
//! written by hand there:
//!
//! - **Slurm** (`SLURM_JOB_ID` and `SLURM_NODEID` set, as in every `srun` task and the batch
//!   script): `launch.node_rank` = `SLURM_NODEID`, `launch.nnodes` = `SLURM_NNODES`,
//!   `launch.rdzv` = the first host of `SLURM_JOB_NODELIST` at `TIDEMILL_RDZV_PORT`
//!   (default 29400), and `launch.nproc_per_node` = `SLURM_GPUS_ON_NODE` when Slurm gave
//!   GPUs.
//! - **A Kubernetes Indexed Job** (`JOB_COMPLETION_INDEX` set): `launch.node_rank` = the
//!   index, `launch.nnodes` = `TIDEMILL_NNODES`, `launch.rdzv` = `TIDEMILL_RDZV`, else index
//!   0's pod through the headless service: `<pod hostname with -0>.<TIDEMILL_SERVICE>:port`.
//!
//! These come before the job file's `--set` and the command line's flags, which win.

use std::collections::BTreeMap;

/// The default rendezvous port under a scheduler (torchrun's).
pub const RDZV_PORT: u16 = 29400;

/// The first host of a Slurm hostlist: `gpu[07-09,12],cpu1` → `gpu07`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if !list[end..].starts_with('[') {
        return (!prefix.is_empty()).then(|| prefix.to_string());
    }
    let inside = &list[end + 1..list[end..].find(']')? + end];
    let first = inside.split([',', '-']).next()?.trim();
    // What follows the bracket (rare: `n[1-2]-ib`) belongs to every host.
    let close = list[end..].find(']')? + end;
    let suffix: String = list[close + 1..]
        .chars()
        .take_while(|c| *c != ',')
        .collect();
    (!first.is_empty()).then(|| format!("{prefix}{first}{suffix}"))
}

/// `launch.KEY=VALUE` overrides from the scheduler's environment `env` (empty outside one).
pub fn overrides(env: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    let get = |k: &str| {
        env.get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let port = match get("TIDEMILL_RDZV_PORT") {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("TIDEMILL_RDZV_PORT: `{p}` is not a port"))?,
        None => RDZV_PORT,
    };
    let number = |k: &str| -> Result<Option<usize>, String> {
        get(k)
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| format!("{k}: `{v}` is not a whole number"))
            })
            .transpose()
    };
    let mut out = Vec::new();
    if get("SLURM_JOB_ID").is_some() && get("SLURM_NODEID").is_some() {
        if let Some(n) = number("SLURM_NODEID")? {
            out.push(format!("launch.node_rank={n}"));
        }
        if let Some(n) = number("SLURM_NNODES")? {
            out.push(format!("launch.nnodes={n}"));
        }
        if let Some(list) = get("SLURM_JOB_NODELIST") {
            let host = first_host(&list)
                .ok_or_else(|| format!("SLURM_JOB_NODELIST: `{list}` names no host"))?;
            out.push(format!("launch.rdzv=\"{host}:{port}\""));
        }
        // `SLURM_GPUS_ON_NODE` is a count; Slurm may also give `gpu:a100:8` forms elsewhere.
        if let Some(g) = number("SLURM_GPUS_ON_NODE")?.filter(|g| *g > 0) {
            out.push(format!("launch.nproc_per_node={g}"));
        }
    } else if let Some(index) = number("JOB_COMPLETION_INDEX")? {
        out.push(format!("launch.node_rank={index}"));
        let nnodes = number("TIDEMILL_NNODES")?.ok_or(
            "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but TIDEMILL_NNODES is \
             not: set it to the Job's completions",
        )?;
        out.push(format!("launch.nnodes={nnodes}"));
        let rdzv = match (
            get("TIDEMILL_RDZV"),
            get("TIDEMILL_SERVICE"),
            get("HOSTNAME"),
        ) {
            (Some(r), _, _) => r,
            (None, Some(svc), Some(host)) => {
                let base = host
                    .rsplit_once('-')
                    .filter(|(_, i)| i.parse::<usize>().is_ok())
                    .map_or(host.as_str(), |(b, _)| b);
                format!("{base}-0.{svc}:{port}")
            }
            _ => {
                return Err(
                    "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job): set \
                            TIDEMILL_RDZV, or TIDEMILL_SERVICE (the headless service)"
                        .into(),
                )
            }
        };
        out.push(format!("launch.rdzv=\"{rdzv}\""));
    }
    Ok(out)
}

/// [`overrides`] from this process's environment.
pub fn from_env() -> Result<Vec<String>, String> {
    overrides(&std::env::vars().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn slurm_hostlists_give_their_first_host() {
        assert_eq!(first_host("vm").as_deref(), Some("vm"));
        assert_eq!(first_host("gpu[07-09,12],cpu1").as_deref(), Some("gpu07"));
        assert_eq!(first_host("a1,a2").as_deref(), Some("a1"));
        assert_eq!(first_host("n[3,5]-ib").as_deref(), Some("n3-ib"));
        assert_eq!(first_host(""), None);
    }

    #[test]
    fn slurm_and_kubernetes_environments_give_rank_nodes_and_rendezvous() {
        let slurm = env(&[
            ("SLURM_JOB_ID", "17"),
            ("SLURM_NODEID", "2"),
            ("SLURM_NNODES", "4"),
            ("SLURM_JOB_NODELIST", "gpu[07-10]"),
            ("SLURM_GPUS_ON_NODE", "8"),
        ]);
        assert_eq!(
            overrides(&slurm).expect("slurm"),
            [
                "launch.node_rank=2",
                "launch.nnodes=4",
                "launch.rdzv=\"gpu07:29400\"",
                "launch.nproc_per_node=8"
            ]
        );
        let k8s = env(&[
            ("JOB_COMPLETION_INDEX", "3"),
            ("TIDEMILL_NNODES", "4"),
            ("TIDEMILL_SERVICE", "tidemill"),
            ("HOSTNAME", "night-28939-3"),
            ("TIDEMILL_RDZV_PORT", "29500"),
        ]);
        assert_eq!(
            overrides(&k8s).expect("k8s"),
            [
                "launch.node_rank=3",
                "launch.nnodes=4",
                "launch.rdzv=\"night-28939-0.tidemill:29500\""
            ]
        );
        assert!(overrides(&env(&[("PATH", "/bin")]))
            .expect("none")
            .is_empty());
        let e = overrides(&env(&[("JOB_COMPLETION_INDEX", "0")])).expect_err("no nnodes");
        assert!(e.contains("TIDEMILL_NNODES"), "{e}");
        let e =
            overrides(&env(&[("SLURM_JOB_ID", "1"), ("SLURM_NODEID", "x")])).expect_err("bad id");
        assert!(e.contains("SLURM_NODEID"), "{e}");
    }
}
