//! Lifecycle against the fake host and the fake VMM: every failure branch
//! of start unwinds, every teardown fallback is taken.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hearth_api::{CreateVmRequest, Runtime, VmRules, VmSpec, VmState};

use super::*;
use crate::host::net::NetHost;
use crate::store::Transition;

use super::testkit::{Env, env, env_with, host, uplink};

impl Env {
    /// Leaves `vm` as a daemon that died mid-start would: state `starting`
    /// with `rt` as its runtime record.
    fn crashed_mid_start(&self, vm: &Vm, rt: &Runtime) {
        self.l
            .store()
            .transition(
                vm.id,
                vm.generation,
                VmState::Created,
                Transition {
                    to: VmState::Starting,
                    runtime: Some(rt),
                    last_error: None,
                    reason: "start",
                },
            )
            .unwrap();
    }

    fn create(&self, name: &str) -> Vm {
        self.l
            .create(CreateVmRequest {
                name: name.into(),
                spec: self.spec.clone(),
                ttl_secs: None,
            })
            .unwrap()
    }

    fn reasons(&self, name: &str) -> Vec<String> {
        self.l
            .events(name, 0)
            .unwrap()
            .into_iter()
            .map(|e| e.reason)
            .collect()
    }

    fn paths(&self, vm: &Vm) -> VmPaths {
        VmPaths::new(self.l.config(), vm.id)
    }
}

const START_CALLS: [&str; 7] = [
    "PUT /logger",
    "PUT /metrics",
    "PUT /machine-config",
    "PUT /boot-source",
    "PUT /drives",
    "PUT /network-interfaces",
    "InstanceStart",
];

#[tokio::test]
async fn start_then_stop_runs_the_journal_and_releases_everything() {
    let e = env();
    let vm = e.create("a");
    assert_eq!(vm.state, VmState::Created);
    let vm = e.l.start("a").await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(e.vmm.calls(), START_CALLS);
    let pid = vm.runtime.pid.unwrap();
    assert_eq!(e.procs.live(), vec![pid]);
    assert!(vm.runtime.pid_start_time.is_some());
    assert_eq!(vm.runtime.api_socket, Some(e.paths(&vm).api_socket));
    assert!(e.paths(&vm).metrics.exists());

    let vm = e.l.stop("a", None).await.unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert!(e.procs.live().is_empty());
    assert!(!holds_resources(&vm.runtime), "{:?}", vm.runtime);
    assert!(!e.paths(&vm).metrics.exists());
    assert!(e.vmm.calls().ends_with(&["SendCtrlAltDel"]));
    let reasons = e.reasons("a");
    assert!(
        reasons.last().unwrap().contains("guest shut down"),
        "{reasons:?}"
    );
    // Restartable.
    assert_eq!(e.l.start("a").await.unwrap().state, VmState::Running);
    e.l.kill("a").await.unwrap();
}

#[tokio::test]
async fn every_failing_start_step_unwinds_completely() {
    for step in START_CALLS {
        let e = env();
        e.create("a");
        e.vmm.fail_at(Some(step));
        let err = e.l.start("a").await.unwrap_err();
        assert!(
            matches!(err, LifecycleError::StartFailed { .. }),
            "{step}: {err}"
        );
        let vm = e.l.get("a").unwrap();
        assert_eq!(vm.state, VmState::Error, "{step}");
        assert!(
            vm.last_error
                .as_deref()
                .unwrap()
                .contains("injected failure"),
            "{step}"
        );
        assert!(e.procs.live().is_empty(), "{step}: VMM left running");
        assert!(!holds_resources(&vm.runtime), "{step}: {:?}", vm.runtime);
        assert!(!e.paths(&vm).api_socket.exists());
        // And a start after the failure works.
        e.vmm.fail_at(None);
        assert_eq!(
            e.l.start("a").await.unwrap().state,
            VmState::Running,
            "{step}"
        );
        e.l.kill("a").await.unwrap();
    }
}

