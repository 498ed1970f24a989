//! `examples/deploy/`: each example parses (YAML, systemd's own verifier, bash) and says
//! what DEVELOPERS and the README promise (the window, the grace, status 75), and the
//! environment it gives `launch` starts a job with no flag written by hand. The sbatch
//! script runs under a real Slurm in `tests/faults/slurm.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use yaml_rust2::{Yaml, YamlLoader};

use crate::common::jobs::*;
use crate::common::*;

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/deploy")
        .join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(deploy(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `launch train JOB --until` (a tidal window, 5 minutes) with `env` as the scheduler
/// would set it (and nothing else about the job's shape on the command line), stdout
/// discarded.
fn scheduled(job: &Path, env: &[(&str, String)]) -> std::process::Child {
    let until = utc_in(300.0, "%H:%M:%S");
    let mut c = launch_cmd();
    c.arg("train").arg(job).args(["--until", &until]);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c.spawn().expect("launch starts")
}

/// Two nodes of one worker each, started from `env_of(node)` alone: both finish, and the
/// job ran as 2 nodes.
fn two_nodes(env_of: impl Fn(usize) -> Vec<(&'static str, String)>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = write_job(tmp.path(), true, 3);
    let agents = (0..2).map(|n| scheduled(&job, &env_of(n))).collect();
    wait_ok(agents, "two scheduled nodes");
    let ev = run_events(&tmp.path().join("run"));
    let start = ev.iter().find(|e| e["event"] == "start").expect("start");
    assert_eq!(
        (&start["nnodes"], &start["world_size"]),
        (&2.into(), &2.into())
    );
    let nodes: std::collections::BTreeSet<u64> = ev
        .iter()
        .filter(|e| e["event"] == "join")
        .filter_map(|e| e["node"].as_u64())
        .collect();
    assert_eq!(nodes.len(), 2, "both nodes joined");
}

#[test]
fn the_sbatch_script_asks_slurm_for_the_window_the_grace_and_a_requeue_and_slurms_env_starts_a_job()
{
    let script = read("slurm/tidal.sbatch");
    let ok = Command::new("bash")
        .arg("-n")
        .arg(deploy("slurm/tidal.sbatch"))
        .status()
        .expect("bash");
    assert!(ok.success(), "bash -n");
    let sbatch: Vec<&str> = script
        .lines()
        .filter_map(|l| l.strip_prefix("#SBATCH "))
        .collect();
    for want in ["--begin=", "--time=", "--signal=B:USR1@", "--requeue"] {
        assert!(
            sbatch.iter().any(|l| l.starts_with(want)),
            "#SBATCH {want}: {sbatch:?}"
        );
    }
    assert!(script.contains("--until") && script.contains("scontrol requeue"));
    assert!(script.contains("75)"), "status 75 is the requeue");
    let port = free_port().to_string();
    two_nodes(|n| {
        vec![
            ("SLURM_JOB_ID", "42".into()),
            ("SLURM_NODEID", n.to_string()),
            ("SLURM_NNODES", "2".into()),
            ("SLURM_JOB_NODELIST", "127.0.0.1,127.0.0.1".into()),
            ("TIDEMILL_RDZV_PORT", port.clone()),
        ]
    });
}

fn key<'a>(y: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(y, |y, k| &y[*k])
}

#[test]
fn the_kubernetes_cronjob_runs_an_indexed_job_in_the_window_and_its_pod_env_starts_a_job() {
    let docs = YamlLoader::load_from_str(&read("kubernetes/cronjob.yaml")).expect("YAML");
    let service = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Service"))
        .expect("a Service");
    assert_eq!(key(service, &["spec", "clusterIP"]).as_str(), Some("None"));
    let cron = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("CronJob"))
        .expect("a CronJob");
    assert!(key(cron, &["spec", "schedule"]).as_str().is_some());
    assert!(key(cron, &["spec", "timeZone"]).as_str().is_some());
    let job = key(cron, &["spec", "jobTemplate", "spec"]);
    assert_eq!(job["completionMode"].as_str(), Some("Indexed"));
    assert_eq!(job["completions"], job["parallelism"]);
    let window = job["activeDeadlineSeconds"]
        .as_i64()
        .expect("activeDeadlineSeconds");
    assert!(window > 0);
    let rule = &job["podFailurePolicy"]["rules"][0];
    assert_eq!(rule["onExitCodes"]["values"][0].as_i64(), Some(75));
    let pod = key(job, &["template", "spec"]);
    assert_eq!(&pod["subdomain"], key(service, &["metadata", "name"]));
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace");
    let command: Vec<&str> = pod["containers"][0]["command"]
        .as_vec()
        .expect("command")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(command.contains(&"--until"), "{command:?}");
    let env: std::collections::BTreeMap<&str, &Yaml> = pod["containers"][0]["env"]
        .as_vec()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().expect("name"), &e["value"]))
        .collect();
    assert_eq!(
        env["TIDEMILL_NNODES"],
        &job["completions"]
            .as_i64()
            .map(|n| Yaml::String(n.to_string()))
            .expect("n")
    );
    assert!(env.contains_key("TIDEMILL_SERVICE") && env.contains_key("TIDEMILL_RDZV_PORT"));
    // The pods' grace outlasts tidemill's (the comment's 300 s `tidal.grace_s`).
    assert!(grace > 300, "terminationGracePeriodSeconds {grace}");
    // What each pod gets: its index, the node count, the rendezvous (the headless service's
    // name for index 0 here is loopback).
    let port = free_port();
    two_nodes(|n| {
        vec![
            ("JOB_COMPLETION_INDEX", n.to_string()),
            ("TIDEMILL_NNODES", "2".into()),
            ("TIDEMILL_RDZV", format!("127.0.0.1:{port}")),
        ]
    });
}

#[test]
fn the_systemd_units_verify_and_take_status_75_as_success() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let launch = env!("CARGO_BIN_EXE_launch");
    for unit in ["tidemill-night.service", "tidemill-night.timer"] {
        let text = read(&format!("systemd/{unit}")).replace("/usr/local/bin/launch", launch);
        std::fs::write(tmp.path().join(unit), text).expect("unit");
    }
    let service = read("systemd/tidemill-night.service");
    assert!(service.contains("SuccessExitStatus=75"));
    assert!(service.contains("--until"));
    let stop = service
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("TimeoutStopSec");
    assert!(stop > 300, "TimeoutStopSec {stop} outlasts tidal.grace_s");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(tmp.path().join("tidemill-night.service"))
        .arg(tmp.path().join("tidemill-night.timer"))
        .output()
        .expect("systemd-analyze (Debian's systemd)");
    // It may warn about the host (no such user here); a bad setting is an error line.
    let err = String::from_utf8_lossy(&out.stderr);
    for line in err.lines() {
        assert!(
            !(line.contains("Failed to parse")
                || line.contains("bad unit file")
                || line.contains("Unknown key")
                || line.contains("Refusing")),
            "{err}"
        );
    }
    let timer = read("systemd/tidemill-night.timer");
    let calendar = timer
        .lines()
        .find_map(|l| l.strip_prefix("OnCalendar="))
        .expect("OnCalendar");
    let out = Command::new("systemd-analyze")
        .args(["calendar", calendar])
        .output()
        .expect("systemd-analyze");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
