//! The TCP communicator under faults: deadlines that name the silent rank (also a real
//! SIGSTOPped process), lost peers, mismatched collectives, stray connections, bad arguments.

use crate::common::*;
use std::time::{Duration, Instant};

use parallel::{Collectives, Communicator, Error, ReduceOp, TcpComm, TcpOptions};
use tidemill_parallel as parallel;

#[test]
fn bad_arguments_are_refused_without_traffic() {
    let comms = group(2, Duration::from_secs(5));
    let c = &comms[0];
    assert!(matches!(c.split(&[1]), Err(Error::InvalidArgument(_))));
    assert!(matches!(c.split(&[1, 0]), Err(Error::InvalidArgument(_))));
    assert!(matches!(
        c.broadcast(&mut [0f32; 2], 2),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        c.send(&[0f32; 2], 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        c.reduce_scatter(&[0f32; 3], ReduceOp::Sum),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        c.all_to_all(&[0f32; 3], &[1, 1]),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(c.seq(), 0);
    // Still in step afterwards.
    on_all(&comms, |_, c| c.barrier().expect("barrier"));
}

#[test]
fn a_stray_connection_is_refused() {
    use std::io::Write;
    let listeners: Vec<_> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<_> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let mut stray = std::net::TcpStream::connect(addrs[0]).expect("stray");
    stray.write_all(&[7u8; 32]).expect("garbage");
    let opts = TcpOptions {
        nonce: 42,
        connect_timeout: Duration::from_secs(10),
        ..TcpOptions::default()
    };
    let comms: Vec<TcpComm> = std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, opts) = (&addrs, opts.clone());
                s.spawn(move || TcpComm::connect(r, addrs, l, opts).expect("connect"))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let outs = on_all(&comms, |r, c| {
        let mut x = [r as f32 + 1.0];
        c.all_reduce(&mut x, ReduceOp::Sum).expect("all_reduce");
        x[0]
    });
    assert_eq!(outs, [3.0, 3.0]);
}

#[test]
fn a_rank_that_never_comes_is_named_by_the_timeout() {
    let timeout = Duration::from_millis(300);
    // Small (tree) and large (ring) all-reduce: ranks 0 and 1 wait on each other and on 2.
    for len in [10, 200_000] {
        let comms = group(3, timeout);
        // Rank 2 holds its connections, silent, until the others have failed.
        let done = std::sync::Barrier::new(3);
        let outs = on_all(&comms, |r, c| {
            if r == 2 {
                done.wait();
                return None;
            }
            let start = Instant::now();
            let mut x = vec![1f32; len];
            let err = c
                .all_reduce(&mut x, ReduceOp::Sum)
                .expect_err("rank 2 never came");
            let took = start.elapsed();
            done.wait();
            Some((err, took))
        });
        for (r, out) in outs.iter().enumerate().take(2) {
            let (err, took) = out.as_ref().expect("an error");
            eprintln!("len {len}, rank {r} after {took:?}: {err}");
            assert!(
                matches!(err, Error::Timeout { .. }),
                "len {len}, rank {r}: {err}"
            );
            assert_eq!(named(err), Some((2, r)), "len {len}, rank {r}: {err}");
            let slack = Duration::from_millis(700);
            assert!(
                *took >= timeout && *took < timeout + slack,
                "rank {r} took {took:?}"
            );
        }
    }
}

#[test]
fn a_dropped_peer_is_named() {
    let timeout = Duration::from_secs(3);
    let mut comms = group(3, timeout);
    drop(comms.pop());
    let outs = on_all(&comms, |_, c| {
        let start = Instant::now();
        let mut x = vec![1f32; 100];
        let err = c
            .all_reduce(&mut x, ReduceOp::Sum)
            .expect_err("rank 2 is gone");
        (err, start.elapsed())
    });
    for (r, (err, took)) in outs.iter().enumerate() {
        assert!(
            matches!(err, Error::PeerLost { .. } | Error::Timeout { .. }),
            "rank {r}: {err}"
        );
        assert_eq!(named(err), Some((2, r)), "rank {r}: {err}");
        assert!(
            *took < timeout + Duration::from_secs(2),
            "rank {r} took {took:?}"
        );
        eprintln!("rank {r} after {took:?}: {err}");
        // Later collectives fail at once.
        let again = comms[r].barrier().expect_err("the data plane is down");
        assert_eq!(named(&again).map(|n| n.0), Some(2), "{again}");
    }
}

#[test]
fn different_collectives_are_a_mismatch() {
    let timeout = Duration::from_millis(500);
    // Rank 1 broadcasts from itself while rank 0 all-reduces: rank 0 sees a foreign frame.
    let comms = group(2, timeout);
    let outs = on_all(&comms, |r, c| {
        let mut x = vec![1f32; 8];
        if r == 0 {
            c.all_reduce(&mut x, ReduceOp::Sum)
        } else {
            c.broadcast(&mut x, 1)
        }
    });
    let err = outs[0].as_ref().expect_err("rank 0 must notice");
    assert!(
        matches!(
            err,
            Error::Mismatch {
                peer: 1,
                rank: 0,
                ..
            }
        ),
        "{err}"
    );
    eprintln!("{err}");

    // Both wait on each other (broadcast from 0 vs all_reduce): a deadlock, reported as a
    // mismatch once the deadline passes.
    let comms = group(2, timeout);
    let start = Instant::now();
    let outs = on_all(&comms, |r, c| {
        let mut x = vec![1f32; 8];
        if r == 0 {
            c.all_reduce(&mut x, ReduceOp::Sum)
        } else {
            c.broadcast(&mut x, 0)
        }
    });
    assert!(
        start.elapsed() < timeout + Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    for (r, out) in outs.iter().enumerate() {
        let err = out.as_ref().expect_err("deadlock");
        assert!(matches!(err, Error::Mismatch { .. }), "rank {r}: {err}");
        assert_eq!(named(err), Some((1 - r, r)), "rank {r}: {err}");
        eprintln!("{err}");
    }
}

const CHILD_ENV: &str = "TIDEMILL_TCP_PROPS_CHILD";

/// Rank 2 of `a_stopped_process_is_named`, run in a child process (a no-op otherwise):
/// prints its address, reads everyone's, then all-reduces until the group breaks.
#[test]
fn child_rank_of_the_sigstop_test() {
    use std::io::BufRead;
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    println!("ADDR {}", listener.local_addr().expect("addr"));
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .expect("addresses");
    let addrs: Vec<std::net::SocketAddr> = line
        .trim()
        .split(',')
        .map(|a| a.parse().expect("addr"))
        .collect();
    let opts = TcpOptions {
        timeout: Duration::from_secs(5),
        ..TcpOptions::default()
    };
    let comm = TcpComm::connect(2, &addrs, listener, opts).expect("connect");
    let mut x = [1f32];
    while comm.all_reduce(&mut x, ReduceOp::Sum).is_ok() {
        x = [1.0];
    }
}

/// Kills and reaps the child process however the test ends.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stopped_process_is_named() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let timeout = Duration::from_millis(500);
    let listeners: Vec<_> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "faults::child_rank_of_the_sigstop_test",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn rank 2");
    let mut child = Reaper(child);
    let mut lines = BufReader::new(child.0.stdout.take().expect("stdout")).lines();
    let child_addr = loop {
        let line = lines
            .next()
            .expect("rank 2 printed its address")
            .expect("line");
        // The harness prints `test NAME ... ` on the same line.
        if let Some(at) = line.find("ADDR ") {
            break line[at + 5..].trim().to_string();
        }
    };
    let mut addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    addrs.push(child_addr);
    writeln!(child.0.stdin.take().expect("stdin"), "{}", addrs.join(",")).expect("send addresses");
    let addrs: Vec<std::net::SocketAddr> = addrs.iter().map(|a| a.parse().expect("addr")).collect();
    let opts = TcpOptions {
        timeout,
        ..TcpOptions::default()
    };
    let comms: Vec<TcpComm> = std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, opts) = (&addrs, opts.clone());
                s.spawn(move || TcpComm::connect(r, addrs, l, opts).expect("connect"))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let sum = |c: &TcpComm| {
        let mut x = [1f32];
        c.all_reduce(&mut x, ReduceOp::Sum).map(|()| x[0])
    };
    for _ in 0..3 {
        assert_eq!(
            on_all(&comms, |_, c| sum(c).expect("all_reduce with rank 2")),
            [3.0, 3.0]
        );
    }
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &child.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill {sig}");
    };
    signal("-STOP");
    // Rank 2 may already have sent its part of the next all-reduce: that one can succeed.
    let outs = on_all(&comms, |_, c| {
        let start = Instant::now();
        for _ in 0..3 {
            if let Err(e) = sum(c) {
                return (e, start.elapsed());
            }
        }
        panic!("all-reduces went on with rank 2 stopped");
    });
    drop(child);
    for (r, (err, took)) in outs.iter().enumerate() {
        eprintln!("rank {r} after {took:?}: {err}");
        assert!(matches!(err, Error::Timeout { .. }), "rank {r}: {err}");
        assert_eq!(named(err), Some((2, r)), "rank {r}: {err}");
        assert!(
            *took < 2 * timeout + Duration::from_secs(1),
            "rank {r} took {took:?}"
        );
    }
}
