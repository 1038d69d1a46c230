//! The five measurements of issue 6, in the order they run:
//!
//! 1. **start** — hearth, bare, shell and the VMM alone, interleaved rep by
//!    rep (the order rotates each rep, so drift and caches hit all four
//!    alike; the first reps are warm-up and discarded);
//! 2. **stop** — timed in the same reps, right after each start;
//! 3. **throughput** — create→start→stop→delete cycles with 1, 8 and 32
//!    concurrent clients, with the CPU hearthd and its children used per
//!    cycle (operations hearthd refuses are retried as a user would, and
//!    counted);
//! 4. **scale** — the start of one more VM (hearth and bare, taking turns,
//!    spread over 15 s), nft transactions, the rule count and hearthd's RSS
//!    with 10, 100 and 1,000 VMs running;
//! 5. **recovery** — SIGKILL hearthd with the VMs of 4 running and restart
//!    it (re-adoption), then again after killing every VMM while it is
//!    down (teardown of all).
//!
//! Each phase checks its own outcome (a start answered `running`, a stop
//! left no process, no rule, no tap named in the record; every VM was
//! re-adopted or torn down), so a figure is never the time of something
//! that silently did not happen.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hearth_api::{PortForward, Proto, VmRules, VmState, short_id};
use hearthd::host::firewall::Firewall;
use tokio::task::JoinSet;

use crate::api::{Hearth, Hung};
use crate::bare::{Bare, STEPS};
use crate::env::{self, ABORTING, Daemon, Env, UPLINK};
use crate::shell::Shell;
use crate::stats::{Report, num};

/// What to run and how often.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Measured reps of the start/stop phase.
    pub reps: usize,
    /// Discarded reps before them.
    pub warmup: usize,
    /// Trials per concurrency level.
    pub tp_trials: usize,
    /// (clients, cycles per trial).
    pub tp: Vec<(usize, usize)>,
    /// Running-VM counts for the scale phase.
    pub levels: Vec<usize>,
    /// Starts measured at each level, of hearth and of bare alike.
    pub scale_reps: usize,
    /// nft transactions timed at each level.
    pub nft_reps: usize,
    /// Whether to wait for a quiet machine before each phase and level.
    pub settle: bool,
    /// Live-recovery repetitions.
    pub recovery_reps: usize,
    /// Which phases run.
    pub phases: Phases,
}

/// Phase switches.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    /// Start and stop, interleaved.
    pub start: bool,
    /// Cycles per second.
    pub throughput: bool,
    /// 10/100/1,000 running.
    pub scale: bool,
    /// Restart with all VMs alive, then all dead.
    pub recovery: bool,
}

/// Attempts at one start before a throughput cycle gives up.
const START_TRIES: usize = 5;

/// Clients that fill the host with VMs, and empty it again. One: hearthd
/// fails some operations when several run at once (the throughput phase
/// measures that and reports it), and the scale phase must reach its
/// levels reliably, whatever the concurrency bugs of the day.
const FILL_CLIENTS: usize = 1;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn check_abort() -> anyhow::Result<()> {
    if ABORTING.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Progress on stderr, with the time since the bench started.
fn say(t0: Instant, msg: &str) {
    eprintln!("[{:7.1}s] {msg}", t0.elapsed().as_secs_f64());
}

/// Lets what the machine still does for the last phase finish before the
/// next is measured: writes back dirty pages (the last phase's disk
/// copies, which the kernel would otherwise flush in the middle of the
/// next) and waits, up to 10 s, for a quarter second in which the machine
/// is under 10 % busy (deferred kernel work: deleted taps, discards of
/// deleted files). Each phase then measures its own work, on a quiet
/// machine, as a benchmark should. The smoke run (`--quick`), which runs
/// beside the test suite, only syncs (`wait` false).
async fn quiet(t0: Instant, next: &str, wait: bool) {
    let t = Instant::now();
    let _ = tokio::task::spawn_blocking(rustix::fs::sync).await;
    if !wait {
        return;
    }
    loop {
        let before = machine_ticks();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let busy = before.zip(machine_ticks()).map(|(b0, b1)| share(b0, b1));
        if busy.is_none_or(|b| b < 10.0) || t.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    say(
        t0,
        &format!(
            "machine quiet for {next} after {:.1} s",
            t.elapsed().as_secs_f64()
        ),
    );
}

/// How long a full run spreads each scale level's measurements over.
const SCALE_SPREAD: Duration = Duration::from_secs(15);

/// The bench's state across phases.
pub struct Bench<'a> {
    env: &'a Env,
    plan: Plan,
    daemon: Option<Daemon>,
    hearth: Hearth,
    bare: Bare,
    shell: Shell,
    /// Names of the VMs kept running between phases 4 and 5.
    running: Vec<String>,
    /// What was measured.
    pub report: Report,
    /// Operations that failed and were retried or cleaned up, by phase.
    failures: Failures,
    t0: Instant,
}

/// Failed operations: (phase, error chain). hearthd answers some
/// concurrent operations with a 500 (see BENCHMARKS.md); the bench records
/// each, cleans the VM up, and reports how many there were.
type Failures = Arc<Mutex<Vec<(String, String)>>>;

fn record(failures: &Failures, phase: &str, e: &anyhow::Error) {
    failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((phase.to_owned(), format!("{e:#}")));
}

impl std::fmt::Debug for Bench<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bench")
            .field("plan", &self.plan)
            .field("running", &self.running.len())
            .finish_non_exhaustive()
    }
}

