//! `examples/deploy/slurm/tidal.sbatch` under a real Slurm: Debian's slurm-wlm on this
//! machine as a one-node cluster (`tools/slurm/slurm-local.sh`, which installs it if it
//! must). Nights of one minute (`--time=1`, `--signal=B:USR1@30`): each ends by the
//! allocation's end or Slurm's SIGUSR1, the job exits 75 and the script requeues it; the
//! test lets each requeued night start at once (Slurm would wait two minutes) until the job
//! completes, with the losses of an uninterrupted run.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::jobs::*;
use crate::common::*;

/// 150 steps of 0.4 s: a minute, more than one night of one minute holds.
const STEPS: u64 = 150;

fn sh(cmd: &str) -> String {
    let out = Command::new("bash")
        .args(["-c", cmd])
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn field(job: &str, name: &str) -> String {
    let show = sh(&format!("scontrol show job {job}"));
    show.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_sbatch_example_yields_with_75_is_requeued_and_finishes_with_the_uninterrupted_losses() {
    let _one = crate::serial();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // slurm-local.sh runs daemons as root and writes /etc/slurm/slurm.conf: never over a
    // real cluster's.
    let conf = std::fs::read_to_string("/etc/slurm/slurm.conf").unwrap_or_default();
    if !conf.is_empty() && !conf.contains("ClusterName=local") {
        println!("skipped: /etc/slurm/slurm.conf is a real cluster's, not slurm-local's");
        return;
    }
    if sh("id -u") != "0" {
        println!("skipped: slurm-local needs root");
        return;
    }
    sh(&root
        .join("tools/slurm/slurm-local.sh")
        .display()
        .to_string());
    // The cluster is this test's: nothing left of an earlier run may take its node.
    let _ = Command::new("scancel")
        .args(["--name", "tidemill-night"])
        .status();
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = write_job(tmp.path(), true, STEPS);
    let reference = {
        let dir = tmp.path().join("reference");
        std::fs::create_dir_all(&dir).expect("dir");
        let plain = write_job(&dir, true, STEPS);
        train(&plain, 1, 1, &[]);
        step_losses(&dir.join("run"))
    };
    let mut body = std::fs::read_to_string(&job).expect("job");
    body.push_str(
        "[checkpoint]\nevery = 10\n[tidal]\ntimezone = \"UTC\"\nhandback_margin_s = 5\n\
         grace_s = 10\nsafety_factor = 1.0\n",
    );
    std::fs::write(&job, body).expect("job");
    let out = tmp.path().join("night-%j.out");
    let export = format!(
        "ALL,TIDEMILL_JOB={},TIDEMILL_LAUNCH={},TIDEMILL_TEST_DELAY=*:0.4,RAYON_NUM_THREADS=1,\
         RUST_LOG=warn,TIDEMILL_RDZV_PORT={}",
        job.display(),
        env!("CARGO_BIN_EXE_launch"),
        free_port()
    );
    let id = sh(&format!(
        "cd {} && sbatch --parsable --time=1 --signal=B:USR1@30 --begin=now --output={} \
         --export='{export}' {}",
        tmp.path().display(),
        out.display(),
        root.join("examples/deploy/slurm/tidal.sbatch").display()
    ));
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut restarts = 0;
    loop {
        let state = field(&id, "JobState");
        if state == "COMPLETED" || state == "FAILED" || state == "CANCELLED" {
            println!("{}", sh(&format!("scontrol show job {id}")));
            break;
        }
        let r: u32 = field(&id, "Restarts").parse().unwrap_or(0);
        if state == "PENDING" && r > 0 {
            // A requeued night: Slurm holds it for its requeue delay; start it now.
            restarts = r;
            let _ = Command::new("scontrol")
                .args(["update", &format!("JobId={id}"), "StartTime=now"])
                .status();
        }
        if Instant::now() > deadline {
            let _ = Command::new("scancel").arg(&id).status();
            panic!("the Slurm job did not complete within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = std::fs::read_to_string(tmp.path().join(format!("night-{id}.out"))).expect("log");
    println!("{log}");
    assert_eq!(field(&id, "JobState"), "COMPLETED", "{log}");
    assert!(restarts >= 1, "requeued at least once: {log}");
    assert!(log.contains("yielded; requeueing"), "{log}");
    assert!(log.contains("training finished"), "{log}");
    let run = tmp.path().join("run");
    let ev = run_events(&run);
    let closes: Vec<&serde_json::Value> =
        ev.iter().filter(|e| e["event"] == "window_close").collect();
    assert!(closes.len() >= 2, "{closes:?}");
    for e in ev.iter().filter(|e| e["event"] == "gpus_released") {
        assert!(e["margin_s"].as_f64() > Some(0.0), "{e}");
    }
    let got: BTreeMap<u64, f64> = step_losses(&run);
    assert_eq!(got.len(), reference.len());
    for (step, want) in &reference {
        assert!(
            rel_diff(got[step], *want) <= 1e-5,
            "step {step}: {} vs {want}",
            got[step]
        );
    }
    println!("Slurm: {} nights, {} requeues", closes.len(), restarts);
}