#[tokio::test]
async fn spawn_and_connect_failures_unwind() {
    let e = env();
    e.create("a");
    e.procs.fail_spawn(true);
    assert!(e.l.start("a").await.is_err());
    let vm = e.l.get("a").unwrap();
    assert_eq!(vm.state, VmState::Error);
    assert!(!holds_resources(&vm.runtime));
    e.procs.fail_spawn(false);
    e.vmm.fail_connect(true);
    assert!(e.l.start("a").await.is_err());
    assert!(
        e.procs.live().is_empty(),
        "a VMM whose socket never came up is killed"
    );
    assert!(!holds_resources(&e.l.get("a").unwrap().runtime));
}

#[tokio::test(flavor = "current_thread")]
async fn stop_of_a_vmm_that_already_died_is_teardown_only() {
    let e = env();
    e.create("a");
    let pid = e.l.start("a").await.unwrap().runtime.pid.unwrap();
    e.procs.exit(pid, "killed by signal 9");
    // On this single-threaded runtime stop takes the VM lock before the
    // watcher task runs: this is the stale branch, not the watcher's.
    let vm = e.l.stop("a", None).await.unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert_eq!(
        e.reasons("a").last().unwrap(),
        "stop: VMM had already exited"
    );
    assert!(!e.vmm.calls().contains(&"SendCtrlAltDel"));
    assert!(!holds_resources(&vm.runtime));
}

#[tokio::test]
async fn stop_kills_a_guest_that_ignores_ctrl_alt_del() {
    let e = env();
    e.create("a");
    e.l.start("a").await.unwrap();
    e.vmm.ignore_ctrl_alt_del(true);
    let vm =
        e.l.stop("a", Some(Duration::from_millis(50)))
            .await
            .unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert!(e.reasons("a").last().unwrap().contains("killed"));
    assert!(e.procs.live().is_empty());
}

