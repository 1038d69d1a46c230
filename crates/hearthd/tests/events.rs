//! The event stream and the metrics endpoint of the real daemon, watched
//! the way an operator would: `hearth events -f` running while a VM is
//! created, started and stopped, and a Prometheus scrape of `/metrics`
//! over the Unix socket. Run as root.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{TestEnv, require_root};
use hearth_api::client::{HttpMethod, request};

#[test]
fn events_follow_sees_a_lifecycle_in_order_and_metrics_count_it() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("events");
    env.start_daemon();

    // `hearth events -f` from the start, printing table rows as they come.
    let mut follow = Command::new(common::bin("hearth"))
        .arg("--socket")
        .arg(&env.socket)
        .args(["events", "-f"])
        .env("HEARTH_CONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });

    let kernel = env.kernel.display().to_string();
    let rootfs = env.rootfs.display().to_string();
    env.hearth_ok(&["create", "web", "--kernel", &kernel, "--rootfs", &rootfs]);
    env.hearth_ok(&["start", "web"]);
    env.hearth_ok(&["stop", "web"]);

    // Rows: SEQ TIME VM FROM TO GEN REASON…; collect until `stopped`.
    let mut lines = Vec::new();
    let mut transitions = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while transitions
        .last()
        .map(|(_, to): &(String, String)| to.as_str())
        != Some("stopped")
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "events -f did not show the stop; got:\n{}\n--- hearthd log:\n{}",
                lines.join("\n"),
                env.daemon_log()
            )
        });
        lines.push(line.clone());
        let cols: Vec<_> = line.split_whitespace().collect();
        if cols[0] == "SEQ" {
            continue;
        }
        let reason = cols[6..].join(" ");
        if !reason.starts_with("teardown:") {
            transitions.push((cols[3].to_owned(), cols[4].to_owned()));
        }
    }
    assert!(lines[0].starts_with("SEQ"), "{lines:?}");
    let pairs: Vec<_> = transitions
        .iter()
        .map(|(f, t)| format!("{f}>{t}"))
        .collect();
    assert_eq!(
        pairs,
        [
            "->created",
            "created>starting",
            "starting>running",
            "running>stopping",
            "stopping>stopped"
        ],
        "{lines:#?}"
    );
    // The stop's teardown is an event too, between stopping and stopped.
    let teardown = lines
        .iter()
        .find(|l| l.contains("teardown: removed vmm pid"))
        .unwrap_or_else(|| panic!("no teardown event: {lines:#?}"));
    assert!(teardown.contains("tap hth"), "{teardown}");

    // Resuming from a seq gives exactly what came after it.
    let second: i64 = lines[2].split_whitespace().next().unwrap().parse().unwrap();
    let resumed = env.hearth_ok(&["events", "web", "--json", "--since", &second.to_string()]);
    let seqs: Vec<i64> = resumed
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    let shown: Vec<i64> = lines[3..]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs, shown);

    // A Prometheus scrape over the socket.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let resp = rt
        .block_on(request(&env.socket, HttpMethod::GET, "/metrics", None))
        .unwrap();
    assert_eq!(resp.status.as_u16(), 200);
    let text = String::from_utf8(resp.body.to_vec()).unwrap();
    for line in [
        r#"hearth_operations_total{op="create",result="ok"} 1"#,
        r#"hearth_operations_total{op="start",result="ok"} 1"#,
        r#"hearth_operations_total{op="stop",result="ok"} 1"#,
        r#"hearth_vms{state="stopped"} 1"#,
        r#"hearth_vms{state="running"} 0"#,
        r#"hearth_operation_duration_seconds_count{op="start"} 1"#,
        "hearth_teardown_failures_total 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("hearth_reconcile_duration_seconds ")),
        "{text}"
    );

    // A daemon shutting down ends the follow stream, so it exits promptly
    // and the follower sees the end of the stream, not an error.
    env.hearth_ok(&["rm", "web"]);
    let t = Instant::now();
    assert!(env.stop_daemon().success());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown waited on the stream"
    );
    let status = follow.wait().unwrap();
    assert!(status.success(), "events -f: {status}");
    reader.join().unwrap();
}
