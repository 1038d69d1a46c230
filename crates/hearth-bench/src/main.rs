//! `hearth-bench`: what starting a VM costs the host under hearth, beside
//! the bare minimum and the shell-script way, and how that cost holds up
//! with 1,000 VMs running (issue 6).
//!
//! Why a binary and not a `cargo bench` target: it needs root, two network
//! namespaces, a real `hearthd` that it SIGKILLs and restarts, and a
//! thousand VMM processes — a whole isolated host, set up once and torn
//! down completely even on Ctrl-C — and it reports figures (medians, p99s,
//! ratios, a verdict per target of the issue), not a pass/fail.
//!
//! It runs the real `hearthd` and `hearth-testvmm` binaries (siblings of
//! this one in the target dir, or `--hearthd`/`--testvmm`), prints a
//! markdown table, and writes the JSON to `target/bench/hearth-bench.json`
//! (and the table beside it). `--quick` is the smoke run the test suite
//! uses; BENCHMARKS.md has the full run and its reading.

mod api;
mod bare;
mod env;
mod phases;
mod shell;
mod stats;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;

use crate::env::{Binaries, CleanupGuard, Env};
use crate::phases::{Phases, Plan};

/// Benchmarks hearth's VM start against the bare minimum and the
/// shell-script way, and its scaling to many VMs. Runs as root, in network
/// namespaces of its own, and removes everything it made.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The smoke run: few repetitions, at most 10 VMs (no 100/1,000).
    #[arg(long)]
    quick: bool,
    /// Largest number of running VMs for the scale and recovery phases
    /// (levels are 10, 100, 1,000 up to this; default 1,000, 10 with
    /// --quick).
    #[arg(long, value_name = "N")]
    vms: Option<usize>,
    /// Measured repetitions of the start/stop comparison (default 30, 3
    /// with --quick) and starts measured at each scale level, of hearth
    /// and of bare (default 20, 3 with --quick).
    #[arg(long, value_name = "N")]
    reps: Option<usize>,
    /// Phases to run, comma-separated: start, throughput, scale, recovery
    /// (default: all).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    phases: Vec<String>,
    /// The hearthd binary (default: beside this one).
    #[arg(long, value_name = "PATH")]
    hearthd: Option<PathBuf>,
    /// The VMM binary (default: hearth-testvmm beside this one).
    #[arg(long, value_name = "PATH")]
    testvmm: Option<PathBuf>,
    /// Where to write the JSON (default: <target>/bench/hearth-bench.json).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// An extra line for hearthd's config file, `key = value` in TOML (for
    /// experiments: `--hearthd-config 'poll_interval_ms = 3600000'`).
    /// Repeatable; recorded in the JSON.
    #[arg(long = "hearthd-config", value_name = "TOML")]
    hearthd_config: Vec<String>,
}

/// The tools the bench runs and the Debian packages that have them.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("iptables", "iptables"),
    ("iptables-save", "iptables"),
    ("curl", "curl"),
    ("bash", "bash"),
    ("cp", "coreutils"),
];

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn plan(args: &Args) -> anyhow::Result<Plan> {
    let quick = args.quick;
    let cap = args.vms.unwrap_or(if quick { 10 } else { 1000 });
    if cap == 0 {
        bail!("--vms must be at least 1");
    }
    let mut levels: Vec<usize> = [10, 100, 1000].into_iter().filter(|&l| l < cap).collect();
    levels.push(cap);
    let reps = args.reps.unwrap_or(if quick { 3 } else { 30 }).max(1);
    let mut phases = Phases {
        start: true,
        throughput: true,
        scale: true,
        recovery: true,
    };
    if !args.phases.is_empty() {
        phases = Phases {
            start: false,
            throughput: false,
            scale: false,
            recovery: false,
        };
        for p in &args.phases {
            match p.as_str() {
                "start" => phases.start = true,
                "throughput" => phases.throughput = true,
                "scale" => phases.scale = true,
                "recovery" => phases.recovery = true,
                other => bail!("unknown phase {other:?} (start, throughput, scale, recovery)"),
            }
        }
    }
    Ok(Plan {
        reps,
        warmup: if quick { 1 } else { 3 },
        tp_trials: if quick { 1 } else { 5 },
        tp: if quick {
            vec![(1, 2), (8, 8), (32, 32)]
        } else {
            vec![(1, 30), (8, 120), (32, 256)]
        },
        levels,
        scale_reps: args.reps.unwrap_or(if quick { 3 } else { 20 }).max(1),
        nft_reps: if quick { 3 } else { 50 },
        settle: !quick,
        recovery_reps: if quick { 1 } else { 3 },
        phases,
    })
}

