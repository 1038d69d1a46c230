//! Reconcile and the orphan sweep with the real daemon: SIGKILL it with
//! VMs running, kill some VMMs and leave orphans of every kind while it is
//! down, restart it, and check that the live VMs were re-adopted untouched,
//! the dead ones cleaned, the orphans removed, and `hearth doctor --leaks`
//! finds nothing. Run as root.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns panic on failure by design

mod common;

use std::process::Command;
use std::time::Duration;

use common::{TestEnv, alive, ns_cmd, require_root};

fn kill9(pid: u64) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
}

fn links(env: &TestEnv) -> Vec<String> {
    ns_cmd(&env.netns, &["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_owned())
        .collect()
}

fn ruleset(env: &TestEnv) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &env.netns, "nft", "list", "ruleset"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn restart_readopts_live_vms_cleans_dead_ones_and_sweeps_orphans() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("recon");
    env.start_daemon();
    for name in ["a", "b", "c"] {
        let mut body = env.create_body(name);
        body["spec"]["capabilities"] = serde_json::json!(["nat"]);
        assert_eq!(env.api("POST", "/v1/vms", Some(body)).0, 201);
        assert_eq!(
            env.api("POST", &format!("/v1/vms/{name}/start"), None).0,
            200
        );
    }
    let pid = |n: &str| env.vm(n)["runtime"]["pid"].as_u64().unwrap();
    let (a, b, c) = (pid("a"), pid("b"), pid("c"));
    env.kill_daemon();
    kill9(c);

    // Orphans of every kind, none of them in the store.
    let ghost = uuid::Uuid::now_v7();
    let ghost_dir = env.state_dir.join("vms").join(ghost.to_string());
    std::fs::create_dir_all(&ghost_dir).unwrap();
    ns_cmd(
        &env.netns,
        &["ip", "tuntap", "add", "dev", "hth77", "mode", "tap"],
    );
    common::plant_marked_element(&env.netns, "0000dead-beef-0000-0000-000000000000", "hth78");
    let loop_file = ghost_dir.join("cow.img");
    std::fs::File::create(&loop_file)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&loop_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loop_dev = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let orphan_vmm = Command::new("ip")
        .args(["netns", "exec", &env.netns])
        .arg(common::vmm_binary())
        .arg("--api-sock")
        .arg(ghost_dir.join("api.sock"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let orphan_pid = u64::from(orphan_vmm.id());
    std::thread::sleep(Duration::from_millis(100));
    assert!(alive(orphan_pid));

    env.start_daemon();
    // Live VMs: running, same pids. The dead one: stopped, cleaned.
    for (n, p) in [("a", a), ("b", b)] {
        let vm = env.vm(n);
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["runtime"]["pid"], p);
        assert!(alive(p));
    }
    let vm = env.vm("c");
    assert_eq!(vm["state"], "stopped");
    assert!(vm["runtime"]["tap"].is_null() && vm["runtime"]["firewall"].is_null());
    // Orphans: gone.
    assert!(!alive(orphan_pid), "orphan VMM survived");
    assert!(!ghost_dir.exists(), "orphan VM dir survived");
    assert!(
        !links(&env).contains(&"hth77".to_owned()),
        "orphan tap survived"
    );
    assert!(
        !ruleset(&env).contains("hearth:vm:0000dead-beef"),
        "orphan nft element survived"
    );
    let out = Command::new("losetup")
        .args(["-n", "-O", "BACK-FILE", &loop_dev])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("cow.img"),
        "orphan loop survived"
    );
    let log = env.daemon_log();
    assert!(log.contains("removed orphan"), "{log}");
    // Each removal is an event, and counted.
    let resp = env.raw("GET", "/v1/events");
    let sweeps = resp
        .lines()
        .filter(|l| l.contains("\"kind\":\"sweep\""))
        .count();
    assert_eq!(sweeps, 5, "process, firewall, loop, tap, VM dir: {resp}");
    let metrics = env.raw("GET", "/metrics");
    assert!(
        metrics.contains("hearth_orphans_swept_total{kind=\"tap\"} 1"),
        "{metrics}"
    );

    let out = env.hearth(&["doctor", "--leaks"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no leaks found"));

    for n in ["a", "b", "c"] {
        env.hearth_ok(&["rm", "--force", n]);
    }
    assert!(!alive(a) && !alive(b));
    let mut orphan_vmm = orphan_vmm;
    let _ = orphan_vmm.wait();
}

#[test]
fn a_hung_vmm_is_killed_at_readoption() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("hung");
    // The VMM stops answering its API 300 ms after InstanceStart.
    env.daemon_env
        .push(("HEARTH_TESTVMM_HANG".into(), "after-start:300".into()));
    env.start_daemon();
    assert_eq!(
        env.api("POST", "/v1/vms", Some(env.create_body("h"))).0,
        201
    );
    assert_eq!(env.api("POST", "/v1/vms/h/start", None).0, 200);
    let pid = env.vm("h")["runtime"]["pid"].as_u64().unwrap();
    env.kill_daemon();
    std::thread::sleep(Duration::from_millis(500));
    env.daemon_env.clear();
    env.start_daemon();
    let vm = env.vm("h");
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert!(!alive(pid));
    let (_, events) = env.api("GET", "/v1/vms/h/events", None);
    let last = events.as_array().unwrap().last().unwrap()["reason"].to_string();
    assert!(last.contains("hung"), "{last}");
}

#[test]
fn leaks_and_gc_work_without_the_daemon() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("offl");
    env.start_daemon();
    env.kill_daemon();
    let ghost = env
        .state_dir
        .join("vms")
        .join(uuid::Uuid::now_v7().to_string());
    std::fs::create_dir_all(&ghost).unwrap();
    // The CLI runs in the host namespace of the test env, as hearthd would.
    let run = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &env.netns])
            .arg(common::bin("hearth"))
            .arg("--socket")
            .arg(&env.socket)
            .args(args)
            .env("HEARTH_CONFIG", env.dir.path().join("hearth.toml"))
            .output()
            .unwrap()
    };
    std::fs::write(
        env.dir.path().join("hearth.toml"),
        format!("state_dir = {:?}\n", env.state_dir.display().to_string()),
    )
    .unwrap();
    let out = run(&["doctor", "--leaks"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("hearthd is not running"), "{stderr}");
    assert!(stdout.contains("vm-dir"), "{stdout}");
    assert!(ghost.exists(), "--leaks must not remove anything");
    let out = run(&["gc"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!ghost.exists());
    let out = run(&["doctor", "--leaks"]);
    assert!(out.status.success());
}
