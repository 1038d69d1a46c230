//! The stats poller against the real daemon and a real VMM process:
//! `hearth stats` shows a running VM's usage read from /proc, and a TTL
//! ends a VM even when the daemon was SIGKILLed and restarted in between,
//! because the deadline is in the store. Run as root.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns panic on failure by design

mod common;

use std::time::{Duration, Instant};

use common::{TestEnv, alive, require_root};

/// A daemon whose poller runs every 100 ms, so the tests wait little.
fn env(tag: &str) -> TestEnv {
    let mut env = TestEnv::new(tag);
    let config = env.dir.path().join("hearth.toml");
    std::fs::write(&config, "poll_interval_ms = 100\n").unwrap();
    env.daemon_env
        .push(("HEARTH_CONFIG".into(), config.display().to_string()));
    env
}

/// Polls `hearth --json stats <vm>` until `ready` accepts the answer.
fn wait_stats(
    env: &TestEnv,
    vm: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s: serde_json::Value =
            serde_json::from_str(&env.hearth_ok(&["--json", "stats", vm])).unwrap();
        if ready(&s) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "stats of {vm} never ready: {s}\n{}",
            env.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stats_show_a_running_vms_usage() {
    if !require_root() {
        return;
    }
    let mut env = env("stats");
    env.start_daemon();
    let kernel = env.kernel.display().to_string();
    let rootfs = env.rootfs.display().to_string();
    env.hearth_ok(&["run", "web", "--kernel", &kernel, "--rootfs", &rootfs]);
    env.hearth_ok(&["create", "idle", "--kernel", &kernel, "--rootfs", &rootfs]);
    let pid = env.vm("web")["runtime"]["pid"].as_u64().unwrap();

    let s = wait_stats(&env, "web", |s| !s["sampled_at_ms"].is_null());
    assert_eq!(s["state"], "running");
    assert_eq!(s["pid"], pid);
    assert!(s["rss_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["cpu_ms"].as_u64().is_some(), "{s}");
    assert!(s["uptime_ms"].as_u64().is_some(), "{s}");
    // The VMM flushes its metrics at InstanceStart.
    assert!(s["vmm_metrics"]["utc_timestamp_ms"].is_u64(), "{s}");

    let table = env.hearth_ok(&["stats"]);
    let mut lines = table.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["NAME", "STATE", "PID", "CPU", "RSS", "UPTIME", "TTL"]
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    let web = rows.iter().find(|r| r[0] == "web").unwrap();
    assert_eq!(web[1], "running");
    assert_eq!(web[2], pid.to_string());
    assert!(web[3].ends_with('s') && web[4].ends_with("iB"), "{table}");
    let idle = rows.iter().find(|r| r[0] == "idle").unwrap();
    assert_eq!(idle[1..], ["created", "-", "-", "-", "-", "-"], "{table}");

    let (code, all) = env.api("GET", "/v1/stats", None);
    assert_eq!(code, 200);
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(env.api("GET", "/v1/vms/ghost/stats", None).0, 404);

    // A TTL set later, then removed again.
    let out = env.hearth_ok(&["ttl", "web", "2h"]);
    assert!(
        out.starts_with("web ttl ") && (out.contains(" (in 2h)") || out.contains(" (in 1h 59m")),
        "{out}"
    );
    assert!(env.vm("web")["ttl_deadline_ms"].is_i64());
    assert_eq!(
        env.hearth_ok(&["ttl", "web", "none"]).trim(),
        "web ttl none"
    );
    assert!(env.vm("web")["ttl_deadline_ms"].is_null());
    let bad = env.hearth(&["ttl", "web", "0s"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("ttl_secs"));

    env.hearth_ok(&["stop", "web"]);
    let s = wait_stats(&env, "web", |s| s["state"] == "stopped");
    assert!(s["pid"].is_null() && s["cpu_ms"].is_null(), "{s}");
    assert!(!alive(pid));
}

#[test]
fn a_ttl_ends_the_vm_across_a_daemon_restart() {
    if !require_root() {
        return;
    }
    let mut env = env("ttl");
    env.start_daemon();
    let kernel = env.kernel.display().to_string();
    let rootfs = env.rootfs.display().to_string();
    env.hearth_ok(&[
        "run", "brief", "--kernel", &kernel, "--rootfs", &rootfs, "--ttl", "3s",
    ]);
    let vm = env.vm("brief");
    let pid = vm["runtime"]["pid"].as_u64().unwrap();
    let deadline = vm["ttl_deadline_ms"].as_i64().unwrap();
    assert_eq!(deadline, vm["created_at_ms"].as_i64().unwrap() + 3000);

    // The daemon dies before the deadline; the VM keeps running.
    env.kill_daemon();
    assert!(alive(pid));
    env.start_daemon();
    assert_eq!(env.vm("brief")["state"], "running", "re-adopted");

    env.wait_state("brief", "stopped");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(now_ms >= deadline, "stopped before its deadline");
    assert!(!alive(pid), "VMM still alive after the TTL");
    // The poller clears the lease just after the stop it fired returns.
    let cleared = (0..100).any(|_| {
        let vm = env.vm("brief");
        if vm["ttl_deadline_ms"].is_null() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
        false
    });
    assert!(cleared, "ttl not cleared: {}", env.vm("brief"));
    let (_, events) = env.api("GET", "/v1/vms/brief/events", None);
    let reasons: Vec<_> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("ttl expired: ")),
        "{reasons:?}"
    );

    // The TTL fired once: a restart runs on.
    env.hearth_ok(&["start", "brief"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(env.vm("brief")["state"], "running");
    env.hearth_ok(&["rm", "--force", "brief"]);
}
