//! Host resources with real kernel objects: a tap per VM with its
//! addresses, NAT and port forwarding in nftables, a copy-on-write root
//! disk — and real traffic through them, with hearth-testvmm playing the
//! guest's network stack on the tap (it reads the `ip=` kernel argument).
//! The host is a network namespace with a veth uplink to a second one
//! that plays the internet. Run as root.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns panic on failure by design

mod common;

use std::io::{BufRead, Write};

use common::{HOST_UPLINK_IP, OUTER_IP, TestEnv, in_ns, ns_cmd, require_root, tcp_line};

/// Ids of the VMs with marked elements in hearth's table.
fn marked(env: &TestEnv) -> Vec<String> {
    common::marked_vms(&env.netns)
}

fn addrs_of(env: &TestEnv, dev: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", &env.netns, "-j", "addr", "show", "dev", dev])
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["family"] == "inet")
                .map(|i| format!("{}/{}", i["local"].as_str().unwrap(), i["prefixlen"]))
                .collect()
        })
        .unwrap_or_default()
}

fn sha(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn nat_and_port_forward_carry_traffic_and_stop_removes_everything() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("net");
    // Some data in the image, to check it is never modified.
    std::fs::write(&env.rootfs, vec![7u8; 1 << 20]).unwrap();
    let image_before = sha(&env.rootfs);
    env.start_daemon();
    let kernel = env.kernel.display().to_string();
    let rootfs = env.rootfs.display().to_string();
    env.hearth_ok(&[
        "run",
        "web",
        "--kernel",
        &kernel,
        "--rootfs",
        &rootfs,
        "--cap",
        "nat",
        "--cap",
        "port-forward=8080:7",
    ]);
    let vm: serde_json::Value = serde_json::from_str(&env.hearth_ok(&["inspect", "web"])).unwrap();
    let rt = &vm["runtime"];
    let tap = rt["tap"].as_str().unwrap().to_owned();
    let guest = rt["guest_ip"].as_str().unwrap().to_owned();
    let host = rt["host_ip"].as_str().unwrap().to_owned();
    assert!(tap.starts_with("hth"), "{rt}");
    assert!(rt["mac"].as_str().unwrap().starts_with("06:"));
    assert!(
        !rt["firewall_handles"].as_array().unwrap().is_empty(),
        "{rt}"
    );
    let disk = std::path::PathBuf::from(rt["disk"]["device"].as_str().unwrap());
    assert!(disk.starts_with(&env.state_dir), "{disk:?}");
    assert_eq!(addrs_of(&env, &tap), vec![format!("{host}/30")]);
    assert_eq!(marked(&env), [vm["id"].as_str().unwrap()]);

    // The guest answers on its address, through the tap.
    let g = guest.clone();
    assert_eq!(
        in_ns(&env.netns, move || tcp_line(&format!("{g}:7"), "direct\n")).unwrap(),
        "direct\n"
    );
    // Port forward from the host itself (localhost) and from beyond the uplink.
    assert_eq!(
        in_ns(&env.netns, || tcp_line("127.0.0.1:8080", "local\n")).unwrap(),
        "local\n"
    );
    let up = format!("{HOST_UPLINK_IP}:8080");
    assert_eq!(
        in_ns(&env.outer_ns, move || tcp_line(&up, "remote\n")).unwrap(),
        "remote\n"
    );

    // NAT: the guest's outbound connection reaches the outside world with
    // the uplink's address as its source.
    let listener = in_ns(&env.outer_ns, || {
        std::net::TcpListener::bind((OUTER_IP, 9000)).unwrap()
    });
    let seen = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        s.write_all(b"pong\n").unwrap();
        (peer, line)
    });
    let g = guest.clone();
    let answer = in_ns(&env.netns, move || {
        tcp_line(&format!("{g}:7"), &format!("CONNECT {OUTER_IP}:9000\n"))
    })
    .unwrap();
    assert!(answer.starts_with("OK"), "{answer}");
    let (peer, line) = seen.join().unwrap();
    assert_eq!(peer.ip().to_string(), HOST_UPLINK_IP, "not masqueraded");
    assert!(line.contains(&guest), "{line}");

    env.hearth_ok(&["stop", "web"]);
    let vm = env.vm("web");
    assert!(
        vm["runtime"]["tap"].is_null() && vm["runtime"]["firewall"].is_null(),
        "{vm}"
    );
    assert!(vm["runtime"]["disk"].is_null(), "{vm}");
    assert!(marked(&env).is_empty(), "chains left: {:?}", marked(&env));
    assert!(addrs_of(&env, &tap).is_empty(), "tap kept its address");
    assert!(in_ns(&env.netns, || tcp_line("127.0.0.1:8080", "x\n")).is_err());
    let g = guest.clone();
    assert!(in_ns(&env.netns, move || tcp_line(&format!("{g}:7"), "x\n")).is_err());

    // The VM's disk stays until rm (its writes survive a restart); the
    // image is untouched.
    assert!(disk.exists());
    env.hearth_ok(&["start", "web"]);
    assert_eq!(
        env.vm("web")["runtime"]["disk"]["device"].as_str().unwrap(),
        disk.to_str().unwrap()
    );
    env.hearth_ok(&["rm", "--force", "web"]);
    assert!(!disk.exists());
    assert_eq!(sha(&env.rootfs), image_before, "the image was modified");
    assert!(marked(&env).is_empty());
}

