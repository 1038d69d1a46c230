//! The crash harness (DESIGN.md, "Test levels" 3; issue 5): hearthd is
//! made to die — `abort()` at a named failpoint, or SIGKILL at a random
//! moment — inside every step of every operation, restarted, and the host
//! is then audited: nothing of a VM that is not running may remain, and no
//! running VM may be lost. Run as root, with a hearthd built with the
//! `failpoints` feature (`--features hearthd/failpoints`; scripts/test.sh
//! does): without it the suite fails rather than skips.
//!
//! * **The matrix** ([`crash_matrix`]). The failpoints come from
//!   `hearthd --list-failpoints`, never from a list kept here; each is
//!   mapped by its prefix to the operations that pass through it
//!   ([`ops_for`]). Every (failpoint, operation) pair is one scenario in an
//!   environment of its own (a fresh network namespace, state dir and
//!   daemon, see `common::TestEnv`), run twice: armed to `abort` (the
//!   daemon dies mid-operation and is restarted unarmed) and armed to
//!   `error` (the unwind path, no restart; at most one follow-up `kill` or
//!   `rm --force` may finish a teardown the error interrupted). Each
//!   scenario has a bystander VM that the operation never touches and the
//!   VM under test, both with `nat` and a port forward. After recovery
//!   [`audit`] checks the host against the store: every VMM process, marked nft
//!   element and addressed tap belongs to a running VM and every VM dir to a
//!   VM; every other VM's record names nothing; the tap pool and the
//!   records agree on who holds which tap; `hearth doctor --leaks` finds nothing; the
//!   store passes `PRAGMA integrity_check`; the orphan sweep never had to
//!   remove anything hearth itself made (that would mean an object was
//!   created before it was recorded, or a record dropped before its
//!   object); and the daemon never panicked. The bystander must still run
//!   with the same pid, nft elements and a working port forward. Then both VMs
//!   are removed and the audit must find an empty host. The outcome table
//!   is printed and written to `target/crash-matrix.md`.
//! * **The soak** ([`soak_random_operations_while_the_daemon_is_killed`]):
//!   concurrent clients issue random operations while the daemon is
//!   SIGKILLed and restarted at random moments; seeded (`HEARTH_SOAK_SEED`).
//! * **Bad state on disk**: a corrupt runtime record, a VM dir deleted by
//!   hand, stores from an older and a newer schema, a stale socket, a full
//!   disk under the store.
//!
//! Scenarios run in parallel threads (`HEARTH_CRASH_JOBS`, default 4);
//! each cleans up after itself through `TestEnv`'s `Drop`, so
//! `../shared/tools/leak-audit` finds nothing after the suite.

// Test helpers outside #[test] fns panic on failure by design: a panic
// inside a scenario is caught and reported as that scenario's failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestEnv, UPLINK, alive, in_ns, ns_cmd, require_root, tcp_line};
use serde_json::{Value, json};

/// The variable that arms failpoints in hearthd.
const FP_ENV: &str = "HEARTH_FAILPOINTS";
/// The VM every scenario leaves alone, and its host port.
const BYSTANDER: &str = "by";
const BY_PORT: u16 = 8001;
/// The VM the operation acts on, and its host port.
const VUT: &str = "vut";
const VUT_PORT: u16 = 8002;
/// Runtime fields that name a process, kernel object or file to remove:
/// a VM that is not running must have none of them.
const HOLDING_FIELDS: &[&str] = &[
    "pid",
    "pid_start_time",
    "api_socket",
    "metrics_path",
    "tap",
    "firewall",
    "disk",
];

// ---------------------------------------------------------------------------
// Failpoints and the operations that pass through them

/// Every failpoint the hearthd under test knows. Fails loudly when it was
/// built without the `failpoints` feature.
fn list_failpoints() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_hearthd"))
        .arg("--list-failpoints")
        .env("HEARTH_CONFIG", "/dev/null")
        .output()
        .expect("run hearthd --list-failpoints");
    assert!(
        out.status.success(),
        "`hearthd --list-failpoints` failed ({}): this hearthd was built without the \
         `failpoints` feature, so the crash suite cannot arm anything. Build and run it with \
         `--features hearthd/failpoints` (scripts/test.sh does).\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let points: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(!points.is_empty(), "hearthd --list-failpoints printed none");
    points
}

/// An operation a scenario runs against the armed daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Start,
    Stop,
    Kill,
    /// `rm --force` of the running VM under test.
    RmForce,
    /// A daemon restart with both VMs running: the armed start is the
    /// operation (recovery).
    Restart,
    /// The orphan sweep with orphans present: the armed daemon's own sweep
    /// at start, then `hearth gc` if it came up.
    Gc,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Kill => "kill",
            Op::RmForce => "rm --force",
            Op::Restart => "restart",
            Op::Gc => "gc",
        }
    }

    fn cli(self) -> &'static [&'static str] {
        match self {
            Op::Start => &["start", VUT],
            Op::Stop => &["stop", VUT],
            Op::Kill => &["kill", VUT],
            Op::RmForce => &["rm", "--force", VUT],
            Op::Restart => &[],
            Op::Gc => &["gc"],
        }
    }
}

/// The operations that pass through failpoint `fp`, by its prefix.
fn ops_for(fp: &str) -> Vec<Op> {
    match fp.split('.').next().unwrap_or_default() {
        "start" => vec![Op::Start],
        "stop" => vec![Op::Stop],
        "kill" => vec![Op::Kill],
        "teardown" => vec![Op::Stop, Op::Kill, Op::RmForce],
        "delete" => vec![Op::RmForce],
        "reconcile" => vec![Op::Restart],
        "sweep" => vec![Op::Gc],
        other => panic!(
            "failpoint {fp}: unknown prefix {other:?}; map it to the operations that pass \
             through it in crash.rs (ops_for)"
        ),
    }
}

/// How a failpoint is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Abort,
    Error,
}

impl Mode {
    fn action(self) -> &'static str {
        match self {
            Mode::Abort => "abort",
            Mode::Error => "error",
        }
    }
}