/// A sibling of this executable, or what `given` names.
fn binary(given: Option<&Path>, name: &str) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()
            .context("find this executable")?
            .parent()
            .context("this executable has no directory")?
            .join(name),
    };
    if !path.is_file() {
        bail!(
            "{} not found: build the workspace first (`cargo build --release --workspace`) or name it with --{}",
            path.display(),
            if name == "hearthd" {
                "hearthd"
            } else {
                "testvmm"
            }
        );
    }
    // The bench enters a network namespace, so relative paths must not
    // depend on anything but the working directory: make them absolute.
    std::path::absolute(&path).with_context(|| format!("resolve {}", path.display()))
}

/// `<target>/bench/hearth-bench.json`: this executable lives in
/// `<target>/<profile>/`.
fn default_json() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("find this executable")?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot tell the target dir from this executable's path; use --json")?;
    Ok(target.join("bench").join("hearth-bench.json"))
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The machine and tool versions, for the JSON's `context`.
fn machine(bins: &Binaries) -> serde_json::Value {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    serde_json::json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "mem_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "rustc": first_line("rustc", &["--version"]),
        "hearthd": first_line(&bins.hearthd.display().to_string(), &["--version"]),
        "nft": first_line("nft", &["--version"]),
        "iptables": first_line("iptables", &["--version"]),
        "curl": first_line("curl", &["--version"]),
    })
}

fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    if !rustix::process::geteuid().is_root() {
        bail!(
            "hearth-bench must run as root: it makes network namespaces, taps, nftables rules \
             and runs hearthd"
        );
    }
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(t, _)| !env::on_path(t))
        .map(|(t, p)| format!("{t} (Debian package {p})"))
        .collect();
    if !missing.is_empty() {
        bail!("missing tools: {}", missing.join(", "));
    }
    let plan = plan(&args)?;
    let bins = Binaries {
        hearthd: binary(args.hearthd.as_deref(), "hearthd")?,
        testvmm: binary(args.testvmm.as_deref(), "hearth-testvmm")?,
    };
    let json_path = match &args.json {
        Some(p) => std::path::absolute(p).context("resolve --json")?,
        None => default_json()?,
    };
    let context = serde_json::json!({
        "machine": machine(&bins),
        "settings": {
            "quick": args.quick,
            "reps": plan.reps,
            "warmup": plan.warmup,
            "levels": plan.levels,
            "throughput": plan.tp,
            "throughput_trials": plan.tp_trials,
            "rootfs": "64 MiB sparse image, 1.06 MiB of data, copied (disk_strategy = copy)",
            "vm": "1 vCPU, 128 MiB, capabilities nat + port-forward",
            "hearthd_config": args.hearthd_config,
        },
    });

    env::prepare_process()?;
    env::install_signal_cleanup()?;
    let guard = CleanupGuard;
    let env = Env::create(bins, &args.hearthd_config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let result = rt.block_on(phases::run(&env, plan, t0));
    drop(rt);
    // On failure, keep hearthd's log (the temp dir is about to go).
    let kept_log = json_path.with_file_name("hearthd-failed.log");
    let kept = result.is_err()
        && json_path
            .parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
        && std::fs::copy(&env.daemon_log, &kept_log).is_ok();
    let cleaned = env::cleanup();
    drop(guard);
    let report = match result {
        Ok(r) => r,
        Err(e) if kept => {
            return Err(e.context(format!("hearthd's log is in {}", kept_log.display())));
        }
        Err(e) => return Err(e),
    };
    // After a successful run the phases have stopped and deleted
    // everything; anything the final cleanup still had to kill is a leak.
    if cleaned.killed > 0 || !cleaned.errors.is_empty() {
        bail!(
            "cleanup had to kill {} process(es){}",
            cleaned.killed,
            cleaned
                .errors
                .iter()
                .map(|e| format!("; {e}"))
                .collect::<String>()
        );
    }

    let md = report.markdown();
    println!("{md}");
    let mut json = report.json(context);
    json["context"]["seconds"] = serde_json::json!(t0.elapsed().as_secs_f64());
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&json).context("encode the JSON")?;
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    std::fs::write(json_path.with_extension("md"), md)
        .with_context(|| format!("write {}", json_path.with_extension("md").display()))?;
    eprintln!(
        "hearth-bench: done in {:.0} s; wrote {}",
        t0.elapsed().as_secs_f64(),
        json_path.display()
    );
    Ok(())
}