#[test]
fn conflicting_port_forwards_are_refused_at_create() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("pfc");
    env.start_daemon();
    let mut a = env.create_body("a");
    a["spec"]["capabilities"] = serde_json::json!(["port-forward=8081:7"]);
    assert_eq!(env.api("POST", "/v1/vms", Some(a)).0, 201);
    let mut b = env.create_body("b");
    b["spec"]["capabilities"] = serde_json::json!(["port-forward=8081/tcp:22"]);
    let (s, v) = env.api("POST", "/v1/vms", Some(b));
    assert_eq!(s, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("8081/tcp"), "{v}");
    let mut c = env.create_body("c");
    c["spec"]["capabilities"] = serde_json::json!(["teleport"]);
    assert_eq!(env.api("POST", "/v1/vms", Some(c)).0, 400);
    let (_, list) = env.api("GET", "/v1/vms", None);
    assert_eq!(list.as_array().unwrap().len(), 1);
}

/// The bug this design exists for: the tap was reserved and the NAT rules
/// installed, then the daemon died before anything else happened. Its
/// memory is gone; the store is not. After a restart, teardown finds the
/// tap and the rules in the VM's record and removes both.
#[test]
fn daemon_killed_after_nat_rules_leaks_nothing_after_restart() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("bug");
    // A "VMM" that kills hearthd (its parent) as soon as the VM's rules
    // exist — right after the firewall step, before any PUT — and exits.
    // (The VMM is spawned before the host side, so it waits for it.)
    let killer = env.dir.path().join("killer-vmm");
    std::fs::write(
        &killer,
        "#!/bin/sh\nfor i in $(seq 1 1000); do\n  nft list table ip hearth 2>/dev/null | grep -q 'hearth:vm:' && break\n  sleep 0.005\ndone\nkill -9 $PPID\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&killer, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.vmm_override = Some(killer);
    env.start_daemon();
    let mut body = env.create_body("victim");
    body["spec"]["capabilities"] = serde_json::json!(["nat", "port-forward=8082:7"]);
    assert_eq!(env.api("POST", "/v1/vms", Some(body)).0, 201);
    let _ = env.hearth(&["start", "victim"]);
    let status = env.daemon.as_mut().unwrap().wait().unwrap();
    assert!(!status.success(), "hearthd should have been killed");
    env.daemon = None;

    // The leak as it stands: a tap with its address and the VM's chains.
    let taps: Vec<String> = ns_cmd(&env.netns, &["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_owned())
        .filter(|n| n.starts_with("hth") && n != common::UPLINK)
        .collect();
    assert_eq!(taps.len(), 1, "{taps:?}");
    assert!(!addrs_of(&env, &taps[0]).is_empty());
    assert!(!marked(&env).is_empty());

    env.vmm_override = None;
    env.start_daemon();
    let vm = env.vm("victim");
    assert!(matches!(vm["state"].as_str(), Some("stopped")), "{vm}");
    assert!(
        vm["runtime"]["tap"].is_null() && vm["runtime"]["firewall"].is_null(),
        "{vm}"
    );
    assert!(marked(&env).is_empty(), "rules leaked: {:?}", marked(&env));
    assert!(addrs_of(&env, &taps[0]).is_empty(), "tap still configured");
    // And the VM starts normally afterwards.
    env.hearth_ok(&["start", "victim"]);
    env.hearth_ok(&["rm", "--force", "victim"]);
    assert!(marked(&env).is_empty());
}
