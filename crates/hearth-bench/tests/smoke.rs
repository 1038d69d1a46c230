//! The benchmark's smoke run, so the bench never rots: `hearth-bench
//! --quick` (a few repetitions, at most 10 VMs) against the real hearthd
//! and hearth-testvmm built beside it, then a check that the JSON has every
//! figure with sane numbers. It needs root (network namespaces, taps,
//! nftables) and fails loudly without it, unless
//! `HEARTH_SKIP_PRIVILEGED=1` opts out explicitly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The opt-out for machines where root is not available.
const SKIP_ENV: &str = "HEARTH_SKIP_PRIVILEGED";

/// The quick run takes 5 to 10 s; this leaves room for a loaded CI box
/// and for the bench recovering from a hung hearthd operation (10 s each).
const LIMIT: Duration = Duration::from_secs(120);

/// Every figure a quick run must report.
const FIGURES: &[&str] = &[
    "start.hearth",
    "start.bare",
    "start.shell",
    "start.vmm",
    "stop.hearth",
    "stop.bare",
    "stop.shell",
    "bare_step.tap",
    "bare_step.address",
    "bare_step.sysctl",
    "bare_step.nft",
    "bare_step.copy",
    "bare_step.spawn",
    "bare_step.ready",
    "bare_step.puts",
    "bare_step.instance_start",
    "throughput.c1",
    "throughput.c8",
    "throughput.c32",
    "scale.0.rss",
    "scale.10.start",
    "scale.10.nft_apply",
    "scale.10.nft_remove",
    "scale.10.nft_elements",
    "scale.10.rss",
    "recovery.live",
    "recovery.dead",
];

fn require_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var_os(SKIP_ENV).is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: privileged test, not root, and {SKIP_ENV}=1 opts out");
        return false;
    }
    panic!(
        "the hearth-bench smoke test needs root (network namespaces, taps, nftables); \
         run it as root, or set {SKIP_ENV}=1 to skip privileged tests explicitly"
    );
}

#[test]
fn quick_run_reports_every_figure() {
    if !require_root() {
        return;
    }
    let bench = Path::new(env!("CARGO_BIN_EXE_hearth-bench"));
    for sibling in ["hearthd", "hearth-testvmm"] {
        let p = bench.parent().unwrap().join(sibling);
        assert!(
            p.is_file(),
            "{} is missing: build the workspace first (cargo build --workspace)",
            p.display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("hearth-bench-smoke-")
        .tempdir()
        .unwrap();
    let json_path = dir.path().join("bench.json");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let t = Instant::now();
    let mut child = Command::new(bench)
        .arg("--quick")
        .arg("--json")
        .arg(&json_path)
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    // A hung bench must not hang the suite: SIGTERM makes it remove
    // everything it made and exit.
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > LIMIT {
            let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let status = child.wait().unwrap();
            panic!(
                "hearth-bench --quick did not finish within {LIMIT:?} ({status}):\n{}\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    );
    assert!(
        status.success(),
        "hearth-bench --quick failed ({status}):\n{stdout}\n{stderr}"
    );
    eprintln!("{stderr}");
    assert!(stdout.contains("| figure | unit | n | median | p99 | min | max |"));

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let figures = v["figures"].as_object().expect("figures object");
    for key in FIGURES {
        assert!(figures.contains_key(*key), "figure {key} is missing: {v:#}");
    }
    for (key, f) in figures {
        let get = |k: &str| {
            f[k].as_f64()
                .unwrap_or_else(|| panic!("{key}.{k} is not a number: {f}"))
        };
        let (median, p99, min, max) = (get("median"), get("p99"), get("min"), get("max"));
        let n = f["n"].as_u64().unwrap();
        assert!(n >= 1, "{key}: n = {n}");
        assert_eq!(
            f["samples"].as_array().map(Vec::len),
            Some(n as usize),
            "{key}: samples vs n"
        );
        // A share of stolen CPU is often 0; every other figure is a
        // time, a rate, a size or a count of something that exists.
        if key.ends_with(".steal") {
            assert!(
                (0.0..=100.0).contains(&min) && (0.0..=100.0).contains(&max),
                "{key}: {min}..{max} is not a share"
            );
        } else {
            assert!(
                min > 0.0 && min.is_finite(),
                "{key}: min {min} is not positive"
            );
        }
        assert!(
            min <= median && median <= p99 && p99 <= max,
            "{key}: not min ≤ median ≤ p99 ≤ max: {f}"
        );
        assert!(
            f["unit"].as_str().is_some_and(|u| !u.is_empty()),
            "{key}: unit"
        );
    }
    // The headline ratios are derived from the medians.
    for key in ["start.hearth_over_bare", "start.shell_over_hearth"] {
        let x = v["derived"][key]["value"].as_f64().unwrap();
        assert!(x > 0.0 && x.is_finite(), "{key} = {x}");
    }
    // Sanity of the shapes: the VMM alone is part of every variant's
    // start, and the shell variant forks a dozen tools.
    let med = |k: &str| figures[k]["median"].as_f64().unwrap();
    assert!(med("start.vmm") < med("start.bare"), "{v:#}");
    assert!(med("start.shell") > med("start.bare"), "{v:#}");
    assert!(
        med("scale.10.nft_elements") >= 10.0,
        "one VM's elements at least"
    );
    let targets = v["targets"].as_array().unwrap();
    assert!(targets.len() >= 5, "targets: {targets:?}");
    // The JSON's markdown twin is written beside it.
    assert!(json_path.with_extension("md").is_file());
}