/// Runs every phase the plan asks for; returns the report. The daemon is
/// stopped and the host audited at the end (nothing of any variant left).
pub async fn run(env: &Env, plan: Plan, t0: Instant) -> anyhow::Result<Report> {
    let mut daemon = env.spawn_daemon()?;
    env.wait_ready(&mut daemon, Duration::from_secs(30)).await?;
    let mut b = Bench {
        env,
        hearth: Hearth::new(&env.socket, &env.kernel, &env.rootfs),
        bare: Bare::new(env)?,
        shell: Shell::new(env)?,
        plan,
        daemon: Some(daemon),
        running: Vec::new(),
        report: Report::default(),
        failures: Failures::default(),
        t0,
    };
    say(t0, &format!("hearthd up in namespace {}", env.netns));
    if b.plan.phases.start {
        quiet(t0, "start", b.plan.settle).await;
        b.start_phase().await?;
    }
    if b.plan.phases.throughput {
        b.throughput_phase().await?;
    }
    if b.plan.phases.scale {
        quiet(t0, "scale", b.plan.settle).await;
        b.scale_phase().await?;
    }
    if b.plan.phases.recovery {
        quiet(t0, "recovery", b.plan.settle).await;
        b.recovery_phase().await?;
    }
    b.drain().await?;
    if let Some(d) = b.daemon.take() {
        env.stop_daemon(d)?;
    }
    b.audit().await?;
    b.targets();
    b.failure_notes();
    Ok(b.report)
}