#[tokio::test]
async fn watcher_tears_down_a_vmm_that_exits_on_its_own() {
    let e = env();
    e.create("a");
    let pid = e.l.start("a").await.unwrap().runtime.pid.unwrap();
    e.procs.exit(pid, "exited with status 3");
    for _ in 0..200 {
        if e.l.get("a").unwrap().state == VmState::Stopped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let vm = e.l.get("a").unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert!(!holds_resources(&vm.runtime));
    let reasons = e.reasons("a");
    assert!(
        reasons
            .iter()
            .any(|r| r == "VMM exited with status 3 on its own"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn wrong_states_are_refused_and_force_delete_kills() {
    let e = env();
    e.create("a");
    assert!(matches!(
        e.l.stop("a", None).await,
        Err(LifecycleError::WrongState { op: "stop", .. })
    ));
    e.l.start("a").await.unwrap();
    assert!(matches!(
        e.l.start("a").await,
        Err(LifecycleError::WrongState { op: "start", .. })
    ));
    assert!(matches!(
        e.l.delete("a", false).await,
        Err(LifecycleError::WrongState { op: "delete", .. })
    ));
    assert!(matches!(
        e.l.start("nope").await,
        Err(LifecycleError::NotFound(_))
    ));
    let dir = e.paths(&e.l.get("a").unwrap()).dir;
    assert!(dir.exists());
    e.l.delete("a", true).await.unwrap();
    assert!(e.procs.live().is_empty());
    assert!(!dir.exists());
    assert!(matches!(e.l.get("a"), Err(LifecycleError::NotFound(_))));
}

#[tokio::test]
async fn failed_teardown_keeps_the_record_and_is_retried() {
    let e = env();
    e.create("a");
    let pid = e.l.start("a").await.unwrap().runtime.pid.unwrap();
    e.procs.fail_kill(true);
    let err = e.l.kill("a").await.unwrap_err();
    assert!(
        matches!(err, LifecycleError::TeardownFailed { .. }),
        "{err}"
    );
    let vm = e.l.get("a").unwrap();
    assert_eq!(vm.state, VmState::Error);
    assert_eq!(vm.runtime.pid, Some(pid), "the pid is not forgotten");
    assert!(vm.runtime.api_socket.is_some(), "nor the key that finds it");
    e.procs.fail_kill(false);
    // Delete retries the teardown.
    e.l.delete("a", false).await.unwrap();
    assert!(e.procs.live().is_empty());
}

#[tokio::test]
async fn a_teardown_that_cannot_be_recorded_leaves_the_record_naming_everything() {
    let e = env();
    e.create("a");
    let vm = e.l.start("a").await.unwrap();
    let tap = vm.runtime.tap.clone().unwrap();
    // A write at a stale generation fails, as a store that cannot write
    // would: the objects go, the record keeps naming them all.
    let mut rt = vm.runtime.clone();
    let errors =
        e.l.teardown(vm.id, vm.generation + 1, &mut rt)
            .await
            .unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("generation")),
        "{errors:?}"
    );
    assert_eq!(rt, vm.runtime, "the runtime is back to naming everything");
    assert!(e.procs.live().is_empty());
    let taps = e.l.store().taps().unwrap();
    let held = taps.iter().find(|t| t.name == tap).unwrap();
    assert_eq!(
        held.vm_id,
        Some(vm.id),
        "the tap is still the VM's in the pool"
    );
    // The next teardown, at the right generation, finds it all gone and
    // gives the tap back.
    e.l.teardown(vm.id, vm.generation, &mut rt).await.unwrap();
    assert!(!holds_resources(&rt), "{rt:?}");
    let taps = e.l.store().taps().unwrap();
    assert!(taps.iter().all(|t| t.vm_id != Some(vm.id)), "{taps:?}");
}

/// The crash this design exists for: the daemon died after spawning the
/// VMM but before recording its pid. The record names the API socket, so
/// recovery still finds and kills the VMM.
#[tokio::test]
async fn recovery_finds_a_vmm_whose_pid_was_never_recorded() {
    let e = env();
    let vm = e.create("a");
    let p = e.paths(&vm);
    std::fs::create_dir_all(&p.dir).unwrap();
    let rt = Runtime {
        vm_dir: Some(p.dir.clone()),
        api_socket: Some(p.api_socket.clone()),
        ..Runtime::default()
    };
    e.crashed_mid_start(&vm, &rt);
    let (prog, args) = Backend::command(&e.vmm, &p.api_socket, "x");
    let (orphan, _) = e
        .procs
        .spawn(&crate::host::SpawnSpec {
            program: prog,
            args,
            console_log: p.console_log.clone(),
        })
        .unwrap();
    let report = e.l.recover().await.unwrap();
    assert_eq!(report.cleaned, 1);
    assert!(!e.procs.live().contains(&orphan));
    let vm = e.l.get("a").unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert!(!holds_resources(&vm.runtime));
}

#[tokio::test]
async fn recovery_adopts_live_vmms_and_cleans_dead_ones() {
    let e = env();
    e.create("live");
    e.create("dead");
    let live = e.l.start("live").await.unwrap();
    let dead = e.l.start("dead").await.unwrap();
    // A new daemon over the same store and the same (fake) kernel.
    let l2 = Lifecycle::new(
        Arc::new(Store::open(&e.l.config().db_path()).unwrap()),
        e.l.config().clone(),
        host(&e),
        Arc::new(e.vmm.clone()),
        uplink(),
    );
    e.procs
        .exit(dead.runtime.pid.unwrap(), "killed by signal 9");
    let report = l2.recover().await.unwrap();
    assert_eq!((report.adopted, report.cleaned), (1, 1));
    let l = l2.get("live").unwrap();
    assert_eq!(l.state, VmState::Running);
    assert_eq!(l.runtime.pid, live.runtime.pid);
    let d = l2.get("dead").unwrap();
    assert_eq!(d.state, VmState::Stopped);
    assert_eq!(
        l2.events("dead", 0).unwrap().last().unwrap().reason,
        "exited while hearthd was down"
    );
    // The re-adopted VM is watched by the new daemon.
    e.procs
        .exit(live.runtime.pid.unwrap(), "exited with status 0");
    for _ in 0..200 {
        if l2.get("live").unwrap().state == VmState::Stopped {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("re-adopted VM's exit was not noticed");
}

#[tokio::test]
async fn corrupt_runtime_is_an_error_vm_that_kill_still_cleans() {
    let e = env();
    with_caps(&e, "bad", &["nat", "port-forward=8080:80"]);
    e.create("good");
    let bad = e.l.start("bad").await.unwrap();
    let pid = bad.runtime.pid.unwrap();
    e.l.store()
        .corrupt_runtime_for_test(bad.id, "{\"pid\": ")
        .unwrap();
    let vm = e.l.get("bad").unwrap();
    assert_eq!(vm.state, VmState::Error);
    assert!(vm.last_error.unwrap().contains("corrupt runtime record"));
    // The other VM is unaffected.
    assert_eq!(e.l.start("good").await.unwrap().state, VmState::Running);
    assert!(matches!(
        e.l.start("bad").await,
        Err(LifecycleError::Corrupt { .. })
    ));
    assert_eq!(e.l.recover().await.unwrap().corrupt, 1);
    // Kill finds the VMM by its derived API socket path, the tap through
    // the pool, and the firewall's elements by the VM id in their marks.
    let vm = e.l.kill("bad").await.unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert!(!e.procs.live().contains(&pid));
    e.l.kill("good").await.unwrap();
    assert_released(&e, "bad");
}

fn with_caps(e: &Env, name: &str, caps: &[&str]) -> Vm {
    e.l.create(CreateVmRequest {
        name: name.into(),
        spec: VmSpec {
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            ..e.spec.clone()
        },
        ttl_secs: None,
    })
    .unwrap()
}

/// Nothing of VM `vm` is held anywhere: process, tap reservation, rules,
/// loops, dm devices, runtime fields.
fn assert_released(e: &Env, name: &str) {
    let vm = e.l.get(name).unwrap();
    assert!(!holds_resources(&vm.runtime), "{name}: {:?}", vm.runtime);
    assert!(e.procs.live().is_empty(), "{name}: VMM left");
    assert!(
        e.fw.installed().is_empty(),
        "{name}: rules left: {:?}",
        e.fw.installed()
    );
    assert!(
        e.disk.loops().is_empty(),
        "{name}: loops left: {:?}",
        e.disk.loops()
    );
    assert!(e.disk.dm_devices().is_empty(), "{name}: dm left");
    let taps = e.l.store().taps().unwrap();
    assert!(
        taps.iter().all(|t| t.vm_id.is_none()),
        "{name}: tap still reserved: {taps:?}"
    );
    for t in e.net.taps() {
        assert!(
            e.net.addrs(&t).is_empty(),
            "{name}: tap {t} kept its address"
        );
    }
}

#[tokio::test]
async fn host_resources_are_recorded_made_and_released() {
    let e = env();
    with_caps(&e, "a", &["nat", "port-forward=8080:80"]);
    let vm = e.l.start("a").await.unwrap();
    let rt = &vm.runtime;
    let tap = rt.tap.clone().unwrap();
    assert_eq!(tap, "hth0");
    assert_eq!(rt.host_ip, Some("10.231.0.1".parse().unwrap()));
    assert_eq!(rt.guest_ip, Some("10.231.0.2".parse().unwrap()));
    assert_eq!(e.net.addrs(&tap), vec![("10.231.0.1".parse().unwrap(), 30)]);
    assert_eq!(e.net.sysctl("net.ipv4.ip_forward").as_deref(), Some("1"));
    let plan = rt.firewall.clone().unwrap();
    assert_eq!(plan.nat_uplink.as_deref(), Some("eth0"));
    assert_eq!(plan.port_forwards.len(), 1);
    assert_eq!(e.fw.rules(&hearth_api::short_id(&vm.id)), Some(plan));
    let disk = rt.disk.clone().unwrap();
    assert_eq!(disk.strategy, "copy");
    let copy = disk.device.unwrap();
    assert!(copy.exists() && copy.starts_with(e.paths(&vm).dir));
    assert_eq!(rt.mac.as_deref(), Some(mac_for(vm.id).as_str()));

    e.l.stop("a", None).await.unwrap();
    assert_released(&e, "a");
    assert_eq!(
        e.net.taps(),
        vec![tap.clone()],
        "an idle tap is kept for reuse"
    );
    assert!(copy.exists(), "the VM's disk outlives a stop");
    // A second VM gets the idle tap, cleared.
    with_caps(&e, "b", &[]);
    let b = e.l.start("b").await.unwrap();
    assert_eq!(b.runtime.tap.as_deref(), Some(tap.as_str()));
    assert!(b.runtime.firewall.is_none(), "no capability, no rules");
    e.l.delete("b", true).await.unwrap();
    e.l.delete("a", false).await.unwrap();
    assert!(!copy.exists());
}

#[tokio::test]
async fn every_failing_host_step_unwinds_completely() {
    let cases: [(bool, &str, &str); 8] = [
        (false, "net", "create_tap"),
        (false, "net", "configure_tap"),
        (false, "fw", "apply"),
        (false, "disk", "copy_image"),
        (true, "disk", "link_or_copy"),
        (true, "disk", "create_sparse"),
        (true, "disk", "attach_loop"),
        (true, "disk", "dm_create_snapshot"),
    ];
    for (dm, part, op) in cases {
        let e = env_with(dm);
        with_caps(&e, "a", &["nat", "port-forward=8080:80"]);
        match part {
            "net" => e.net.fail_at(Some(op)),
            "fw" => e.fw.fail_at(Some(op)),
            _ => e.disk.fail_at(Some(op)),
        }
        let err = e.l.start("a").await.unwrap_err();
        assert!(
            matches!(err, LifecycleError::StartFailed { .. }),
            "{op}: {err}"
        );
        assert_eq!(e.l.get("a").unwrap().state, VmState::Error, "{op}");
        assert_released(&e, "a");
        e.net.fail_at(None);
        e.fw.fail_at(None);
        e.disk.fail_at(None);
        let vm = e.l.start("a").await.unwrap();
        assert_eq!(vm.state, VmState::Running, "{op}");
        e.l.kill("a").await.unwrap();
        assert_released(&e, "a");
    }
}

#[tokio::test]
async fn dm_snapshot_goes_dm_then_loops_and_keeps_the_cow_file() {
    let e = env_with(true);
    assert_eq!(e.l.disk_strategy(), DiskStrategy::DmSnapshot);
    let vm = with_caps(&e, "a", &[]);
    let vm_rt = e.l.start("a").await.unwrap().runtime;
    let d = vm_rt.disk.unwrap();
    let name = format!("hearth-{}", hearth_api::short_id(&vm.id));
    assert_eq!(d.dm_name.as_deref(), Some(name.as_str()));
    assert_eq!(d.device, Some(PathBuf::from(format!("/dev/mapper/{name}"))));
    assert_eq!(e.disk.loops().len(), 2);
    let origin = d.origin_link.unwrap();
    assert!(
        origin.starts_with(e.paths(&vm).dir),
        "the origin loop's backing file names the VM"
    );
    e.l.stop("a", None).await.unwrap();
    assert_released(&e, "a");
    let calls = e.disk.calls();
    let dm_at = calls
        .iter()
        .position(|c| c.starts_with("dm_remove"))
        .unwrap();
    let loop_at = calls
        .iter()
        .position(|c| c.starts_with("detach_loop"))
        .unwrap();
    assert!(dm_at < loop_at, "{calls:?}");
    assert!(d.cow_file.unwrap().exists());
}

#[tokio::test]
async fn a_busy_dm_device_is_reported_and_never_forgotten() {
    let e = env_with(true);
    let vm = with_caps(&e, "a", &[]);
    e.l.start("a").await.unwrap();
    let name = format!("hearth-{}", hearth_api::short_id(&vm.id));
    e.disk.set_busy(&name, true);
    let err = e.l.kill("a").await.unwrap_err();
    assert!(err.to_string().contains("busy"), "{err}");
    let vm = e.l.get("a").unwrap();
    assert_eq!(vm.state, VmState::Error);
    assert_eq!(
        vm.runtime.disk.unwrap().dm_name.as_deref(),
        Some(name.as_str())
    );
    e.disk.set_busy(&name, false);
    e.l.delete("a", false).await.unwrap();
    assert!(e.disk.dm_devices().is_empty() && e.disk.loops().is_empty());
}

/// A loop attached but whose device number was never recorded (a crash
/// between the attach and the store write) is found by its backing file.
#[tokio::test]
async fn a_loop_whose_number_was_never_recorded_is_found_by_its_backing_file() {
    let e = env_with(true);
    let vm = with_caps(&e, "a", &[]);
    let dir = e.paths(&vm).dir;
    std::fs::create_dir_all(&dir).unwrap();
    let cow = dir.join("cow.img");
    std::fs::write(&cow, b"").unwrap();
    let orphan = e.disk.add_orphan_loop(&cow, false);
    let rt = Runtime {
        vm_dir: Some(dir),
        disk: Some(hearth_api::DiskRecord {
            strategy: "dm-snapshot".into(),
            cow_file: Some(cow.clone()),
            attaching: Some(cow),
            ..Default::default()
        }),
        ..Runtime::default()
    };
    e.crashed_mid_start(&vm, &rt);
    e.l.recover().await.unwrap();
    assert!(e.disk.loops().is_empty(), "{orphan:?} left attached");
    assert_released(&e, "a");
}

/// The bug this design exists for, at the unit level: tap reserved and
/// rules installed, then the daemon died. A new daemon's recovery finds
/// both in the store and removes them.
#[tokio::test]
async fn recovery_removes_rules_and_tap_of_a_half_started_vm() {
    let e = env();
    let vm = with_caps(&e, "a", &["nat"]);
    // Run a start whose VMM never comes up, but keep what it made: apply
    // the same steps by hand through the store and the fakes.
    let (tap, _) =
        e.l.store()
            .reserve_tap(vm.id, vm.generation, 16, |name, _| Runtime {
                tap: Some(name.into()),
                ..Runtime::default()
            })
            .unwrap();
    let mut rt = e.l.store().get(vm.id).unwrap().runtime.unwrap();
    let plan = VmRules {
        short_id: hearth_api::short_id(&vm.id),
        vm_id: vm.id.to_string(),
        tap: tap.clone(),
        guest_ip: "10.231.0.2".parse().unwrap(),
        nat_uplink: Some("eth0".into()),
        port_forwards: vec![],
    };
    rt.firewall = Some(plan.clone());
    e.crashed_mid_start(&vm, &rt);
    NetHost::create_tap(&e.net, &tap).await.unwrap();
    NetHost::configure_tap(&e.net, &tap, "10.231.0.1".parse().unwrap(), 30)
        .await
        .unwrap();
    e.fw.insert(plan);
    // A new daemon: nothing in memory but the store.
    let l2 = Lifecycle::new(
        Arc::new(Store::open(&e.l.config().db_path()).unwrap()),
        e.l.config().clone(),
        host(&e),
        Arc::new(e.vmm.clone()),
        uplink(),
    );
    let report = l2.recover().await.unwrap();
    assert_eq!(report.cleaned, 1);
    assert_eq!(l2.get("a").unwrap().state, VmState::Stopped);
    assert_released(&e, "a");
}

#[tokio::test]
async fn every_teardown_leaves_one_event_saying_what_it_did() {
    let e = env();
    e.create("a");
    let vm = e.l.start("a").await.unwrap();
    let pid = vm.runtime.pid.unwrap();
    let tap = vm.runtime.tap.clone().unwrap();
    e.l.stop("a", None).await.unwrap();
    let events = e.l.events("a", 0).unwrap();
    let tail: Vec<_> = events
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|ev| (ev.kind, ev.to))
        .collect();
    assert_eq!(
        tail,
        [
            (hearth_api::EventKind::Transition, VmState::Stopping),
            (hearth_api::EventKind::Teardown, VmState::Stopping),
            (hearth_api::EventKind::Transition, VmState::Stopped),
        ],
        "{events:?}"
    );
    let teardown = &events[events.len() - 2];
    assert!(
        teardown
            .reason
            .starts_with(&format!("removed vmm pid {pid}, ")),
        "{}",
        teardown.reason
    );
    assert!(
        teardown.reason.contains(&format!("tap {tap}")),
        "{}",
        teardown.reason
    );
    assert_eq!(teardown.from, None);

    // A teardown that fails says so, and is counted.
    e.l.start("a").await.unwrap();
    e.procs.fail_kill(true);
    e.l.kill("a").await.unwrap_err();
    let last_teardown =
        e.l.events("a", 0)
            .unwrap()
            .into_iter()
            .rfind(|ev| ev.kind == hearth_api::EventKind::Teardown)
            .unwrap();
    assert!(
        last_teardown.reason.starts_with("failed: "),
        "{}",
        last_teardown.reason
    );
    let text = e.l.metrics_text().unwrap();
    assert!(
        text.contains("\nhearth_teardown_failures_total 1\n"),
        "{text}"
    );
    e.procs.fail_kill(false);
    e.l.delete("a", false).await.unwrap();
}