// ---------------------------------------------------------------------------
// Looking at the host

/// stdout and stderr of a command, together.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn cmdline(pid: u64) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Ids of the VMs with marked elements in hearth's nft table.
fn marked(env: &TestEnv) -> Vec<String> {
    common::marked_vms(&env.netns)
}

/// Every `hth*` link of the env's host namespace but the uplink, with its
/// IPv4 addresses (`a.b.c.d/len`).
fn hth_links(env: &TestEnv) -> Vec<(String, Vec<String>)> {
    let out = Command::new("ip")
        .args(["-n", &env.netns, "-j", "addr", "show"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            let name = l["ifname"].as_str()?;
            if !name.starts_with("hth") || name == UPLINK {
                return None;
            }
            let addrs = l["addr_info"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["family"] == "inet")
                .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
                .collect();
            Some((name.to_owned(), addrs))
        })
        .collect()
}

fn id_of(vm: &Value) -> String {
    vm["id"].as_str().unwrap().to_owned()
}

/// `PRAGMA integrity_check` on the env's store, opened read-only beside
/// the daemon (WAL readers never block its writes).
fn integrity(state_dir: &Path) -> Result<(), String> {
    let db = state_dir.join("hearth.db");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("open {}: {e}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let res: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| format!("integrity_check: {e}"))?;
    if res == "ok" {
        Ok(())
    } else {
        Err(format!("integrity_check: {res}"))
    }
}

/// The store's tap pool: each tap and the VM id holding it, if any.
fn tap_pool(state_dir: &Path) -> Result<HashMap<String, Option<String>>, String> {
    let db = state_dir.join("hearth.db");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("open {}: {e}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let mut stmt = conn
        .prepare("SELECT name, vm_id FROM taps")
        .map_err(|e| format!("read the tap pool: {e}"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(|e| format!("read the tap pool: {e}"))?;
    rows.collect::<Result<_, _>>()
        .map_err(|e| format!("read the tap pool: {e}"))
}

/// A VM as the API reports it, or `None` when it does not exist.
fn vm_opt(env: &TestEnv, name: &str) -> Option<Value> {
    match env.api("GET", &format!("/v1/vms/{name}"), None) {
        (200, v) => Some(v),
        (404, _) => None,
        (s, v) => panic!("GET {name}: {s} {v}"),
    }
}

/// The runtime fields of `vm` that still name something to remove.
fn holding(vm: &Value) -> Vec<&'static str> {
    HOLDING_FIELDS
        .iter()
        .copied()
        .filter(|f| !vm["runtime"][*f].is_null())
        .collect()
}

/// What [`audit`] found.
#[derive(Debug, Default)]
struct Audit {
    /// Everything wrong, one line each.
    problems: Vec<String>,
    /// Each VM's state, by name.
    states: BTreeMap<String, String>,
}

/// Checks the env's host against its store. Every VMM process, per-VM nft
/// chain, addressed tap and VM dir must be claimed by a VM that holds it;
/// a VM holds things only when it is `running` — or, when `lenient`, when
/// it is `error` with its leftovers still recorded (an unwind or teardown
/// an injected error interrupted, that the next kill finishes). Also:
/// `hearth doctor --leaks` is clean, the store is intact, every sweep
/// event names one of the `planted` orphans, and the daemon never
/// panicked.
fn audit(env: &TestEnv, planted: &[String], lenient: bool) -> Audit {
    let mut a = Audit::default();
    let (s, list) = env.api("GET", "/v1/vms", None);
    if s != 200 {
        a.problems.push(format!("GET /v1/vms: {s} {list}"));
        return a;
    }
    let (mut pids, mut fw_ids, mut taps, mut ids) = (
        HashSet::new(),
        HashSet::new(),
        HashMap::new(),
        HashSet::new(),
    );
    // Which tap each VM's record names, by VM id.
    let mut named_taps = HashMap::new();
    for vm in list.as_array().unwrap() {
        let name = vm["name"].as_str().unwrap().to_owned();
        let state = vm["state"].as_str().unwrap().to_owned();
        let rt = &vm["runtime"];
        ids.insert(vm["id"].as_str().unwrap().to_owned());
        let named = holding(vm);
        match state.as_str() {
            "running" => {
                let pid = rt["pid"].as_u64();
                let sock = rt["api_socket"].as_str().unwrap_or("<none>");
                match pid {
                    Some(pid) if alive(pid) && cmdline(pid).contains(sock) => {}
                    _ => a.problems.push(format!(
                        "{name} is running but its VMM (pid {pid:?}, socket {sock}) is not"
                    )),
                }
                if !rt["firewall"].is_null() && !marked(env).contains(&id_of(vm)) {
                    a.problems
                        .push(format!("{name} is running but its nft rules are gone"));
                }
            }
            "stopped" | "error" | "created" => {
                let excused = lenient && state == "error";
                if !named.is_empty() && !excused {
                    a.problems.push(format!(
                        "{name} is {state} but its record still names {named:?}: {rt}"
                    ));
                }
            }
            other => a.problems.push(format!("{name} was left {other}: {rt}")),
        }
        // What the record names is claimed (a problem above if it should
        // not be named at all), so each leftover is reported once.
        if let Some(pid) = rt["pid"].as_u64() {
            pids.insert(pid);
        }
        if !rt["firewall"].is_null() {
            fw_ids.insert(id_of(vm));
        }
        if let Some(tap) = rt["tap"].as_str() {
            named_taps.insert(vm["id"].as_str().unwrap().to_owned(), tap.to_owned());
            // A running VM's tap must carry its address; a leftover may
            // already be reset.
            let addr = rt["host_ip"].as_str().filter(|_| state == "running");
            taps.insert(tap.to_owned(), addr.map(str::to_owned));
        }
        a.states.insert(name, state);
    }
    let daemon = env.daemon.as_ref().map(|d| u64::from(d.id()));
    for pid in env.processes().into_iter().map(u64::from) {
        if Some(pid) != daemon && !pids.contains(&pid) {
            a.problems.push(format!(
                "process {pid} belongs to no VM that holds it: {}",
                cmdline(pid)
            ));
        }
    }
    for id in marked(env) {
        if !fw_ids.contains(&id) {
            a.problems.push(format!(
                "nft elements of {id} belong to no VM that holds them"
            ));
        }
    }
    for (link, addrs) in hth_links(env) {
        match taps.get(&link) {
            Some(Some(ip)) if !addrs.iter().any(|a| a.starts_with(&format!("{ip}/"))) => {
                a.problems.push(format!(
                    "running VM's tap {link} lost its address {ip}: {addrs:?}"
                ))
            }
            Some(_) => {}
            None if !addrs.is_empty() => a
                .problems
                .push(format!("tap {link} still has {addrs:?} but no VM holds it")),
            None => {}
        }
    }
    // The tap pool gives a tap to a VM in the same transaction that names
    // it in the VM's record, and takes it back the same way.
    match tap_pool(&env.state_dir) {
        Ok(pool) => {
            for (tap, holder) in &pool {
                if let Some(id) = holder
                    && named_taps.get(id) != Some(tap)
                {
                    a.problems.push(format!(
                        "the tap pool gives {tap} to VM {id}, whose record does not name it"
                    ));
                }
            }
            for (id, tap) in &named_taps {
                if pool.get(tap) != Some(&Some(id.clone())) {
                    a.problems.push(format!(
                        "VM {id}'s record names {tap}, which the tap pool does not give it"
                    ));
                }
            }
        }
        Err(e) => a.problems.push(e),
    }
    for dir in env.vm_dirs() {
        let id = dir.file_name().unwrap().to_string_lossy().into_owned();
        if !ids.contains(&id) {
            a.problems
                .push(format!("VM dir {} has no VM", dir.display()));
        }
    }
    let out = env.hearth(&["doctor", "--leaks"]);
    if !out.status.success() {
        a.problems
            .push(format!("hearth doctor --leaks: {}", text(&out).trim()));
    }
    if let Err(e) = integrity(&env.state_dir) {
        a.problems.push(e);
    }
    for line in env.raw("GET", "/v1/events").lines() {
        if line.contains("\"kind\":\"sweep\"") && !planted.iter().any(|p| line.contains(p)) {
            a.problems.push(format!(
                "the sweep removed an object hearth made itself (created before it was \
                 recorded, or its record dropped before it was gone): {line}"
            ));
        }
    }
    if env.daemon_log().contains("panicked") {
        a.problems.push("hearthd panicked (see its log)".into());
    }
    a
}

/// The bystander still runs, with the same VMM, its nft elements and a port
/// forward that carries traffic.
fn bystander_problems(env: &TestEnv, pid: u64, by_id: &str) -> Vec<String> {
    let mut p = Vec::new();
    let Some(vm) = vm_opt(env, BYSTANDER) else {
        return vec!["bystander: gone".into()];
    };
    if vm["state"] != "running" || vm["runtime"]["pid"].as_u64() != Some(pid) || !alive(pid) {
        p.push(format!(
            "bystander: not running with pid {pid} any more: {} {}",
            vm["state"], vm["runtime"]["pid"]
        ));
    }
    if !marked(env).iter().any(|id| id == by_id) {
        p.push("bystander: its nft rules are gone".into());
    }
    let echoed = in_ns(&env.netns, || {
        tcp_line(&format!("127.0.0.1:{BY_PORT}"), "ping\n")
    });
    if !matches!(&echoed, Ok(l) if l == "ping\n") {
        p.push(format!(
            "bystander: port forward {BY_PORT} broken: {echoed:?}"
        ));
    }
    p
}

/// Asks for VM `name` with `nat` and a port forward from `port`.
fn create_vm(env: &TestEnv, name: &str, port: u16) {
    let mut body = env.create_body(name);
    body["spec"]["capabilities"] = json!(["nat", format!("port-forward={port}:7")]);
    let (s, v) = env.api("POST", "/v1/vms", Some(body));
    assert_eq!(s, 201, "create {name}: {v}");
}

fn start_vm(env: &TestEnv, name: &str) {
    let (s, v) = env.api("POST", &format!("/v1/vms/{name}/start"), None);
    assert_eq!(s, 200, "start {name}: {v}\n{}", env.daemon_log());
}

/// Leaves orphans of several kinds that no record names — a VM dir, a tap
/// and an nft chain — and returns strings that identify them in sweep
/// events.
fn plant_orphans(env: &TestEnv, n: u8) -> Vec<String> {
    let ghost = uuid::Uuid::now_v7().to_string();
    std::fs::create_dir_all(env.state_dir.join("vms").join(&ghost)).unwrap();
    let tap = format!("hth7{n}");
    ns_cmd(
        &env.netns,
        &["ip", "tuntap", "add", "dev", &tap, "mode", "tap"],
    );
    let orphan_id = format!("0000dead-be{n:02}-0000-0000-000000000000");
    common::plant_marked_element(&env.netns, &orphan_id, &format!("hth6{n}"));
    vec![ghost, format!("tap {tap}"), orphan_id]
}

// ---------------------------------------------------------------------------
// The matrix

/// One scenario's result.
#[derive(Debug, Default)]
struct Verdict {
    /// `recovered running`, `recovered stopped` (with how, if it took a
    /// follow-up), or `LEAKED: …` / `FAILED: …`.
    outcome: String,
    problems: Vec<String>,
    bystander_lost: bool,
    note: Option<String>,
}

/// Runs one (failpoint, operation, mode) scenario in an env of its own.
fn scenario(tag: &str, fp: &str, op: Op, mode: Mode) -> Verdict {
    let mut env = TestEnv::new(tag);
    env.start_daemon();
    create_vm(&env, BYSTANDER, BY_PORT);
    create_vm(&env, VUT, VUT_PORT);
    start_vm(&env, BYSTANDER);
    if op != Op::Start {
        start_vm(&env, VUT);
    }
    let by = env.vm(BYSTANDER);
    let by_pid = by["runtime"]["pid"].as_u64().expect("bystander pid");
    let by_id = id_of(&by);
    let mark = format!("failpoint {fp}");
    let mut planted = Vec::new();
    let mut v = Verdict::default();

    // Arm only now: setting up passed the same start.* points.
    env.kill_daemon();
    if op == Op::Gc {
        planted.extend(plant_orphans(&env, 0));
    }
    env.daemon_env
        .push((FP_ENV.into(), format!("{fp}={}", mode.action())));
    let started = env.try_start_daemon();
    let said = match (&started, op) {
        (Ok(()), Op::Restart) => String::new(),
        (Ok(()), Op::Gc) => {
            planted.extend(plant_orphans(&env, 1));
            text(&env.hearth(op.cli()))
        }
        (Ok(()), op) => text(&env.hearth(op.cli())),
        // Died while starting: its recovery or its sweep was the operation.
        (Err(_), Op::Restart | Op::Gc) => String::new(),
        (Err(st), op) => panic!(
            "the armed hearthd exited at start ({st}) before {}:\n{}",
            op.label(),
            env.daemon_log()
        ),
    };
    let mut how = String::new();
    match mode {
        Mode::Abort => {
            let st = match started {
                Err(st) => st,
                Ok(()) => env
                    .wait_daemon_exit(Duration::from_secs(10))
                    .unwrap_or_else(|| {
                        panic!(
                            "hearthd did not die: {} never reached {fp}; it said: {said}\n{}",
                            op.label(),
                            env.daemon_log()
                        )
                    }),
            };
            assert_eq!(
                st.signal(),
                Some(libc::SIGABRT),
                "hearthd should have aborted at {fp} ({st})\n{}",
                env.daemon_log()
            );
            assert!(
                env.daemon_log().contains(&format!("{mark}: abort")),
                "{}",
                env.daemon_log()
            );
            env.daemon_env.clear();
            env.start_daemon();
        }
        Mode::Error => {
            if let Err(st) = started {
                // The daemon itself treats the error as fatal at start.
                assert!(
                    env.daemon_log().contains(&mark),
                    "hearthd exited ({st}) without reaching {fp}:\n{}",
                    env.daemon_log()
                );
                let log = env.daemon_log();
                let said = log.lines().rev().find(|l| l.starts_with("hearthd: "));
                v.note = Some(format!(
                    "hearthd refused to start ({st}): {}",
                    said.unwrap_or("?")
                ));
                env.daemon_env.clear();
                env.start_daemon();
            } else {
                assert!(
                    env.wait_daemon_exit(Duration::ZERO).is_none(),
                    "hearthd died of an injected error at {fp}:\n{}",
                    env.daemon_log()
                );
                assert!(
                    said.contains(&mark) || env.daemon_log().contains(&mark),
                    "{} never reached {fp}; it said: {said}",
                    op.label()
                );
                // The unwind path, no restart: what is left is recorded.
                // (A sweep that errs leaves the orphans it was given for
                // the next, unarmed sweep: nothing to audit until then.)
                let sweep_point = fp.starts_with("sweep.");
                let a = if sweep_point {
                    Audit::default()
                } else {
                    audit(&env, &planted, true)
                };
                v.problems.extend(
                    a.problems
                        .into_iter()
                        .map(|p| format!("after the error: {p}")),
                );
                let leftovers = vm_opt(&env, VUT)
                    .is_some_and(|vm| vm["state"] != "running" && !holding(&vm).is_empty());
                if leftovers {
                    // A kill passes kill.*: rm --force of an `error` VM does not.
                    let follow: &[&str] = if fp.starts_with("kill.") {
                        &["rm", "--force", VUT]
                    } else {
                        &["kill", VUT]
                    };
                    let out = text(&env.hearth(follow));
                    if out.contains(&mark) {
                        // The follow-up passes the same point (every
                        // teardown passes teardown.*): the next start of
                        // the daemon finishes the job instead.
                        env.kill_daemon();
                        env.daemon_env.clear();
                        env.start_daemon();
                        how = "after restart".into();
                    } else {
                        how = format!("after {}", follow[..follow.len() - 1].join(" "));
                    }
                }
                let a = if sweep_point {
                    Audit::default()
                } else {
                    audit(&env, &planted, false)
                };
                v.problems.extend(
                    a.problems
                        .into_iter()
                        .map(|p| format!("before any restart: {p}")),
                );
            }
            if !env.daemon_env.is_empty() {
                env.kill_daemon();
                env.daemon_env.clear();
                env.start_daemon();
            }
        }
    }

    // Recovered, by an unarmed daemon.
    let a = audit(&env, &planted, false);
    v.problems.extend(a.problems);
    let by_problems = bystander_problems(&env, by_pid, &by_id);
    if !by_problems.is_empty() {
        if mode == Mode::Error
            && fp.starts_with("reconcile.")
            && a.states.get(BYSTANDER).is_some_and(|s| s != "running")
        {
            // Recovery passes its points for every VM alike: told that
            // the bystander's VMM failed its probe, hearthd treats it as
            // hung and stops it — cleanly, which the audit checked.
            v.note = Some("the bystander passes the point too: stopped cleanly".into());
        } else {
            v.bystander_lost = true;
            v.problems.extend(by_problems);
        }
    }
    v.outcome = match a.states.get(VUT).map(String::as_str) {
        Some("running") => "recovered running".to_owned(),
        Some("stopped" | "error" | "created") if how.is_empty() => "recovered stopped".into(),
        Some("stopped" | "error" | "created") => format!("recovered stopped ({how})"),
        None if how.is_empty() => "recovered stopped (deleted)".into(),
        None => format!("recovered stopped (deleted, {how})"),
        Some(other) => format!("left {other}"),
    };
    if a.states.get(VUT).is_some_and(|s| s == "running") {
        let out = env.hearth(&["stop", VUT]);
        if !out.status.success() {
            v.problems
                .push(format!("stop after recovery failed: {}", text(&out)));
        }
    }
    for name in [BYSTANDER, VUT] {
        if vm_opt(&env, name).is_some() {
            let out = env.hearth(&["rm", "--force", name]);
            if !out.status.success() {
                v.problems
                    .push(format!("rm --force {name} failed: {}", text(&out)));
            }
        }
    }
    let a = audit(&env, &planted, false);
    v.problems
        .extend(a.problems.into_iter().map(|p| format!("after rm: {p}")));
    if !a.states.is_empty() {
        v.problems
            .push(format!("VMs left after rm: {:?}", a.states));
    }
    env.kill_daemon();
    let left = env.processes();
    if !left.is_empty() {
        v.problems
            .push(format!("processes left with the daemon gone: {left:?}"));
    }
    v
}

/// One row of the report.
#[derive(Debug)]
struct Row {
    fp: String,
    op: Op,
    mode: Mode,
    verdict: Verdict,
    secs: f64,
}

impl Row {
    fn failed(&self) -> bool {
        !self.verdict.problems.is_empty() || self.verdict.bystander_lost
    }

    /// The table cell: the outcome, or what went wrong (the first
    /// problem, cut short, unless `full`).
    fn cell(&self, full: bool) -> String {
        let v = &self.verdict;
        let problems = if full || v.problems.len() < 2 {
            v.problems.join("; ")
        } else {
            format!("{} (+{} more)", v.problems[0], v.problems.len() - 1)
        };
        let problems = if full || problems.chars().count() <= 240 {
            problems
        } else {
            format!("{}…", problems.chars().take(240).collect::<String>())
        };
        let mut s = if v.outcome.starts_with("FAILED") {
            format!("FAILED: {problems}")
        } else if v.bystander_lost {
            format!("BYSTANDER LOST: {problems}")
        } else if !v.problems.is_empty() {
            format!("LEAKED: {problems}")
        } else {
            v.outcome.clone()
        };
        if let Some(n) = &v.note {
            let _ = write!(s, " — {n}");
        }
        s.replace('|', "\\|").replace('\n', " ")
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".into())
}

/// Runs `jobs` on `threads` worker threads; each job's panic is its own.
fn run_parallel(jobs: Vec<(String, Op, Mode)>, threads: usize) -> Vec<Row> {
    let queue = Arc::new(Mutex::new(jobs.into_iter().enumerate().collect::<Vec<_>>()));
    let rows = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (queue, rows) = (queue.clone(), rows.clone());
            std::thread::spawn(move || {
                loop {
                    let Some((i, (fp, op, mode))) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    let t = Instant::now();
                    let tag = format!("x{i}");
                    let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        scenario(&tag, &fp, op, mode)
                    }))
                    .unwrap_or_else(|p| {
                        let msg = panic_text(&*p);
                        Verdict {
                            outcome: format!("FAILED: {msg}"),
                            problems: vec![msg],
                            ..Verdict::default()
                        }
                    });
                    let secs = t.elapsed().as_secs_f64();
                    eprintln!(
                        "crash: {fp} × {} ({}): {} [{secs:.1}s]",
                        op.label(),
                        mode.action(),
                        if verdict.problems.is_empty() {
                            verdict.outcome.clone()
                        } else {
                            format!("PROBLEMS: {:?}", verdict.problems)
                        }
                    );
                    rows.lock().unwrap().push(Row {
                        fp,
                        op,
                        mode,
                        verdict,
                        secs,
                    });
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    Arc::try_unwrap(rows).unwrap().into_inner().unwrap()
}

/// The report: one line per (failpoint, operation), the outcome of each
/// mode side by side.
fn report(points: &[String], rows: &[Row], total: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# hearth crash matrix\n");
    let _ = writeln!(
        out,
        "{} failpoints, {} scenarios, {:.0} s total ({:.1} s of scenario time).\n",
        points.len(),
        rows.len(),
        total.as_secs_f64(),
        rows.iter().map(|r| r.secs).sum::<f64>()
    );
    let _ = writeln!(
        out,
        "| failpoint | operation | abort → restart | error (no restart) |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    for fp in points {
        for op in ops_for(fp) {
            if !rows.iter().any(|r| &r.fp == fp && r.op == op) {
                continue;
            }
            let cell = |mode| {
                rows.iter()
                    .find(|r| &r.fp == fp && r.op == op && r.mode == mode)
                    .map_or_else(|| "NOT RUN".to_owned(), |r| r.cell(false))
            };
            let _ = writeln!(
                out,
                "| {fp} | {} | {} | {} |",
                op.label(),
                cell(Mode::Abort),
                cell(Mode::Error)
            );
        }
    }
    out
}

/// Where the report goes: `target/crash-matrix.md`.
fn report_path() -> PathBuf {
    // CARGO_BIN_EXE_hearthd is target/<profile>/hearthd.
    Path::new(env!("CARGO_BIN_EXE_hearthd"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("crash-matrix.md")
}

/// Every failpoint × every operation through it, armed to abort and armed
/// to err; zero leaks and zero lost bystanders.
#[test]
fn crash_matrix() {
    let points = list_failpoints();
    if !require_root() {
        return;
    }
    for tool in ["hearth", "hearth-testvmm"] {
        assert!(
            common::bin(tool).exists(),
            "{} is missing: build the workspace first (cargo build --workspace --features \
             hearthd/failpoints)",
            common::bin(tool).display()
        );
    }
    let threads = std::env::var("HEARTH_CRASH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4usize)
        .max(1);
    // For debugging one row: HEARTH_CRASH_ONLY=name[,name…] (prefixes
    // too) runs only those points; coverage is asserted only without it.
    let only: Vec<String> = std::env::var("HEARTH_CRASH_ONLY")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut jobs = Vec::new();
    for mode in [Mode::Abort, Mode::Error] {
        for fp in &points {
            if !only.is_empty() && !only.iter().any(|o| fp.starts_with(o.as_str())) {
                continue;
            }
            for op in ops_for(fp) {
                jobs.push((fp.clone(), op, mode));
            }
        }
    }
    // Longest last off the stack: the pool pops from the end.
    jobs.reverse();
    let t = Instant::now();
    let rows = run_parallel(jobs, threads);
    let total = t.elapsed();
    let table = report(&points, &rows, total);
    println!("{table}");
    let path = report_path();
    if let Err(e) = std::fs::write(&path, &table) {
        eprintln!("cannot write {}: {e}", path.display());
    }
    // Every listed point ran, in both modes.
    if !only.is_empty() {
        eprintln!("PARTIAL MATRIX: HEARTH_CRASH_ONLY={}", only.join(","));
        return;
    }
    for fp in &points {
        for mode in [Mode::Abort, Mode::Error] {
            assert!(
                rows.iter().any(|r| &r.fp == fp && r.mode == mode),
                "failpoint {fp} not covered ({mode:?})"
            );
        }
    }
    let failed: Vec<_> = rows.iter().filter(|r| r.failed()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} scenarios leaked, lost a bystander or failed:\n{}",
        failed.len(),
        rows.len(),
        failed
            .iter()
            .map(|r| format!(
                "  {} × {} ({}): {}",
                r.fp,
                r.op.label(),
                r.mode.action(),
                r.cell(true)
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------
// The soak

/// xorshift64*: tiny, seedable, good enough to pick operations.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so small or similar seeds diverge (and
        // the state is never 0).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The CLI against `socket`, from any thread.
fn hearth_at(socket: &Path, args: &[&str]) -> Output {
    Command::new(common::bin("hearth"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env("HEARTH_CONFIG", "/dev/null")
        .output()
        .unwrap()
}

/// Concurrent clients issue random operations against a handful of VMs
/// while hearthd is SIGKILLed at random moments and restarted; then every
/// VM is fully running or fully stopped, nothing leaked, the store is
/// intact, and after removing everything nothing is left.
#[test]
fn soak_random_operations_while_the_daemon_is_killed() {
    const CLIENTS: u64 = 3;
    const VMS: u64 = 4;
    const ROUNDS: u64 = 6;
    if !require_root() {
        return;
    }
    let seed = std::env::var("HEARTH_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        });
    println!("soak seed: {seed} (re-run with HEARTH_SOAK_SEED={seed})");
    let t = Instant::now();
    let mut env = TestEnv::new("soak");
    env.start_daemon();
    let socket = env.socket.clone();
    let (kernel, rootfs) = (
        env.kernel.display().to_string(),
        env.rootfs.display().to_string(),
    );
    let stop = AtomicBool::new(false);
    // Per operation: how many ran, how many succeeded.
    let ran: [AtomicUsize; 5] = Default::default();
    let succeeded: [AtomicUsize; 5] = Default::default();
    let mut rng = Rng::new(seed);
    std::thread::scope(|s| {
        for c in 0..CLIENTS {
            let (socket, kernel, rootfs) = (&socket, &kernel, &rootfs);
            let (stop, ran, succeeded) = (&stop, &ran, &succeeded);
            let mut rng = Rng::new(seed ^ (c + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = rng.below(VMS);
                    let name = format!("s{n}");
                    let port = format!("port-forward={}:7", 8100 + n);
                    // Weighted toward start, so VMs are running when the
                    // daemon dies.
                    let op = [0, 0, 1, 1, 1, 2, 2, 3, 4][rng.below(9) as usize];
                    let args: Vec<&str> = match op {
                        0 => vec![
                            "create", &name, "--kernel", kernel, "--rootfs", rootfs, "--cap",
                            "nat", "--cap", &port,
                        ],
                        1 => vec!["start", &name],
                        2 => vec!["stop", &name, "--timeout", "2"],
                        3 => vec!["kill", &name],
                        _ => vec!["rm", "--force", &name],
                    };
                    ran[op].fetch_add(1, Ordering::Relaxed);
                    if hearth_at(socket, &args).status.success() {
                        succeeded[op].fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(rng.below(40)));
                }
            });
        }
        for round in 0..ROUNDS {
            std::thread::sleep(Duration::from_millis(300 + rng.below(900)));
            let running = env
                .api("GET", "/v1/vms", None)
                .1
                .as_array()
                .map_or(0, |l| l.iter().filter(|v| v["state"] == "running").count());
            env.kill_daemon();
            eprintln!(
                "soak: round {round}: SIGKILLed hearthd with {running} VMs running, after {} \
                 operations",
                ran.iter().map(|n| n.load(Ordering::Relaxed)).sum::<usize>()
            );
            std::thread::sleep(Duration::from_millis(rng.below(200)));
            env.start_daemon();
        }
        stop.store(true, Ordering::Relaxed);
    });
    // One more crash with everything settled, to check recovery too.
    env.kill_daemon();
    env.start_daemon();
    let a = audit(&env, &[], false);
    let counts: Vec<String> = ["create", "start", "stop", "kill", "rm --force"]
        .iter()
        .zip(ran.iter().zip(&succeeded))
        .map(|(op, (r, s))| {
            format!(
                "{op} {}/{}",
                s.load(Ordering::Relaxed),
                r.load(Ordering::Relaxed)
            )
        })
        .collect();
    let done: usize = ran.iter().map(|n| n.load(Ordering::Relaxed)).sum();
    println!(
        "soak: {done} operations (succeeded/ran: {}), {ROUNDS} daemon kills; final states {:?}",
        counts.join(", "),
        a.states
    );
    assert!(
        a.problems.is_empty(),
        "seed {seed}: {:#?}\n{}",
        a.problems,
        env.daemon_log()
    );
    assert!(done > 0, "no operation ran");
    for (name, state) in &a.states {
        if state == "running" {
            env.hearth_ok(&["stop", name]);
        }
    }
    for name in a.states.keys() {
        env.hearth_ok(&["rm", "--force", name]);
    }
    let a = audit(&env, &[], false);
    assert!(a.problems.is_empty(), "seed {seed}: {:#?}", a.problems);
    assert!(a.states.is_empty(), "{:?}", a.states);
    println!(
        "soak: seed {seed}, {done} operations, {ROUNDS} kills, {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// Bad state on disk

/// Asserts `audit` finds nothing wrong (orphans of `planted` may have been
/// swept), then removes every VM and asserts the host is empty.
fn clean_up_and_check(env: &TestEnv, planted: &[String]) {
    let a = audit(env, planted, false);
    assert!(
        a.problems.is_empty(),
        "{:#?}\n{}",
        a.problems,
        env.daemon_log()
    );
    for name in a.states.keys() {
        env.hearth_ok(&["rm", "--force", name]);
    }
    let a = audit(env, planted, false);
    assert!(
        a.problems.is_empty(),
        "{:#?}\n{}",
        a.problems,
        env.daemon_log()
    );
    assert!(a.states.is_empty());
}

/// Runs SQL on the env's store while hearthd is down.
fn with_db<T>(env: &TestEnv, f: impl FnOnce(&rusqlite::Connection) -> T) -> T {
    let conn = rusqlite::Connection::open(env.state_dir.join("hearth.db")).unwrap();
    f(&conn)
}

#[test]
fn a_corrupt_runtime_record_is_reported_and_rm_force_cleans_up() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("corrupt");
    env.start_daemon();
    create_vm(&env, BYSTANDER, BY_PORT);
    create_vm(&env, "bad", VUT_PORT);
    start_vm(&env, BYSTANDER);
    start_vm(&env, "bad");
    let by = env.vm(BYSTANDER);
    let bad = env.vm("bad");
    let bad_pid = bad["runtime"]["pid"].as_u64().unwrap();
    let bad_id = bad["id"].as_str().unwrap().to_owned();
    env.kill_daemon();
    // Truncated JSON, as a torn write would leave it.
    let n = with_db(&env, |c| {
        c.execute(
            "UPDATE vms SET runtime = substr(runtime, 1, length(runtime) / 2) WHERE name = 'bad'",
            [],
        )
        .unwrap()
    });
    assert_eq!(n, 1);
    env.start_daemon();
    let vm = env.vm("bad");
    assert_eq!(vm["state"], "error", "{vm}");
    assert!(
        vm["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("corrupt runtime record"),
        "{vm}"
    );
    assert!(env.daemon_log().contains("VM record is corrupt"));
    // Start refuses it with a clear message; the others are untouched.
    let out = env.hearth(&["start", "bad"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("corrupt"), "{}", text(&out));
    assert!(
        bystander_problems(&env, by["runtime"]["pid"].as_u64().unwrap(), &id_of(&by)).is_empty()
    );
    env.hearth_ok(&["rm", "--force", "bad"]);
    assert!(!alive(bad_pid), "the corrupt VM's VMM survived rm --force");
    assert!(vm_opt(&env, "bad").is_none());
    // Its VMM and nft elements could only be found by their marks: the sweep's
    // events name the VM.
    clean_up_and_check(&env, std::slice::from_ref(&bad_id));
}

#[test]
fn a_vm_dir_deleted_by_hand_is_handled() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("nodir");
    env.start_daemon();
    create_vm(&env, "s", BY_PORT);
    create_vm(&env, "r", VUT_PORT);
    // Stopped: start makes what it needs again.
    start_vm(&env, "s");
    env.hearth_ok(&["stop", "s"]);
    let dir = PathBuf::from(env.vm("s")["runtime"]["vm_dir"].as_str().unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
    env.hearth_ok(&["start", "s"]);
    assert_eq!(env.vm("s")["state"], "running");
    // Running: its API socket is gone with the dir, so at the restart the
    // VMM cannot be probed; it is stopped and cleaned, and starts again.
    start_vm(&env, "r");
    let r = env.vm("r");
    let pid = r["runtime"]["pid"].as_u64().unwrap();
    std::fs::remove_dir_all(r["runtime"]["vm_dir"].as_str().unwrap()).unwrap();
    env.kill_daemon();
    env.start_daemon();
    let a = audit(&env, &[], false);
    assert!(
        a.problems.is_empty(),
        "{:#?}\n{}",
        a.problems,
        env.daemon_log()
    );
    let vm = env.vm("r");
    eprintln!(
        "VM dir deleted while running, after a restart: {}",
        vm["state"]
    );
    if vm["state"] == "stopped" {
        assert!(!alive(pid));
        let (_, events) = env.api("GET", "/v1/vms/r/events", None);
        let last = events.as_array().unwrap().last().unwrap()["reason"].to_string();
        assert!(last.contains("did not answer"), "{last}");
    }
    env.hearth_ok(&["start", "r"]);
    assert_eq!(env.vm("r")["state"], "running");
    clean_up_and_check(&env, &[]);
}

/// Schema version 1 as hearthd first wrote it (store/migrations.rs, the
/// first migration), frozen here as an old file would be.
const SCHEMA_V1: &str = "
    CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT;
    INSERT INTO schema_version (version) VALUES (1);
    CREATE TABLE vms (
        id          TEXT PRIMARY KEY NOT NULL,
        name        TEXT NOT NULL UNIQUE,
        spec        TEXT NOT NULL,
        state       TEXT NOT NULL,
        generation  INTEGER NOT NULL,
        runtime     TEXT NOT NULL DEFAULT '{}',
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        last_error  TEXT
     ) STRICT;
     CREATE TABLE events (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id       TEXT NOT NULL,
        at          INTEGER NOT NULL,
        from_state  TEXT,
        to_state    TEXT NOT NULL,
        generation  INTEGER NOT NULL,
        reason      TEXT NOT NULL
     ) STRICT;
     CREATE INDEX events_by_vm ON events (vm_id, seq);";

#[test]
fn a_store_from_an_older_schema_is_migrated_and_served() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("oldsch");
    std::fs::create_dir_all(&env.state_dir).unwrap();
    let id = uuid::Uuid::now_v7().to_string();
    let spec = json!({"vcpus": 1, "memory_mib": 128, "kernel": env.kernel, "rootfs": env.rootfs,
        "capabilities": ["nat", format!("port-forward={BY_PORT}:7")]});
    with_db(&env, |c| {
        c.execute_batch(SCHEMA_V1).unwrap();
        c.execute(
            "INSERT INTO vms (id, name, spec, state, generation, created_at, updated_at)
             VALUES (?1, 'old', ?2, 'stopped', 3, 1700000000000, 1700000000000)",
            rusqlite::params![id, spec.to_string()],
        )
        .unwrap();
        c.execute(
            "INSERT INTO events (vm_id, at, from_state, to_state, generation, reason)
             VALUES (?1, 1700000000000, NULL, 'created', 1, 'create')",
            [&id],
        )
        .unwrap();
    });
    env.start_daemon();
    assert!(
        env.daemon_log().contains("store schema migrated"),
        "{}",
        env.daemon_log()
    );
    let version: i64 = with_db(&env, |c| {
        c.query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap()
    });
    assert_eq!(version, hearthd::store::SCHEMA_VERSION);
    let vm = env.vm("old");
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert_eq!(vm["id"], id.as_str());
    env.hearth_ok(&["start", "old"]);
    assert_eq!(env.vm("old")["state"], "running");
    env.hearth_ok(&["stop", "old"]);
    clean_up_and_check(&env, &[]);
}

#[test]
fn a_store_from_a_newer_schema_is_refused_untouched() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("newsch");
    env.start_daemon();
    create_vm(&env, "a", BY_PORT);
    assert!(env.stop_daemon().success());
    with_db(&env, |c| {
        c.execute("UPDATE schema_version SET version = 99", [])
            .unwrap()
    });
    let st = env
        .try_start_daemon()
        .expect_err("hearthd started on a store from the future");
    assert_eq!(st.code(), Some(1), "{st}");
    let log = env.daemon_log();
    assert!(
        log.contains("schema version 99, newer than this hearthd knows"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    let version: i64 = with_db(&env, |c| {
        c.query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap()
    });
    assert_eq!(version, 99, "the refused file was altered");
    // Put back, it is served again.
    with_db(&env, |c| {
        c.execute(
            "UPDATE schema_version SET version = ?1",
            [hearthd::store::SCHEMA_VERSION],
        )
        .unwrap()
    });
    env.start_daemon();
    assert_eq!(env.vm("a")["state"], "created");
    clean_up_and_check(&env, &[]);
}

#[test]
fn a_socket_left_by_a_dead_daemon_is_replaced() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("stale");
    env.start_daemon();
    create_vm(&env, "a", BY_PORT);
    start_vm(&env, "a");
    let pid = env.vm("a")["runtime"]["pid"].as_u64().unwrap();
    env.kill_daemon();
    assert!(env.socket.exists(), "SIGKILL should leave the socket file");
    env.start_daemon();
    assert!(
        env.daemon_log()
            .contains("removing stale socket left by a dead daemon"),
        "{}",
        env.daemon_log()
    );
    assert_eq!(env.vm("a")["runtime"]["pid"], pid);
    clean_up_and_check(&env, &[]);
}

/// A tmpfs mounted for one test, unmounted when dropped (lazily if
/// something still holds it, so it never outlives the test).
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Fills the filesystem under `dir` with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0xa5u8; chunk];
        while f.write_all(&buf).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

#[test]
fn a_full_disk_under_the_store_fails_clearly_and_recovers() {
    if !require_root() {
        return;
    }
    let mut env = TestEnv::new("full");
    std::fs::create_dir_all(&env.state_dir).unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "hearth-test-tmpfs"])
        .arg(&env.state_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "mount tmpfs: {}", text(&out));
    let _mount = Mount(env.state_dir.clone());
    env.start_daemon();
    create_vm(&env, "a", BY_PORT);
    create_vm(&env, "b", VUT_PORT);
    start_vm(&env, "a");
    let a_pid = env.vm("a")["runtime"]["pid"].as_u64().unwrap();
    let filler = fill(&env.state_dir);

    // Store writes fail now: with a clear error, and the daemon serves on.
    let mut failure = None;
    for i in 0..50 {
        let body = env.create_body(&format!("f{i}"));
        let (s, v) = env.api("POST", "/v1/vms", Some(body));
        if s != 201 {
            failure = Some((s, v));
            break;
        }
    }
    let (s, v) = failure.expect("no store write failed on a full disk");
    assert_eq!(s, 500, "{v}");
    assert!(
        v.to_string().contains("full"),
        "the error does not say the disk is full: {v}"
    );
    let out = env.hearth(&["start", "b"]);
    assert!(!out.status.success(), "start on a full disk succeeded");
    eprintln!("start on a full disk: {}", text(&out).trim());
    assert!(!text(&out).is_empty());
    assert_eq!(env.api("GET", "/v1/health", None).0, 200);
    assert!(
        env.wait_daemon_exit(Duration::ZERO).is_none(),
        "hearthd died"
    );
    assert_eq!(env.vm("a")["runtime"]["pid"], a_pid);

    // Space again: everything works, and at most one kill settles `b`.
    std::fs::remove_file(&filler).unwrap();
    if env.vm("b")["state"] != "stopped" && env.vm("b")["state"] != "created" {
        env.hearth_ok(&["kill", "b"]);
    }
    create_vm(&env, "c", 8003);
    env.hearth_ok(&["start", "b"]);
    env.hearth_ok(&["stop", "b"]);
    assert!(alive(a_pid));
    // A restart finds a consistent store.
    env.kill_daemon();
    env.start_daemon();
    assert_eq!(env.vm("a")["runtime"]["pid"], a_pid);

    // Room for the store but not for a root disk: the copy fails, the
    // start unwinds, and the error says why.
    std::fs::write(&env.rootfs, vec![0x5au8; 12 << 20]).unwrap();
    let filler = fill(&env.state_dir);
    let len = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(len.saturating_sub(2 << 20))
        .unwrap();
    let out = env.hearth(&["start", "c"]);
    assert!(!out.status.success(), "a 12 MiB copy fit in 2 MiB");
    assert!(
        text(&out).contains("No space left on device"),
        "{}",
        text(&out)
    );
    let vm = env.vm("c");
    assert_eq!(vm["state"], "error", "{vm}");
    assert!(holding(&vm).is_empty(), "{vm}");
    std::fs::remove_file(&filler).unwrap();
    env.hearth_ok(&["start", "c"]);
    clean_up_and_check(&env, &[]);
    env.kill_daemon();
}