impl Bench<'_> {
    fn daemon_pid(&self) -> anyhow::Result<u32> {
        self.daemon
            .as_ref()
            .map(Daemon::pid)
            .context("hearthd is not running")
    }

    /// Phases 1 and 2: start and stop of hearth, bare, shell, and the VMM
    /// alone, interleaved.
    async fn start_phase(&mut self) -> anyhow::Result<()> {
        let (warmup, reps) = (self.plan.warmup, self.plan.reps);
        say(
            self.t0,
            &format!("start/stop: {reps} reps (+{warmup} warm-up) of hearth, bare, shell, VMM"),
        );
        for rep in 0..warmup + reps {
            check_abort()?;
            let keep = rep >= warmup;
            for k in 0..4 {
                match (rep + k) % 4 {
                    0 => self.one_hearth(keep).await?,
                    1 => self.one_bare(keep).await?,
                    2 => self.one_shell(keep).await?,
                    _ => {
                        let t = self.bare.vmm_startup().await?;
                        if keep {
                            self.report.add(
                                "start.vmm",
                                "VMM start-up alone (spawn → API socket ready)",
                                "ms",
                                t,
                            );
                        }
                    }
                }
            }
        }
        env::reap_orphans();
        let r = &mut self.report;
        if let (Some(h), Some(b), Some(s), Some(v)) = (
            r.median("start.hearth"),
            r.median("start.bare"),
            r.median("start.shell"),
            r.median("start.vmm"),
        ) {
            r.derive(
                "start.hearth_over_bare",
                "start: hearth / bare (medians)",
                "×",
                h / b,
            );
            r.derive(
                "start.shell_over_hearth",
                "start: shell / hearth (medians)",
                "×",
                s / h,
            );
            r.derive(
                "start.hearth_minus_bare",
                "start: hearth − bare (what the daemon adds)",
                "ms",
                h - b,
            );
            r.derive(
                "start.hearth_minus_vmm",
                "start: hearth − VMM start-up (hearth's share)",
                "ms",
                h - v,
            );
            r.derive(
                "start.bare_minus_vmm",
                "start: bare − VMM start-up (kernel calls + PUTs)",
                "ms",
                b - v,
            );
        }
        Ok(())
    }

    async fn one_hearth(&mut self, keep: bool) -> anyhow::Result<()> {
        let name = self.hearth.create().await?;
        let t = Instant::now();
        let vm = self.hearth.start(&name).await?;
        let start = ms(t);
        let t = Instant::now();
        self.hearth.stop(&name).await?;
        let stop = ms(t);
        if let Some(pid) = vm.runtime.pid
            && env::alive(pid)
        {
            bail!("hearth answered the stop of {name} while its VMM (pid {pid}) still runs");
        }
        self.hearth.delete(&name).await?;
        if keep {
            self.report.add(
                "start.hearth",
                "start, hearth (API request → `running` answered)",
                "ms",
                start,
            );
            self.report.add(
                "stop.hearth",
                "stop, hearth (API request → every resource released)",
                "ms",
                stop,
            );
        }
        Ok(())
    }

    /// One bare start, stop and delete: the start's and the stop's times
    /// (ms) and the start's steps.
    async fn bare_cycle(&self) -> anyhow::Result<(f64, f64, Vec<f64>)> {
        let t = Instant::now();
        let (vm, steps) = self.bare.start().await?;
        let start = ms(t);
        let t = Instant::now();
        let dir = self.bare.stop(vm).await?;
        let stop = ms(t);
        self.bare.delete(&dir)?;
        Ok((start, stop, steps))
    }

    async fn one_bare(&mut self, keep: bool) -> anyhow::Result<()> {
        let (start, stop, steps) = self.bare_cycle().await?;
        if keep {
            self.report.add(
                "start.bare",
                "start, bare (same kernel calls and PUTs, in-process)",
                "ms",
                start,
            );
            self.report.add("stop.bare", "stop, bare", "ms", stop);
            for ((key, label), v) in STEPS.iter().zip(steps) {
                self.report.add(
                    &format!("bare_step.{key}"),
                    &format!("bare step: {label}"),
                    "ms",
                    v,
                );
            }
        }
        Ok(())
    }

    async fn one_shell(&mut self, keep: bool) -> anyhow::Result<()> {
        let (vm, start) = self.shell.start().await?;
        let stop = self.shell.stop(&vm).await;
        // Its VMM was re-parented to the bench when vm.sh exited: reap it.
        if let Some(pid) = vm.pid
            && !env::wait_gone(pid, Duration::from_secs(5))
        {
            env::sigkill(pid);
            bail!("the shell variant's VMM (pid {pid}) outlived vm.sh stop");
        }
        let stop = stop?;
        std::fs::remove_dir_all(&vm.dir).context("remove the shell VM dir")?;
        if keep {
            self.report.add(
                "start.shell",
                "start, shell (vm.sh: ip, iptables, cp, curl)",
                "ms",
                start,
            );
            self.report
                .add("stop.shell", "stop, shell (vm.sh stop)", "ms", stop);
        }
        Ok(())
    }

    /// Phase 3: full cycles per second at each concurrency.
    async fn throughput_phase(&mut self) -> anyhow::Result<()> {
        for (clients, cycles) in self.plan.tp.clone() {
            say(
                self.t0,
                &format!(
                    "throughput: {clients} clients, {} trials of {cycles} cycles",
                    self.plan.tp_trials
                ),
            );
            for trial in 0..self.plan.tp_trials {
                check_abort()?;
                // Each trial on a quiet machine: a trial lasts about a
                // second, a burst of steal several, so trials back to back
                // could all fall in one burst.
                quiet(
                    self.t0,
                    &format!("throughput, {clients} clients, trial {}", trial + 1),
                    self.plan.settle,
                )
                .await;
                let result = self.cycles(clients, cycles).await;
                self.settle(&format!("throughput, {clients} clients"))
                    .await?;
                let Cycles {
                    rate,
                    lat,
                    cpu_per_cycle,
                    own_cpu_per_cycle,
                    busy,
                    steal,
                } = result?;
                if let Some(steal) = steal {
                    self.report.add(
                        &format!("throughput.c{clients}.steal"),
                        &format!("  CPU stolen by the hypervisor, {clients} client(s)"),
                        "%",
                        steal,
                    );
                }
                if let Some(cpu) = cpu_per_cycle.filter(|&c| c > 0.0) {
                    self.report.add(
                        &format!("throughput.c{clients}.cpu"),
                        &format!("CPU per cycle, {clients} client(s) (hearthd + VMM)"),
                        "ms",
                        cpu,
                    );
                }
                if let Some(cpu) = own_cpu_per_cycle.filter(|&c| c > 0.0) {
                    self.report.add(
                        &format!("throughput.c{clients}.cpu_hearthd"),
                        &format!("  of which hearthd itself, {clients} client(s)"),
                        "ms",
                        cpu,
                    );
                }
                if let Some(busy) = busy.filter(|&b| b > 0.0) {
                    self.report.add(
                        &format!("throughput.c{clients}.busy"),
                        &format!("machine CPU busy, {clients} client(s) (all cores)"),
                        "%",
                        busy,
                    );
                }
                self.report.add(
                    &format!("throughput.c{clients}"),
                    &format!("throughput, {clients} client(s): create→start→stop→delete cycles"),
                    "cycles/s",
                    rate,
                );
                for l in lat {
                    self.report.add(
                        &format!("throughput.c{clients}.cycle"),
                        &format!("one cycle, {clients} concurrent client(s)"),
                        "ms",
                        l,
                    );
                }
            }
        }
        Ok(())
    }

    /// `cycles` full cycles spread over `clients` concurrent clients;
    /// returns successful cycles per second and each one's latency. A
    /// failed cycle is recorded, its VM force-deleted, and not counted.
    async fn cycles(&self, clients: usize, cycles: usize) -> anyhow::Result<Cycles> {
        let next = Arc::new(AtomicUsize::new(0));
        let lat = Arc::new(Mutex::new(Vec::with_capacity(cycles)));
        let phase = format!("throughput, {clients} clients");
        let pid = self.daemon_pid()?;
        let (cpu0, own0, busy0) = (tree_cpu_ms(pid), own_cpu_ms(pid), machine_ticks());
        let steal0 = machine_steal();
        let t = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..clients {
            let (h, next, lat) = (self.hearth.clone(), next.clone(), lat.clone());
            let (failures, phase) = (self.failures.clone(), phase.clone());
            set.spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < cycles {
                    check_abort()?;
                    let t = Instant::now();
                    let name = match h.create().await {
                        Ok(n) => n,
                        Err(e) => {
                            record(&failures, &phase, &e);
                            continue;
                        }
                    };
                    // As a client would: a refused start is retried (from
                    // `error`, hearthd first retries the teardown of what
                    // the failed start left), a refused stop or delete is
                    // finished with a forced delete. Every refusal is
                    // recorded; the cycle counts once its VM is gone.
                    let cycle = async {
                        let mut tries = 0;
                        while let Err(e) = h.start(&name).await {
                            tries += 1;
                            if tries == START_TRIES || e.is::<Hung>() {
                                return Err(e);
                            }
                            record(&failures, &phase, &e);
                        }
                        let stopped = h.stop(&name).await;
                        let deleted = match stopped {
                            Ok(_) => h.delete(&name).await,
                            Err(e) => Err(e),
                        };
                        match deleted {
                            Err(e) if !e.is::<Hung>() => {
                                record(&failures, &phase, &e);
                                h.force_delete(&name).await
                            }
                            other => other,
                        }
                    };
                    match cycle.await {
                        Ok(()) => lat.lock().unwrap_or_else(|p| p.into_inner()).push(ms(t)),
                        Err(e) => {
                            record(&failures, &phase, &e);
                            // What cannot be deleted now is left to
                            // `settle`, after the trial.
                            if let Err(e) = h.force_delete(&name).await {
                                record(&failures, &phase, &e);
                            }
                        }
                    }
                }
                Ok::<(), anyhow::Error>(())
            });
        }
        while let Some(r) = set.join_next().await {
            r.context("client task")??;
        }
        let elapsed = t.elapsed().as_secs_f64();
        let (cpu1, own1, busy1) = (tree_cpu_ms(pid), own_cpu_ms(pid), machine_ticks());
        let steal = steal_since(steal0);
        let lat = std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()));
        if lat.is_empty() {
            bail!("every one of {cycles} cycles with {clients} clients failed");
        }
        let n = lat.len() as f64;
        Ok(Cycles {
            rate: n / elapsed,
            steal,
            cpu_per_cycle: cpu0.zip(cpu1).map(|(a, b)| (b - a) / n),
            own_cpu_per_cycle: own0.zip(own1).map(|(a, b)| (b - a) / n),
            busy: busy0.zip(busy1).map(|(b0, b1)| share(b0, b1)),
            lat,
        })
    }

    /// After a phase in which operations failed: deletes every VM the
    /// bench does not keep running. One that cannot be deleted (its
    /// operation hung, holding its lock) is recovered the way an operator
    /// would: SIGKILL hearthd, restart it (reconcile unwinds what was
    /// interrupted), delete it then.
    async fn settle(&mut self, phase: &str) -> anyhow::Result<()> {
        let keep: std::collections::HashSet<&String> = self.running.iter().collect();
        let leftovers: Vec<String> = match self.hearth.list().await {
            Ok(vms) => vms
                .into_iter()
                .map(|v| v.name)
                .filter(|n| !keep.contains(n))
                .collect(),
            Err(e) => {
                record(&self.failures, phase, &e);
                Vec::new()
            }
        };
        let mut stuck = Vec::new();
        for name in leftovers {
            if let Err(e) = self.hearth.force_delete(&name).await {
                record(&self.failures, phase, &e);
                stuck.push(name);
            }
        }
        if stuck.is_empty() && self.hearth.health().await.is_ok() {
            return Ok(());
        }
        say(
            self.t0,
            &format!(
                "  {} VM(s) stuck after {phase}: restarting hearthd to recover them",
                stuck.len()
            ),
        );
        self.report.note(format!(
            "After {phase}, {} VM(s) could not be deleted (an operation on them hung); \
             the bench restarted hearthd (SIGKILL) and deleted them after its recovery.",
            stuck.len()
        ));
        self.restart(Duration::from_secs(120)).await?;
        for name in stuck {
            self.hearth.force_delete(&name).await?;
        }
        Ok(())
    }

    /// Creates and starts VMs with [`FILL_CLIENTS`] clients until
    /// `self.running` has `level`.
    async fn fill(&mut self, level: usize) -> anyhow::Result<()> {
        let need = level.saturating_sub(self.running.len());
        if need == 0 {
            return Ok(());
        }
        let t = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(Mutex::new(Vec::with_capacity(need)));
        let mut set = JoinSet::new();
        for _ in 0..FILL_CLIENTS.min(need) {
            let (h, next, names) = (self.hearth.clone(), next.clone(), names.clone());
            let failures = self.failures.clone();
            set.spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < need {
                    check_abort()?;
                    let name = h.create().await?;
                    names
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(name.clone());
                    // A failed start leaves the VM in `error`, from which
                    // a start may be retried.
                    let mut tries = 0;
                    while let Err(e) = h.start(&name).await {
                        tries += 1;
                        if tries == 3 {
                            return Err(e);
                        }
                        record(&failures, "fill (start retried)", &e);
                    }
                }
                Ok::<(), anyhow::Error>(())
            });
        }
        let mut result = Ok(());
        while let Some(r) = set.join_next().await {
            if let Err(e) = r.context("fill task").and_then(|r| r) {
                result = Err(e);
            }
        }
        self.running
            .append(&mut names.lock().unwrap_or_else(|p| p.into_inner()));
        result?;
        say(
            self.t0,
            &format!(
                "  {} VMs running ({need} started in {:.1} s)",
                self.running.len(),
                t.elapsed().as_secs_f64()
            ),
        );
        Ok(())
    }

    /// Stops (if running) and deletes every VM in `self.running`, with
    /// [`FILL_CLIENTS`] clients.
    async fn drain(&mut self) -> anyhow::Result<()> {
        if self.running.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let n = self.running.len();
        // After the dead-VMM recovery they are already stopped.
        let states: std::collections::HashMap<String, VmState> = self
            .hearth
            .list()
            .await?
            .into_iter()
            .map(|v| (v.name, v.state))
            .collect();
        let work: Vec<(String, bool)> = std::mem::take(&mut self.running)
            .into_iter()
            .map(|name| {
                let running = states.get(&name) == Some(&VmState::Running);
                (name, running)
            })
            .collect();
        let work = Arc::new(Mutex::new(work));
        let mut set = JoinSet::new();
        for _ in 0..FILL_CLIENTS {
            let (h, work, failures) = (self.hearth.clone(), work.clone(), self.failures.clone());
            set.spawn(async move {
                loop {
                    let Some((name, running)) =
                        work.lock().unwrap_or_else(|p| p.into_inner()).pop()
                    else {
                        return Ok::<(), anyhow::Error>(());
                    };
                    let done = async {
                        if running {
                            h.stop(&name).await?;
                        }
                        h.delete(&name).await
                    };
                    if let Err(e) = done.await {
                        record(&failures, "drain (force-deleted)", &e);
                        h.force_delete(&name).await?;
                    }
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.context("drain task")??;
        }
        env::reap_orphans();
        say(
            self.t0,
            &format!(
                "stopped and deleted {n} VMs in {:.1} s",
                t.elapsed().as_secs_f64()
            ),
        );
        Ok(())
    }

    /// Phase 4: at each level, the start of one more VM, one nft
    /// transaction, the rule count, and hearthd's RSS.
    async fn scale_phase(&mut self) -> anyhow::Result<()> {
        let pid = self.daemon_pid()?;
        let base = rss_mib(pid)?;
        self.report.extra("scale.0.rss_kib", rss_breakdown(pid));
        self.report
            .add("scale.0.rss", "hearthd RSS, no VM running", "MiB", base);
        for level in self.plan.levels.clone() {
            check_abort()?;
            say(self.t0, &format!("scale: filling to {level} running VMs"));
            self.fill(level).await?;
            // Let the fill's last watchers, log writes and disk copies
            // settle: measured is a start on a host with that many VMs,
            // not one in the wake of starting them.
            quiet(self.t0, &format!("scale, {level} VMs"), self.plan.settle).await;
            // Round by round, hearth's start, the bare start and nft
            // transactions take turns (the first of the two starts
            // alternates), so all three see the host alike; in a full run
            // the rounds are spread over `SCALE_SPREAD`, so that a burst
            // of steal, which lasts seconds on a shared host, cannot set a
            // level's median on its own.
            let steal0 = machine_steal();
            let rounds = self.plan.scale_reps;
            let nft_per_round = self.plan.nft_reps.div_ceil(rounds);
            let gap = if self.plan.settle {
                SCALE_SPREAD / u32::try_from(rounds).unwrap_or(u32::MAX)
            } else {
                Duration::ZERO
            };
            for round in 0..rounds {
                check_abort()?;
                let round_started = Instant::now();
                for k in 0..2 {
                    if (round + k) % 2 == 0 {
                        self.scale_hearth(level).await?;
                    } else {
                        self.scale_bare(level).await?;
                    }
                }
                let done = round * nft_per_round;
                for _ in done..(done + nft_per_round).min(self.plan.nft_reps) {
                    let (apply, remove) = self.nft_transaction().await?;
                    self.report.add(
                        &format!("scale.{level}.nft_apply"),
                        &format!("nftables transaction (one VM's apply), {level} VMs"),
                        "ms",
                        apply,
                    );
                    self.report.add(
                        &format!("scale.{level}.nft_remove"),
                        &format!("nftables transaction (one VM's removal), {level} VMs"),
                        "ms",
                        remove,
                    );
                }
                tokio::time::sleep(gap.saturating_sub(round_started.elapsed())).await;
            }
            if let Some(steal) = steal_since(steal0) {
                self.report.add(
                    &format!("scale.{level}.steal"),
                    &format!("  CPU stolen by the hypervisor while measuring, {level} VMs"),
                    "%",
                    steal,
                );
            }
            let counts = nft_counts().await?;
            self.report.add(
                &format!("scale.{level}.nft_elements"),
                &format!(
                    "nft set elements in table ip hearth (rules: {}), {level} VMs",
                    counts.rules
                ),
                "elements",
                counts.elements as f64,
            );
            self.report.extra(
                &format!("scale.{level}.nft"),
                serde_json::json!({"rules": counts.rules, "chains": counts.chains, "elements": counts.elements, "marked": counts.marked}),
            );
            if let (Some(h), Some(b)) = (
                self.report.median(&format!("scale.{level}.start")),
                self.report.median(&format!("scale.{level}.bare")),
            ) {
                self.report.derive(
                    &format!("scale.{level}.hearth_over_bare"),
                    &format!("start with {level} VMs running: hearth / bare (medians)"),
                    "×",
                    h / b,
                );
            }
            let pid = self.daemon_pid()?;
            self.report
                .extra(&format!("scale.{level}.rss_kib"), rss_breakdown(pid));
            let rss = rss_mib(pid)?;
            self.report.add(
                &format!("scale.{level}.rss"),
                &format!("hearthd RSS, {level} VMs running"),
                "MiB",
                rss,
            );
            self.report.derive(
                &format!("scale.{level}.rss_per_vm"),
                &format!("hearthd RSS per VM above idle, {level} VMs"),
                "KiB",
                (rss - base) * 1024.0 / level as f64,
            );
        }
        Ok(())
    }

    /// One start of a VM through hearthd with `level` VMs running (it is
    /// stopped and deleted after, untimed).
    async fn scale_hearth(&mut self, level: usize) -> anyhow::Result<()> {
        let name = self.hearth.create().await?;
        let t = Instant::now();
        self.hearth.start(&name).await?;
        let took = ms(t);
        self.hearth.stop(&name).await?;
        self.hearth.delete(&name).await?;
        self.report.add(
            &format!("scale.{level}.start"),
            &format!("start, hearth, with {level} VMs running"),
            "ms",
            took,
        );
        Ok(())
    }

    /// One bare start with `level` VMs running, with its steps.
    async fn scale_bare(&mut self, level: usize) -> anyhow::Result<()> {
        let (took, _, steps) = self.bare_cycle().await?;
        self.report.add(
            &format!("scale.{level}.bare"),
            &format!("start, bare, with {level} VMs running"),
            "ms",
            took,
        );
        for ((key, label), v) in STEPS.iter().zip(steps) {
            if matches!(*key, "address" | "nft" | "spawn" | "puts") {
                self.report.add(
                    &format!("scale.{level}.bare_step.{key}"),
                    &format!("  bare step with {level} VMs: {label}"),
                    "ms",
                    v,
                );
            }
        }
        Ok(())
    }

    /// One apply and one removal of a VM-shaped plan (NAT + one port
    /// forward) through hearthd's own nft code, in hearth's table.
    async fn nft_transaction(&self) -> anyhow::Result<(f64, f64)> {
        let id = uuid::Uuid::now_v7();
        let rules = VmRules {
            short_id: short_id(&id),
            vm_id: id.to_string(),
            tap: "hthz0".into(),
            guest_ip: std::net::Ipv4Addr::new(10, 234, 0, 2),
            nat_uplink: Some(UPLINK.into()),
            port_forwards: vec![PortForward {
                host_port: 60_001,
                proto: Proto::Tcp,
                guest_port: 80,
            }],
        };
        let fw = self.bare.firewall();
        let t = Instant::now();
        fw.apply(&rules).await.context("nft apply")?;
        let apply = ms(t);
        let t = Instant::now();
        fw.remove(&rules).await.context("nft remove")?;
        Ok((apply, ms(t)))
    }

    /// Phase 5: restart with every VM alive, then with every VMM dead.
    async fn recovery_phase(&mut self) -> anyhow::Result<()> {
        let top = self.plan.levels.iter().copied().max().unwrap_or(10);
        self.fill(top).await?;
        let n = self.running.len();
        let pids: Vec<u32> = self
            .hearth
            .list()
            .await?
            .iter()
            .filter(|v| v.state == VmState::Running)
            .filter_map(|v| v.runtime.pid)
            .collect();
        if pids.len() != n {
            bail!("{n} VMs should be running, the API lists {}", pids.len());
        }
        say(
            self.t0,
            &format!("recovery: SIGKILL hearthd with {n} VMs running, restart"),
        );
        for _ in 0..self.plan.recovery_reps {
            check_abort()?;
            let took = self.restart(Duration::from_secs(60)).await?;
            let h = self.hearth.health().await?;
            let running = h.vms.get("running").copied().unwrap_or(0);
            if running != n as u64 {
                let e = anyhow::anyhow!(
                    "after the restart {running} of {n} VMs are running: {:?}",
                    h.vms
                );
                record(&self.failures, "recovery of live VMs", &e);
            }
            self.report.add(
                "recovery.live",
                &format!("recovery: restart → API answers, {n} live VMs re-adopted"),
                "ms",
                took,
            );
            if let Some(cpu) = tree_cpu_ms(self.daemon_pid()?).filter(|&c| c > 0.0) {
                self.report.add(
                    "recovery.live.cpu",
                    "  CPU hearthd used for it (with its children)",
                    "ms",
                    cpu,
                );
            }
            if let Some(t) = self.recover_took_ms().filter(|&t| t > 0.0) {
                self.report.add(
                    "recovery.live.recover",
                    &format!("  of which Lifecycle::recover ({n} VMs, from hearthd's log)"),
                    "ms",
                    t,
                );
            }
        }
        say(
            self.t0,
            &format!("recovery: SIGKILL hearthd, kill all {n} VMMs, restart"),
        );
        let d = self.daemon.take().context("hearthd is not running")?;
        self.env.kill_daemon(d)?;
        for &pid in &pids {
            env::sigkill(pid);
        }
        for &pid in &pids {
            if !env::wait_gone(pid, Duration::from_secs(10)) {
                bail!("VMM {pid} survived SIGKILL");
            }
        }
        let took = self.start_daemon(Duration::from_secs(600)).await?;
        let h = self.hearth.health().await?;
        let (running, stopped) = (
            h.vms.get("running").copied().unwrap_or(0),
            h.vms.get("stopped").copied().unwrap_or(0),
        );
        if running != 0 || stopped != n as u64 {
            let e = anyhow::anyhow!(
                "after the restart with dead VMMs: {:?} (wanted all {n} stopped)",
                h.vms
            );
            record(&self.failures, "recovery of dead VMs", &e);
        }
        // Each VM torn down holds no element any more (those whose
        // teardown failed may, until the drain force-deletes them).
        let marked = nft_counts().await?.marked;
        let left = n - (stopped as usize).min(n);
        if marked > 6 * left {
            bail!("{marked} marked nft elements left after tearing down {stopped} dead VMs");
        }
        self.report.add(
            "recovery.dead",
            &format!("recovery: restart → API answers, {n} dead VMs torn down"),
            "ms",
            took,
        );
        if let Some(cpu) = tree_cpu_ms(self.daemon_pid()?).filter(|&c| c > 0.0) {
            self.report.add(
                "recovery.dead.cpu",
                "  CPU hearthd used for it (with its children)",
                "ms",
                cpu,
            );
        }
        if let Some(t) = self.recover_took_ms().filter(|&t| t > 0.0) {
            self.report.add(
                "recovery.dead.recover",
                &format!("  of which Lifecycle::recover ({n} VMs, from hearthd's log)"),
                "ms",
                t,
            );
        }
        Ok(())
    }

    /// SIGKILLs hearthd and starts it again; returns the time from the
    /// new spawn to its first API answer.
    async fn restart(&mut self, timeout: Duration) -> anyhow::Result<f64> {
        let d = self.daemon.take().context("hearthd is not running")?;
        self.env.kill_daemon(d)?;
        self.start_daemon(timeout).await
    }

    async fn start_daemon(&mut self, timeout: Duration) -> anyhow::Result<f64> {
        let t = Instant::now();
        let mut d = self.env.spawn_daemon()?;
        let ready = self.env.wait_ready(&mut d, timeout).await;
        let took = ms(t);
        self.daemon = Some(d);
        ready?;
        Ok(took)
    }

    /// `took_ms` of the last "recovered VMs from the store" log line.
    fn recover_took_ms(&self) -> Option<f64> {
        let log = std::fs::read_to_string(&self.env.daemon_log).ok()?;
        let line = log.lines().rev().find(|l| l.contains("recovered VMs"))?;
        let v = line.split("took_ms=").nth(1)?;
        let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// After everything: no process of any variant, no marked nft element,
    /// no bare or shell tap, no iptables rule of the shell variant.
    async fn audit(&mut self) -> anyhow::Result<()> {
        env::reap_orphans();
        let mut problems = Vec::new();
        let procs = env::processes_mentioning(&self.env.tmp);
        if !procs.is_empty() {
            problems.push(format!("processes still running: {procs:?}"));
        }
        let counts = nft_counts().await?;
        if counts.marked != 0 {
            problems.push(format!("{} marked nft elements left", counts.marked));
        }
        let links = ip_links().await?;
        let strays: Vec<&String> = links
            .iter()
            .filter(|l| l.starts_with("hthb") || l.starts_with("hths") || l.starts_with("hthz"))
            .collect();
        if !strays.is_empty() {
            problems.push(format!("taps left: {strays:?}"));
        }
        let ipt = tokio::process::Command::new("iptables-save")
            .output()
            .await
            .context("run iptables-save")?;
        let ipt = String::from_utf8_lossy(&ipt.stdout);
        let rules: Vec<&str> = ipt.lines().filter(|l| l.starts_with("-A")).collect();
        if !rules.is_empty() {
            problems.push(format!("iptables rules left: {rules:?}"));
        }
        if !problems.is_empty() {
            bail!("the bench host is not clean: {}", problems.join("; "));
        }
        say(
            self.t0,
            "audit: no process, tap, nft element or iptables rule left",
        );
        Ok(())
    }

    /// One note per phase in which hearthd failed operations.
    fn failure_notes(&mut self) {
        let failures =
            std::mem::take(&mut *self.failures.lock().unwrap_or_else(|p| p.into_inner()));
        let mut by_phase: Vec<(String, usize, String)> = Vec::new();
        for (phase, e) in failures {
            match by_phase.iter_mut().find(|(p, ..)| *p == phase) {
                Some((_, n, _)) => *n += 1,
                None => by_phase.push((phase, 1, e)),
            }
        }
        let mut json = serde_json::Map::new();
        for (phase, n, first) in by_phase {
            self.report.note(format!(
                "hearthd failed {n} operation(s) during {phase}; the first: `{first}`"
            ));
            json.insert(phase, serde_json::json!({"count": n, "first": first}));
        }
        self.report
            .extra("failures", serde_json::Value::Object(json));
    }

    /// Checks the targets against what was measured.
    fn targets(&mut self) {
        let r = &mut self.report;
        if let Some(x) = r.derived("start.hearth_over_bare") {
            r.target(
                "start overhead hearth/bare ≤ 1.5 (median)",
                format!("{}×", num(x)),
                x <= 1.5,
            );
        }
        if let Some(x) = r.derived("start.shell_over_hearth") {
            r.target(
                "start overhead shell/hearth ≥ 10 (median)",
                format!("{}×", num(x)),
                x >= 10.0,
            );
        }
        if let Some(x) = r.median("throughput.c8") {
            r.target(
                "≥ 150 cycles/s at 8 clients",
                format!("{} cycles/s", num(x)),
                x >= 150.0,
            );
        }
        let levels = &self.plan.levels;
        if let (Some(&lo), Some(&hi)) = (levels.first(), levels.last())
            && hi > lo
        {
            for (what, key) in [
                ("start overhead", "start"),
                ("nftables transaction time", "nft_apply"),
            ] {
                if let (Some(a), Some(b)) = (
                    r.median(&format!("scale.{lo}.{key}")),
                    r.median(&format!("scale.{hi}.{key}")),
                ) {
                    r.target(
                        format!("{what} with {hi} VMs ≤ 1.2 × with {lo}"),
                        format!("{} → {} ms ({}×)", num(a), num(b), num(b / a)),
                        b <= 1.2 * a,
                    );
                }
            }
        }
        // At every level: the allowance is 20 MiB however few VMs run.
        for &n in levels {
            if let Some(rss) = r.median(&format!("scale.{n}.rss")) {
                let limit = 20.0 + n as f64 * 16.0 / 1024.0;
                r.target(
                    format!(
                        "hearthd RSS ≤ 20 MiB + 16 KiB per VM ({n} VMs: ≤ {} MiB)",
                        num(limit)
                    ),
                    format!("{} MiB", num(rss)),
                    rss <= limit,
                );
            }
        }
        let with = |n: usize| {
            if n == 1000 {
                String::new()
            } else {
                format!(" (measured with {n})")
            }
        };
        let top = levels.last().copied().unwrap_or(0);
        if let Some(s) = r.summary("recovery.live") {
            r.target(
                format!("recovery of 1,000 live VMs ≤ 1 s{}", with(top)),
                format!("{} ms (median)", num(s.median)),
                s.median <= 1000.0,
            );
        }
        if let Some(s) = r.summary("recovery.dead") {
            r.target(
                format!("teardown of 1,000 dead VMs ≤ 5 s{}", with(top)),
                format!("{} ms", num(s.median)),
                s.median <= 5000.0,
            );
        }
    }
}

/// hearthd's resident set, in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

/// What hearth's nft table holds.
#[derive(Debug, Default)]
struct NftCounts {
    rules: usize,
    chains: usize,
    /// Set and map elements.
    elements: usize,
    /// Elements marked `hearth:vm:…` (every per-VM object is one).
    marked: usize,
}

/// Counts rules, chains and set elements in `table ip hearth` (absent
/// table: all zero).
async fn nft_counts() -> anyhow::Result<NftCounts> {
    let out = tokio::process::Command::new("nft")
        .args(["-j", "list", "table", "ip", "hearth"])
        .output()
        .await
        .context("run nft list table")?;
    if !out.status.success() {
        return Ok(NftCounts::default());
    }
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parse nft -j list table")?;
    let mut c = NftCounts::default();
    for obj in doc["nftables"].as_array().into_iter().flatten() {
        if obj.get("rule").is_some() {
            c.rules += 1;
        } else if obj.get("chain").is_some() {
            c.chains += 1;
        } else if let Some(set) = obj.get("set").or_else(|| obj.get("map")) {
            for e in set["elem"].as_array().into_iter().flatten() {
                c.elements += 1;
                // A map's element is [key, data]; a commented key is
                // {"elem": {"val": …, "comment": …}}.
                let key = if obj.get("map").is_some() { &e[0] } else { e };
                let comment = key["elem"]["comment"].as_str().unwrap_or_default();
                if comment.starts_with("hearth:vm:") {
                    c.marked += 1;
                }
            }
        }
    }
    Ok(c)
}

/// Names of the links in the bench namespace (`ip -o link`: netlink, so
/// it sees this namespace; `/sys/class/net` would show the root one).
async fn ip_links() -> anyhow::Result<Vec<String>> {
    let out = tokio::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .await
        .context("run ip link")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect())
}

/// What one throughput trial measured.
#[derive(Debug)]
struct Cycles {
    /// Successful cycles per second.
    rate: f64,
    /// Each successful cycle's wall time (ms).
    lat: Vec<f64>,
    /// CPU (ms) hearthd and its reaped children (the VMMs) used per cycle.
    cpu_per_cycle: Option<f64>,
    /// CPU (ms) hearthd alone used per cycle.
    own_cpu_per_cycle: Option<f64>,
    /// How busy all of the machine's cores were (%).
    busy: Option<f64>,
    /// How much of the machine's CPU the hypervisor took (%).
    steal: Option<f64>,
}

/// CPU time (ms) `pid` used, with that of its children it has reaped
/// (`utime + stime + cutime + cstime` of `/proc/<pid>/stat`): for hearthd,
/// its own work plus every VMM it reaped. Linux
/// reports these in USER_HZ, which is 100 on every architecture hearth
/// runs on.
fn tree_cpu_ms(pid: u32) -> Option<f64> {
    stat_cpu_ms(pid, 4)
}

/// CPU time (ms) `pid` used itself (`utime + stime`).
fn own_cpu_ms(pid: u32) -> Option<f64> {
    stat_cpu_ms(pid, 2)
}

/// The sum of the first `n` of `/proc/<pid>/stat`'s fields 14–17
/// (utime, stime, cutime, cstime), in ms.
fn stat_cpu_ms(pid: u32, n: usize) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // `rest` starts at field 3, so field 14 is at 11.
    let ticks: f64 = f
        .get(11..11 + n)?
        .iter()
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    Some(ticks * 10.0)
}

/// The all-cores `cpu` line of `/proc/stat`, in jiffies: user, nice,
/// system, idle, iowait, irq, softirq, steal, ….
fn cpu_jiffies() -> Option<Vec<f64>> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = text.lines().next()?.strip_prefix("cpu ")?;
    Some(
        cpu.split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect(),
    )
}

