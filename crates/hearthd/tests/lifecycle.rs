//! The real daemon, the real CLI, a real VMM process (hearth-testvmm, or
//! `HEARTH_TEST_VMM`), in a network namespace of its own: the whole
//! lifecycle, a VMM that crashes, a daemon that is SIGKILLed, and bad input
//! that must leave nothing behind. Run as root.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{TestEnv, alive, require_root};

#[test]
fn whole_lifecycle_through_the_cli() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("life");
    env.start_daemon();
    let kernel = env.kernel.display().to_string();
    let rootfs = env.rootfs.display().to_string();
    let id = env.hearth_ok(&[
        "create", "web", "--kernel", &kernel, "--rootfs", &rootfs, "--vcpus", "2", "--memory",
        "256",
    ]);
    assert_eq!(id.trim().len(), 36, "create prints the id: {id}");
    assert!(env.hearth_ok(&["ls"]).contains("created"));

    env.hearth_ok(&["start", "web"]);
    let vm = env.vm("web");
    assert_eq!(vm["state"], "running");
    let pid = vm["runtime"]["pid"].as_u64().unwrap();
    assert!(alive(pid));
    let sock = vm["runtime"]["api_socket"].as_str().unwrap().to_owned();
    assert!(std::path::Path::new(&sock).exists());
    // The VMM runs in its own session, so the daemon's death cannot take it.
    let sid = rustix::process::getsid(rustix::process::Pid::from_raw(pid as i32)).unwrap();
    assert_eq!(sid.as_raw_nonzero().get() as u64, pid);

    let ls = env.hearth_ok(&["ls"]);
    assert!(ls.contains("web") && ls.contains("running"), "{ls}");
    let inspect: serde_json::Value =
        serde_json::from_str(&env.hearth_ok(&["inspect", "web"])).unwrap();
    assert_eq!(inspect["runtime"]["pid"], pid);
    let json_ls: serde_json::Value =
        serde_json::from_str(&env.hearth_ok(&["--json", "ls"])).unwrap();
    assert_eq!(json_ls[0]["name"], "web");

    // The console has the VMM's output.
    let start = std::time::Instant::now();
    loop {
        let logs = env.hearth_ok(&["logs", "web"]);
        if !logs.trim().is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "console stayed empty"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Start twice is a conflict.
    let out = env.hearth(&["start", "web"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("running"));

    env.hearth_ok(&["stop", "web"]);
    let vm = env.vm("web");
    assert_eq!(vm["state"], "stopped");
    assert!(!alive(pid), "VMM still alive after stop");
    assert!(
        !std::path::Path::new(&sock).exists(),
        "API socket left behind"
    );
    assert!(vm["runtime"]["pid"].is_null());
    let (_, events) = env.api("GET", "/v1/vms/web/events", None);
    let tos: Vec<_> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "transition")
        .map(|e| e["to"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        tos,
        ["created", "starting", "running", "stopping", "stopped"]
    );

    env.hearth_ok(&["rm", "web"]);
    assert!(env.vm_dirs().is_empty(), "VM dir left: {:?}", env.vm_dirs());
    assert_eq!(env.api("GET", "/v1/vms/web", None).0, 404);
    // Only the daemon mentions the test dir now.
    let daemon = env.daemon.as_ref().unwrap().id();
    assert_eq!(env.processes(), vec![daemon]);
}

#[test]
fn run_kill_follow_logs_and_force_delete() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("run");
    env.start_daemon();
    let kernel = env.kernel.display().to_string();
    let rootfs = env.rootfs.display().to_string();
    env.hearth_ok(&["run", "a", "--kernel", &kernel, "--rootfs", &rootfs]);
    let pid = env.vm("a")["runtime"]["pid"].as_u64().unwrap();

    // `logs -f` streams until the VM stops, then exits by itself.
    let mut follow = std::process::Command::new(common::bin("hearth"))
        .args(["--socket"])
        .arg(&env.socket)
        .args(["logs", "-f", "a"])
        .env("HEARTH_CONFIG", "/dev/null")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    env.hearth_ok(&["kill", "a"]);
    assert!(!alive(pid));
    let mut out = String::new();
    follow
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(follow.wait().unwrap().success());
    assert!(!out.is_empty(), "follow printed nothing");

    env.hearth_ok(&["start", "a"]);
    let pid = env.vm("a")["runtime"]["pid"].as_u64().unwrap();
    let out = env.hearth(&["rm", "a"]);
    assert!(!out.status.success(), "rm of a running VM must be refused");
    assert!(alive(pid));
    env.hearth_ok(&["rm", "--force", "a"]);
    assert!(!alive(pid));
    assert!(env.vm_dirs().is_empty());
}