/// (busy, total) jiffies of all cores: busy is all but idle and iowait.
fn machine_ticks() -> Option<(f64, f64)> {
    let v = cpu_jiffies()?;
    let total: f64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0.0);
    Some((total - idle, total))
}

/// (steal, total) jiffies of all cores: steal is the time the hypervisor
/// ran something else while this machine wanted its CPUs.
fn machine_steal() -> Option<(f64, f64)> {
    let v = cpu_jiffies()?;
    Some((*v.get(7)?, v.iter().sum()))
}

/// The share (%) of the machine's CPU time a (part, total) jiffies count
/// moved by between `before` and `after`.
fn share(before: (f64, f64), after: (f64, f64)) -> f64 {
    100.0 * (after.0 - before.0) / (after.1 - before.1).max(1.0)
}

/// The share (%) of the machine's CPU time stolen since `before`.
fn steal_since(before: Option<(f64, f64)>) -> Option<f64> {
    Some(share(before?, machine_steal()?))
}

/// hearthd's RSS split (KiB): anonymous (heap, stacks), file-backed (its
/// binary and libraries), shared memory; and its thread count.
fn rss_breakdown(pid: u32) -> serde_json::Value {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    serde_json::json!({
        "rss": get("VmRSS:"),
        "anon": get("RssAnon:"),
        "file": get("RssFile:"),
        "shmem": get("RssShmem:"),
        "threads": get("Threads:"),
    })
}