#[test]
fn vmm_that_crashes_after_instance_start_is_noticed_and_cleaned() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("crash");
    env.daemon_env
        .push(("HEARTH_TESTVMM_CRASH".into(), "after-start:300".into()));
    env.start_daemon();
    let (s, v) = env.api("POST", "/v1/vms", Some(env.create_body("c")));
    assert_eq!(s, 201, "{v}");
    let (s, v) = env.api("POST", "/v1/vms/c/start", None);
    assert_eq!(s, 200, "{v}");
    let pid = v["runtime"]["pid"].as_u64().unwrap();
    let sock = v["runtime"]["api_socket"].as_str().unwrap().to_owned();
    let vm = env.wait_state("c", "stopped");
    assert!(!alive(pid));
    assert!(vm["runtime"]["pid"].is_null());
    assert!(!std::path::Path::new(&sock).exists());
    let (_, events) = env.api("GET", "/v1/vms/c/events", None);
    let last = events.as_array().unwrap().last().unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(last.contains("on its own"), "{last}");
}

#[test]
fn daemon_sigkill_and_restart_keeps_the_vm_running() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("restart");
    env.start_daemon();
    assert_eq!(
        env.api("POST", "/v1/vms", Some(env.create_body("keep"))).0,
        201
    );
    assert_eq!(
        env.api("POST", "/v1/vms", Some(env.create_body("dies"))).0,
        201
    );
    assert_eq!(env.api("POST", "/v1/vms/keep/start", None).0, 200);
    assert_eq!(env.api("POST", "/v1/vms/dies/start", None).0, 200);
    let keep = env.vm("keep")["runtime"]["pid"].as_u64().unwrap();
    let dies = env.vm("dies")["runtime"]["pid"].as_u64().unwrap();

    env.kill_daemon();
    assert!(alive(keep), "the VMM died with the daemon");
    // One VMM dies while the daemon is down.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(dies as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    // A second daemon is refused while... none runs now; the stale socket
    // file the dead one left is removed at start.
    assert!(env.socket.exists());
    env.start_daemon();

    let vm = env.vm("keep");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["runtime"]["pid"], keep);
    let vm = env.vm("dies");
    assert_eq!(vm["state"], "stopped");
    let (_, events) = env.api("GET", "/v1/vms/dies/events", None);
    assert_eq!(
        events.as_array().unwrap().last().unwrap()["reason"],
        "exited while hearthd was down"
    );

    // A clean daemon shutdown leaves VMs running too.
    assert!(env.stop_daemon().success());
    assert!(alive(keep));
    env.start_daemon();
    let (s, v) = env.api(
        "POST",
        "/v1/vms/keep/stop",
        Some(serde_json::json!({"timeout_secs": 5})),
    );
    assert_eq!(s, 200, "{v}");
    assert!(!alive(keep));
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("twice");
    env.start_daemon();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearthd"))
        .arg("--state-dir")
        .arg(env.dir.path().join("other-state"))
        .arg("--socket")
        .arg(&env.socket)
        .arg("--vmm-binary")
        .arg(common::vmm_binary())
        .env("HEARTH_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearthd"))
        .arg("--state-dir")
        .arg(&env.state_dir)
        .arg("--socket")
        .arg(env.dir.path().join("other.sock"))
        .arg("--vmm-binary")
        .arg(common::vmm_binary())
        .env("HEARTH_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another hearthd holds"));
    // The first one still answers.
    assert_eq!(env.api("GET", "/v1/health", None).0, 200);
}

#[test]
fn bad_input_gets_a_4xx_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("bad");
    env.start_daemon();
    let missing = env.dir.path().join("missing").display().to_string();
    let mut cases: Vec<(serde_json::Value, &str)> = Vec::new();
    for name in ["", "Bad", "-x", "a_b", &"a".repeat(64)] {
        let mut b = env.create_body("x");
        b["name"] = name.into();
        cases.push((b, "name"));
    }
    let mut b = env.create_body("x");
    b["spec"]["vcpus"] = 3.into();
    cases.push((b, "vcpus"));
    let mut b = env.create_body("x");
    b["spec"]["memory_mib"] = 1.into();
    cases.push((b, "memory_mib"));
    let mut b = env.create_body("x");
    b["spec"]["kernel"] = missing.clone().into();
    cases.push((b, "kernel"));
    let mut b = env.create_body("x");
    b["spec"]["rootfs"] = missing.into();
    cases.push((b, "rootfs"));
    let mut b = env.create_body("x");
    b["spec"]["rootfs"] = env.dir.path().display().to_string().into();
    cases.push((b, "rootfs"));
    for (body, field) in cases {
        let (s, v) = env.api("POST", "/v1/vms", Some(body.clone()));
        assert_eq!(s, 400, "{body}: {v}");
        assert_eq!(v["code"], "bad_request");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "{field}: {v}"
        );
    }
    let (s, v) = env.api("POST", "/v1/vms", Some(serde_json::json!({"name": "x"})));
    assert_eq!(s, 400, "{v}");

    assert_eq!(env.api("GET", "/v1/vms/nope", None).0, 404);
    assert_eq!(env.api("POST", "/v1/vms/nope/start", None).0, 404);
    assert_eq!(env.api("DELETE", "/v1/vms/nope", None).0, 404);

    // The CLI shows the daemon's message on one line.
    let out = env.hearth(&["start", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM with id or name \"nope\""));

    let (_, list) = env.api("GET", "/v1/vms", None);
    assert_eq!(list, serde_json::json!([]), "a refused create left a row");
    assert!(env.vm_dirs().is_empty());

    // Wrong-state operations change nothing.
    assert_eq!(
        env.api("POST", "/v1/vms", Some(env.create_body("ok"))).0,
        201
    );
    assert_eq!(env.api("POST", "/v1/vms/ok/stop", None).0, 409);
    assert_eq!(env.api("POST", "/v1/vms/ok/start", None).0, 200);
    let pid = env.vm("ok")["runtime"]["pid"].as_u64().unwrap();
    let (s, v) = env.api("POST", "/v1/vms/ok/start", None);
    assert_eq!((s, v["code"].as_str()), (409, Some("conflict")));
    assert_eq!(env.api("DELETE", "/v1/vms/ok", None).0, 409);
    assert_eq!(
        env.api("POST", "/v1/vms", Some(env.create_body("ok"))).0,
        409
    );
    assert!(alive(pid));
    assert_eq!(env.vm("ok")["runtime"]["pid"], pid);
    assert_eq!(env.api("DELETE", "/v1/vms/ok?force=true", None).0, 204);
    assert!(!alive(pid));
}

#[test]
fn a_vmm_that_refuses_its_config_leaves_nothing() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("refuse");
    env.start_daemon();
    assert_eq!(
        env.api("POST", "/v1/vms", Some(env.create_body("f"))).0,
        201
    );
    // The kernel vanishes between create and start: Firecracker answers
    // PUT /boot-source with 400 and a fault_message.
    std::fs::remove_file(&env.kernel).unwrap();
    let (s, v) = env.api("POST", "/v1/vms/f/start", None);
    assert_eq!(s, 500, "{v}");
    let chain = v.to_string();
    assert!(chain.contains("boot-source"), "{chain}");
    let vm = env.vm("f");
    assert_eq!(vm["state"], "error");
    assert!(vm["last_error"].as_str().unwrap().contains("boot-source"));
    assert!(vm["runtime"]["pid"].is_null());
    assert!(vm["runtime"]["api_socket"].is_null());
    let daemon = env.daemon.as_ref().unwrap().id();
    assert_eq!(env.processes(), vec![daemon], "a VMM was left running");
}
