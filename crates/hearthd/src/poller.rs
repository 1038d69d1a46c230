//! The stats poller: a background task that, every `poll_interval_ms`,
//! looks at every VM the store knows and
//!
//! - samples each running VM's usage — CPU time and RSS of its VMM from
//!   `/proc`, uptime from the runtime record, and the last flush of
//!   Firecracker's metrics file — for `hearth stats` and `GET /v1/stats`;
//! - tears down a `running` VM whose VMM is gone. The pidfd watcher
//!   normally notices an exit at once, but it is a task in this process:
//!   a teardown that failed, a watcher lost to a bug, a VMM that died in the
//!   instant between recovery and its new watcher would otherwise leave a
//!   VM reported `running` forever. The poller is the safety net, and runs
//!   the same teardown (DESIGN.md, invariant 2);
//! - stops a running VM whose TTL has ended.
//!
//! It never takes a VM lock itself and never writes a state: every action
//! is a generation-guarded [`Lifecycle`] call ([`Lifecycle::reap_if_gone`],
//! [`Lifecycle::expire`]) given the generation the poller read, so a poller
//! that read an old state never overwrites a newer one. The store's list,
//! `/proc` and the metrics files are read on blocking threads, one batch
//! per round, with no VM lock held. Actions run in tasks of their own, at
//! most one per VM, so a graceful stop that waits `stop_timeout_secs`
//! never delays a round.
//! The samples live in memory only (in [`Samples`], owned by the
//! lifecycle so the API can read them): they are measurements, not state,
//! and the next round rebuilds them after a restart.
//!
//! Before reading a process's usage the poller checks that it is still the
//! VMM the record names: `/proc/<pid>` is opened once and `stat` and
//! `statm` are read through that directory, so they describe the same
//! process, whose start time (field 22) must equal the recorded one. A pid
//! reused by another process reads as "gone", and `reap_if_gone` then
//! checks again under the VM's lock before it tears anything down.
//!
//! # TTL
//!
//! A TTL is a lease on the wall clock. `--ttl 30m` at create means the VM
//! may run until 30 minutes after the create; `hearth ttl web 2h` moves the
//! end to two hours from now, `hearth ttl web none` removes it. The end is
//! stored as an absolute Unix time in the VM's row, so it survives daemon
//! restarts and host reboots, and a deadline that passed while hearthd was
//! down is acted on at the first round after it comes back.
//!
//! It counts from the create (or the `ttl` call), not from each start: one
//! absolute time means the same thing whatever happens in between, and
//! neither a restart of the VM nor one of the daemon extends it. For
//! `hearth run --ttl` the two coincide.
//!
//! When the deadline passes, a running VM is stopped as `hearth stop` does
//! (Ctrl-Alt-Del, SIGKILL after `stop_timeout_secs`), with `ttl expired` in
//! its events. Then the deadline is cleared: a TTL fires once, so starting
//! the VM again runs it without a limit until a new TTL is set (it would
//! otherwise be stopped again at once). A VM that is not running when its
//! deadline passes only has the deadline cleared; one that is starting or
//! stopping at that moment is dealt with at the next round.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use hearth_api::{Vm, VmState, VmStats};
use uuid::Uuid;

use crate::lifecycle::{Lifecycle, LifecycleError, error_chain};
use crate::store::{StoreError, VmRow, now_ms};

/// The longest TTL accepted (10 years): a typo guard, and far from any
/// overflow of a Unix-millisecond deadline.
pub const MAX_TTL_SECS: u64 = 10 * 365 * 86_400;

/// Checks a TTL in seconds (create request or `POST /v1/vms/{vm}/ttl`).
pub fn ttl_duration(secs: u64) -> Result<Duration, String> {
    if secs == 0 {
        return Err("must be at least 1 second (null clears the TTL)".into());
    }
    if secs > MAX_TTL_SECS {
        return Err(format!(
            "{secs} seconds is more than the limit of {MAX_TTL_SECS} (10 years)"
        ));
    }
    Ok(Duration::from_secs(secs))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Why a poller round failed (the loop logs it and tries again next round).
#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    /// The store could not list the VMs.
    #[error("cannot list VMs")]
    List(#[source] StoreError),
    /// A blocking task of the round (the store's list, the `/proc`
    /// reads) died.
    #[error("a blocking task of the round failed")]
    Reader(#[source] tokio::task::JoinError),
}

/// One process's usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcUsage {
    /// User + system CPU time, in ms.
    pub cpu_ms: u64,
    /// Resident set size, in bytes.
    pub rss_bytes: u64,
}

/// utime and stime (fields 14 and 15 of `/proc/<pid>/stat`), in clock
/// ticks. Fields are counted from the last `)`, as the command name (field
/// 2) may hold spaces and parentheses.
pub fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // `rest` starts at field 3; field 14 is 11 further on.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// Resident pages: the second field of `/proc/<pid>/statm`.
pub fn parse_statm_resident(statm: &str) -> Option<u64> {
    statm.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Clock ticks to milliseconds at `hz` ticks per second.
pub fn ticks_to_ms(ticks: u64, hz: u64) -> u64 {
    if hz == 0 {
        return 0;
    }
    u64::try_from(u128::from(ticks) * 1000 / u128::from(hz)).unwrap_or(u64::MAX)
}

/// The usage in a `stat` and `statm` pair of one process, if that process
/// is the one that started at `start_time` and is not a zombie.
pub fn usage_from(
    stat: &str,
    statm: &str,
    start_time: u64,
    hz: u64,
    page_size: u64,
) -> Option<ProcUsage> {
    let (state, started) = crate::host::process::parse_stat(stat)?;
    if started != start_time || matches!(state, 'Z' | 'X') {
        return None;
    }
    let (utime, stime) = parse_cpu_ticks(stat)?;
    let pages = parse_statm_resident(statm)?;
    Some(ProcUsage {
        cpu_ms: ticks_to_ms(utime.saturating_add(stime), hz),
        rss_bytes: pages.saturating_mul(page_size),
    })
}

/// Where the poller reads a VMM's usage: `/proc` in the daemon, a fake in
/// unit tests.
pub trait UsageReader: Send + Sync + std::fmt::Debug {
    /// The usage of `pid`, if it is still the process that started at
    /// `start_time`; `None` when it is gone (or another process has its
    /// pid, or it is a zombie).
    fn usage(&self, pid: u32, start_time: u64) -> Option<ProcUsage>;
}

/// The real reader: `/proc/<pid>/{stat,statm}`.
#[derive(Debug, Clone, Copy)]
pub struct ProcFs {
    hz: u64,
    page_size: u64,
}

impl ProcFs {
    /// Reads the clock tick rate and page size once.
    pub fn new() -> ProcFs {
        ProcFs {
            hz: rustix::param::clock_ticks_per_second(),
            page_size: rustix::param::page_size() as u64,
        }
    }
}

impl Default for ProcFs {
    fn default() -> Self {
        ProcFs::new()
    }
}

fn read_at(dir: &File, name: &str) -> Option<String> {
    let fd = rustix::fs::openat(
        dir,
        name,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let mut text = String::new();
    File::from(fd).read_to_string(&mut text).ok()?;
    Some(text)
}

impl UsageReader for ProcFs {
    fn usage(&self, pid: u32, start_time: u64) -> Option<ProcUsage> {
        // Both files are read through one open `/proc/<pid>`: if the
        // process goes, reads through it fail rather than describe a
        // process that reused the pid.
        let dir = File::open(format!("/proc/{pid}")).ok()?;
        let stat = read_at(&dir, "stat")?;
        let statm = read_at(&dir, "statm")?;
        usage_from(&stat, &statm, start_time, self.hz, self.page_size)
    }
}

/// The newest Firecracker metrics object in `buf`, a tail of the metrics
/// file that starts at the file's beginning when `at_start`. Firecracker
/// writes one JSON object per flush, each on its own line; the line after
/// the last newline may be a flush still being written, and the first one
/// of a tail may be cut, so only lines known to be whole are considered,
/// newest first, and the first that parses as an object wins.
pub fn last_metrics(buf: &[u8], at_start: bool) -> Option<serde_json::Value> {
    let end = buf.iter().rposition(|&b| b == b'\n')?;
    let mut lines: Vec<&[u8]> = buf[..end].split(|&b| b == b'\n').collect();
    if !at_start {
        // The first piece is whole only if it starts right at a line
        // boundary, which a tail cannot tell; drop it.
        lines.remove(0);
    }
    lines.into_iter().rev().find_map(|line| {
        let line = line.trim_ascii();
        if line.is_empty() {
            return None;
        }
        serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .filter(serde_json::Value::is_object)
    })
}

/// What the poller last read from a metrics file: keyed by the file's
/// length and mtime, so an unchanged file is not read again.
#[derive(Debug, Clone, PartialEq)]
struct MetricsSeen {
    len: u64,
    modified: Option<SystemTime>,
    value: Option<Arc<serde_json::Value>>,
}

/// The tail read first; doubled until it holds a whole line, up to
/// [`METRICS_TAIL_MAX`].
const METRICS_TAIL_MIN: u64 = 16 << 10;
const METRICS_TAIL_MAX: u64 = 1 << 20;

/// Reads the newest metrics object of the file at `path`, unless it is
/// unchanged since `prev`. `None` when there is no regular file.
fn read_metrics(path: &Path, prev: Option<&MetricsSeen>) -> Option<MetricsSeen> {
    // O_NONBLOCK: Firecracker also accepts a named pipe here, and opening
    // one for reading would block until a writer comes.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let (len, modified) = (meta.len(), meta.modified().ok());
    if let Some(p) = prev
        && p.len == len
        && p.modified == modified
    {
        return Some(p.clone());
    }
    let mut window = METRICS_TAIL_MIN;
    let value = loop {
        let start = len.saturating_sub(window);
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(start)).ok()?;
        (&mut file).take(len - start).read_to_end(&mut buf).ok()?;
        let found = last_metrics(&buf, start == 0);
        if found.is_some() || start == 0 || window >= METRICS_TAIL_MAX {
            break found;
        }
        window *= 2;
    };
    Some(MetricsSeen {
        len,
        modified,
        value: value.map(Arc::new),
    })
}

/// One running VM's latest sample.
#[derive(Debug, Clone)]
struct Sample {
    pid: u32,
    start_time: u64,
    usage: ProcUsage,
    sampled_at_ms: i64,
    metrics: Option<MetricsSeen>,
}

/// The latest sample of each running VM, written by the poller and read by
/// the API. In memory only: samples are measurements, not state.
#[derive(Debug, Default)]
pub struct Samples {
    inner: Mutex<HashMap<Uuid, Sample>>,
}

impl Samples {
    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Sample>> {
        // Held only for map operations, never across an await; a panic
        // under it leaves a map of plain values, usable as is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The stats of the VM in `row`: its sample if it is running and the
/// sample is of the VMM its record names now, else no usage at all.
fn stats_of(row: &VmRow, sample: Option<&Sample>, now: i64) -> VmStats {
    let vm = row.to_api();
    let running = vm.state == VmState::Running;
    let rt = &vm.runtime;
    let sample = sample
        .filter(|s| running && rt.pid == Some(s.pid) && rt.pid_start_time == Some(s.start_time));
    VmStats {
        id: vm.id,
        name: vm.name.clone(),
        state: vm.state,
        pid: rt.pid.filter(|_| running),
        cpu_ms: sample.map(|s| s.usage.cpu_ms),
        rss_bytes: sample.map(|s| s.usage.rss_bytes),
        uptime_ms: rt
            .started_at_ms
            .filter(|_| running)
            .map(|t| u64::try_from(now.saturating_sub(t)).unwrap_or(0)),
        sampled_at_ms: sample.map(|s| s.sampled_at_ms),
        ttl_deadline_ms: vm.ttl_deadline_ms,
        vmm_metrics: sample
            .and_then(|s| s.metrics.as_ref()?.value.as_deref())
            .cloned(),
    }
}

/// The API-facing half of the poller's features: stats and TTLs.
impl Lifecycle {
    fn find_row(&self, key: &str) -> Result<VmRow, LifecycleError> {
        self.store()
            .find(key)?
            .ok_or_else(|| LifecycleError::NotFound(key.to_owned()))
    }

    /// VM `key`'s latest stats. The usage fields are `None` unless it is
    /// running and has been sampled since it started.
    pub fn stats(&self, key: &str) -> Result<VmStats, LifecycleError> {
        let row = self.find_row(key)?;
        let sample = self.samples().lock().get(&row.id).cloned();
        Ok(stats_of(&row, sample.as_ref(), now_ms()))
    }

    /// The latest stats of every VM.
    pub fn stats_all(&self) -> Result<Vec<VmStats>, LifecycleError> {
        let rows = self.store().list()?;
        let now = now_ms();
        let samples = self.samples().lock();
        Ok(rows
            .iter()
            .map(|row| stats_of(row, samples.get(&row.id), now))
            .collect())
    }

    /// Sets VM `key`'s TTL to end `ttl_secs` from now, or clears it.
    pub fn set_ttl(&self, key: &str, ttl_secs: Option<u64>) -> Result<Vm, LifecycleError> {
        let ttl =
            ttl_secs
                .map(ttl_duration)
                .transpose()
                .map_err(|reason| LifecycleError::Invalid {
                    field: "ttl_secs",
                    reason,
                })?;
        let row = self.find_row(key)?;
        let deadline = ttl.map(|d| now_ms().saturating_add(millis(d)));
        self.store().set_ttl(row.id, deadline)?;
        match deadline {
            Some(at) => tracing::info!(vm = %row.name, deadline_ms = at, "ttl set"),
            None => tracing::info!(vm = %row.name, "ttl cleared"),
        }
        Ok(self.store().get(row.id)?.to_api())
    }
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    /// Running VMs sampled.
    pub sampled: usize,
    /// VMs whose VMM looked gone, handed to [`Lifecycle::reap_if_gone`].
    pub reaping: usize,
    /// Running VMs past their TTL, handed to [`Lifecycle::expire`].
    pub expiring: usize,
    /// TTLs that ended while their VM was not running, cleared.
    pub ttl_cleared: usize,
}

/// A running VM to sample.
#[derive(Debug)]
struct Target {
    id: Uuid,
    name: String,
    generation: u64,
    pid: u32,
    start_time: u64,
    metrics_path: Option<PathBuf>,
    prev_metrics: Option<MetricsSeen>,
}

/// A slow call the poller makes in a task of its own.
#[derive(Debug, Clone, Copy)]
enum Action {
    Reap { generation: u64 },
    Expire { generation: u64, deadline_ms: i64 },
}

/// Marks a VM as having an action in flight; unmarks it when dropped.
#[derive(Debug)]
struct Busy {
    set: Arc<Mutex<HashSet<Uuid>>>,
    id: Uuid,
}

impl Drop for Busy {
    fn drop(&mut self) {
        lock_set(&self.set).remove(&self.id);
    }
}

fn lock_set(set: &Mutex<HashSet<Uuid>>) -> MutexGuard<'_, HashSet<Uuid>> {
    set.lock().unwrap_or_else(|p| p.into_inner())
}

/// The poller over one lifecycle.
#[derive(Debug)]
pub struct Poller {
    lifecycle: Arc<Lifecycle>,
    reader: Arc<dyn UsageReader>,
    interval: Duration,
    busy: Arc<Mutex<HashSet<Uuid>>>,
}

impl Poller {
    /// A poller that runs a round every `interval`, reading usage through
    /// `reader`.
    pub fn new(
        lifecycle: Arc<Lifecycle>,
        reader: Arc<dyn UsageReader>,
        interval: Duration,
    ) -> Arc<Poller> {
        Arc::new(Poller {
            lifecycle,
            reader,
            interval,
            busy: Arc::default(),
        })
    }

    /// Runs rounds until the task is aborted (or the runtime ends). A
    /// failed round is logged; the next one tries again.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = me.round().await {
                    tracing::warn!(error = %error_chain(&e).join(": "), "poller round failed");
                }
            }
        })
    }

    /// One round: TTLs, then a sample of every running VM, then the VMs
    /// whose VMM is gone. Actions are started, not awaited.
    pub async fn round(&self) -> Result<Round, PollerError> {
        let store = self.lifecycle.store();
        // Milliseconds with 1,000 VMs: off the async workers.
        let lifecycle = Arc::clone(&self.lifecycle);
        let rows = tokio::task::spawn_blocking(move || lifecycle.store().list())
            .await
            .map_err(PollerError::Reader)?
            .map_err(PollerError::List)?;
        let now = now_ms();
        let mut round = Round::default();
        let mut targets = Vec::new();
        let prev: HashMap<Uuid, MetricsSeen> = self
            .lifecycle
            .samples()
            .lock()
            .iter()
            .filter_map(|(id, s)| Some((*id, s.metrics.clone()?)))
            .collect();
        for row in rows {
            let running = row.state == VmState::Running && row.corruption().is_none();
            if let Some(deadline_ms) = row.ttl_deadline_ms
                && deadline_ms <= now
            {
                match row.state {
                    _ if running => {
                        let action = Action::Expire {
                            generation: row.generation,
                            deadline_ms,
                        };
                        round.expiring += usize::from(self.act(row.id, &row.name, action));
                        continue;
                    }
                    VmState::Starting | VmState::Stopping => {}
                    _ => match store.clear_ttl_if(row.id, deadline_ms) {
                        Ok(true) => {
                            tracing::info!(vm = %row.name, "ttl ended while the VM was not running; cleared");
                            round.ttl_cleared += 1;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(vm = %row.name, error = %error_chain(&e).join(": "), "cannot clear an ended ttl")
                        }
                    },
                }
            }
            if !running {
                continue;
            }
            let rt = row.runtime_or_default();
            match (rt.pid, rt.pid_start_time) {
                (Some(pid), Some(start_time)) => targets.push(Target {
                    id: row.id,
                    prev_metrics: prev.get(&row.id).cloned(),
                    name: row.name,
                    generation: row.generation,
                    pid,
                    start_time,
                    metrics_path: rt.metrics_path,
                }),
                // Running without a recorded VMM: nothing to sample, and
                // `reap_if_gone` treats it as gone.
                _ => {
                    let action = Action::Reap {
                        generation: row.generation,
                    };
                    round.reaping += usize::from(self.act(row.id, &row.name, action));
                }
            }
        }

        let reader = Arc::clone(&self.reader);
        let read = tokio::task::spawn_blocking(move || {
            targets
                .into_iter()
                .map(|t| {
                    let usage = reader.usage(t.pid, t.start_time);
                    let metrics = usage
                        .and(t.metrics_path.as_deref())
                        .and_then(|p| read_metrics(p, t.prev_metrics.as_ref()));
                    (t, usage, metrics)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(PollerError::Reader)?;

        let sampled_at_ms = now_ms();
        let mut fresh = HashMap::with_capacity(read.len());
        for (t, usage, metrics) in read {
            match usage {
                Some(usage) => {
                    fresh.insert(
                        t.id,
                        Sample {
                            pid: t.pid,
                            start_time: t.start_time,
                            usage,
                            sampled_at_ms,
                            metrics,
                        },
                    );
                }
                None => {
                    let action = Action::Reap {
                        generation: t.generation,
                    };
                    round.reaping += usize::from(self.act(t.id, &t.name, action));
                }
            }
        }
        round.sampled = fresh.len();
        // Replaced whole: VMs no longer running drop out.
        *self.lifecycle.samples().lock() = fresh;
        Ok(round)
    }

    /// Starts `action` on VM `id` in a task of its own, unless one is
    /// already in flight for it. Returns whether it started one.
    fn act(&self, id: Uuid, name: &str, action: Action) -> bool {
        if !lock_set(&self.busy).insert(id) {
            return false;
        }
        let busy = Busy {
            set: Arc::clone(&self.busy),
            id,
        };
        let l = Arc::clone(&self.lifecycle);
        let name = name.to_owned();
        tokio::spawn(async move {
            let _busy = busy;
            let done = match action {
                Action::Reap { generation } => l.reap_if_gone(id, generation).await.map(|reaped| {
                    if reaped {
                        tracing::warn!(vm = %name, "VMM was gone; torn down by the poller");
                    }
                }),
                Action::Expire {
                    generation,
                    deadline_ms,
                } => match l.expire(id, generation).await {
                    Ok(true) => {
                        tracing::info!(vm = %name, deadline_ms, "ttl expired; VM stopped");
                        l.store()
                            .clear_ttl_if(id, deadline_ms)
                            .map(drop)
                            .map_err(LifecycleError::from)
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                },
            };
            match done {
                Ok(()) | Err(LifecycleError::NotFound(_)) => {}
                Err(e) => {
                    tracing::error!(vm = %name, ?action, error = %error_chain(&e).join(": "), "poller action failed")
                }
            }
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use hearth_api::{CreateVmRequest, Runtime, VmSpec};

    use super::*;
    use crate::host::ProcessHost;
    use crate::host::fake::FakeProcesses;
    use crate::lifecycle::VmPaths;
    use crate::store::Transition;

    const STAT: &str = "4242 (fire cracker (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                        250 130 0 0 20 0 3 0 987654 1000 200";

    #[test]
    fn stat_and_statm_parse() {
        assert_eq!(parse_cpu_ticks(STAT), Some((250, 130)));
        assert_eq!(parse_cpu_ticks("1 (x) S 1 2 3"), None);
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert_eq!(
            parse_statm_resident("5000 1200 300 10 0 900 0\n"),
            Some(1200)
        );
        assert_eq!(parse_statm_resident("5000"), None);
        assert_eq!(ticks_to_ms(380, 100), 3800);
        assert_eq!(ticks_to_ms(1, 3), 333);
        assert_eq!(ticks_to_ms(5, 0), 0);
        assert_eq!(ticks_to_ms(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn usage_needs_the_recorded_process() {
        let statm = "5000 1200 300 10 0 900 0";
        assert_eq!(
            usage_from(STAT, statm, 987654, 100, 4096),
            Some(ProcUsage {
                cpu_ms: 3800,
                rss_bytes: 1200 * 4096
            })
        );
        // Another process with the pid, or our VMM as a zombie: gone.
        assert_eq!(usage_from(STAT, statm, 987655, 100, 4096), None);
        let zombie = STAT.replace(") S ", ") Z ");
        assert_eq!(usage_from(&zombie, statm, 987654, 100, 4096), None);
        assert_eq!(usage_from(STAT, "", 987654, 100, 4096), None);
    }

    #[test]
    fn own_process_usage_is_read_from_proc() {
        let me = std::process::id();
        let (_, start) = crate::host::process::proc_stat(me).unwrap();
        let procfs = ProcFs::new();
        let u = procfs.usage(me, start).unwrap();
        assert!(u.rss_bytes > 0, "{u:?}");
        assert_eq!(procfs.usage(me, start + 1), None);
        assert_eq!(procfs.usage(u32::MAX, start), None);
    }

    #[test]
    fn the_last_whole_metrics_line_wins() {
        let text = b"{\"utc_timestamp_ms\":1}\n{\"utc_timestamp_ms\":2}\n{\"utc_timest";
        let v = last_metrics(text, true).unwrap();
        assert_eq!(v["utc_timestamp_ms"], 2);
        // A garbled last line: the one before it.
        let text = b"{\"utc_timestamp_ms\":1}\nnot json\n\n";
        assert_eq!(last_metrics(text, true).unwrap()["utc_timestamp_ms"], 1);
        // A tail whose only whole-looking line may be cut at its start.
        assert_eq!(last_metrics(b"timestamp_ms\":1}\n", false), None);
        assert_eq!(last_metrics(b"x\":1}\n{\"a\":3}\n", false).unwrap()["a"], 3);
        assert_eq!(last_metrics(b"", true), None);
        assert_eq!(last_metrics(b"{\"a\":1}", true), None, "no newline yet");
        assert_eq!(last_metrics(b"[1]\n", true), None, "not an object");
    }

    #[test]
    fn metrics_files_are_read_from_their_tail_and_only_when_changed() {
        let dir = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("metrics.json");
        assert_eq!(read_metrics(&path, None), None, "no file");
        std::fs::write(&path, "").unwrap();
        let empty = read_metrics(&path, None).unwrap();
        assert_eq!(empty.value, None);

        // Far more than the first window, with the newest line last.
        let filler = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(1000));
        let mut text = filler.repeat(100);
        text.push_str("{\"utc_timestamp_ms\":7,\"net\":{\"rx_bytes_count\":10}}\n{\"partial");
        std::fs::write(&path, &text).unwrap();
        let seen = read_metrics(&path, Some(&empty)).unwrap();
        let v = seen.value.clone().unwrap();
        assert_eq!(v["net"]["rx_bytes_count"], 10);
        // Unchanged: the previous value, as is.
        assert_eq!(read_metrics(&path, Some(&seen)), Some(seen.clone()));

        // One line longer than the first window is still found.
        let long = format!(
            "{{\"utc_timestamp_ms\":8,\"pad\":\"{}\"}}\n",
            "y".repeat(40_000)
        );
        std::fs::write(&path, format!("{text}\n{long}")).unwrap();
        let v = read_metrics(&path, Some(&seen)).unwrap().value.unwrap();
        assert_eq!(v["utc_timestamp_ms"], 8);
    }

    #[test]
    fn ttls_are_checked() {
        assert!(ttl_duration(0).is_err());
        assert_eq!(ttl_duration(90), Ok(Duration::from_secs(90)));
        assert!(ttl_duration(MAX_TTL_SECS).is_ok());
        assert!(ttl_duration(MAX_TTL_SECS + 1).is_err());
    }

    /// Usage from the fake process table; `blind` makes every VMM look
    /// gone, as a /proc read racing an exit would.
    #[derive(Debug)]
    struct FakeUsage {
        procs: FakeProcesses,
        blind: AtomicBool,
    }

    impl UsageReader for FakeUsage {
        fn usage(&self, pid: u32, start_time: u64) -> Option<ProcUsage> {
            if self.blind.load(Ordering::SeqCst) {
                return None;
            }
            self.procs
                .is_alive(pid, start_time, None)
                .then_some(ProcUsage {
                    cpu_ms: 1500,
                    rss_bytes: 64 << 20,
                })
        }
    }

    struct Env {
        _fx: crate::lifecycle::testkit::Env,
        l: Arc<Lifecycle>,
        reader: Arc<FakeUsage>,
        spec: VmSpec,
    }

    fn env() -> Env {
        let fx = crate::lifecycle::testkit::env();
        Env {
            l: fx.l.clone(),
            reader: Arc::new(FakeUsage {
                procs: fx.procs.clone(),
                blind: AtomicBool::new(false),
            }),
            spec: fx.spec.clone(),
            _fx: fx,
        }
    }

    impl Env {
        fn create(&self, name: &str, ttl_secs: Option<u64>) -> Vm {
            self.l
                .create(CreateVmRequest {
                    name: name.into(),
                    spec: self.spec.clone(),
                    ttl_secs,
                })
                .unwrap()
        }

        fn poller(&self, interval: Duration) -> Arc<Poller> {
            Poller::new(self.l.clone(), self.reader.clone(), interval)
        }

        fn reasons(&self, name: &str) -> Vec<String> {
            self.l
                .events(name, 0)
                .unwrap()
                .into_iter()
                .map(|e| e.reason)
                .collect()
        }

        async fn wait_state(&self, name: &str, state: VmState) -> Vm {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let vm = self.l.get(name).unwrap();
                if vm.state == state {
                    return vm;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{name} never reached {state}: {vm:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    #[tokio::test]
    async fn running_vms_are_sampled_and_others_have_no_usage() {
        let e = env();
        e.create("a", None);
        e.create("b", None);
        let vm = e.l.start("a").await.unwrap();
        let metrics = VmPaths::new(e.l.config(), vm.id).metrics;
        std::fs::write(
            &metrics,
            "{\"utc_timestamp_ms\":1}\n{\"utc_timestamp_ms\":2,\"vcpu\":{\"exit_io_in\":5}}\n{\"utc",
        )
        .unwrap();

        let before = e.l.stats("a").unwrap();
        assert_eq!((before.pid, before.cpu_ms), (vm.runtime.pid, None));
        assert!(before.uptime_ms.is_some());

        let round = e.poller(Duration::from_secs(1)).round().await.unwrap();
        assert_eq!(
            round,
            Round {
                sampled: 1,
                ..Round::default()
            }
        );
        let s = e.l.stats(&vm.id.to_string()).unwrap();
        assert_eq!(s.name, "a");
        assert_eq!(s.state, VmState::Running);
        assert_eq!(s.pid, vm.runtime.pid);
        assert_eq!((s.cpu_ms, s.rss_bytes), (Some(1500), Some(64 << 20)));
        assert!(s.sampled_at_ms.is_some());
        let m = s.vmm_metrics.unwrap();
        assert_eq!(
            (
                m["utc_timestamp_ms"].clone(),
                m["vcpu"]["exit_io_in"].clone()
            ),
            (2.into(), 5.into())
        );

        let all = e.l.stats_all().unwrap();
        assert_eq!(all.len(), 2);
        let b = all.iter().find(|s| s.name == "b").unwrap();
        assert_eq!(b.state, VmState::Created);
        assert_eq!(
            (
                b.pid,
                b.cpu_ms,
                b.rss_bytes,
                b.uptime_ms,
                b.sampled_at_ms,
                &b.vmm_metrics
            ),
            (None, None, None, None, None, &None)
        );

        // Stopped: no usage, even before the next round drops the sample.
        e.l.stop("a", None).await.unwrap();
        let s = e.l.stats("a").unwrap();
        assert_eq!(s.state, VmState::Stopped);
        assert_eq!((s.pid, s.cpu_ms, s.uptime_ms), (None, None, None));
        assert!(matches!(
            e.l.stats("ghost"),
            Err(LifecycleError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn reaping_is_generation_guarded() {
        let e = env();
        // A VM recorded running whose VMM no process table has: what a
        // watcher that missed the exit leaves behind.
        let vm = e.create("ghost", None);
        let rt = Runtime {
            pid: Some(4242),
            pid_start_time: Some(1),
            api_socket: Some(e._fx._dir.path().join("ghost.sock")),
            started_at_ms: Some(now_ms()),
            ..Runtime::default()
        };
        let generation =
            e.l.store()
                .transition(
                    vm.id,
                    vm.generation,
                    VmState::Created,
                    Transition {
                        to: VmState::Running,
                        runtime: Some(&rt),
                        last_error: None,
                        reason: "test",
                    },
                )
                .unwrap();

        // A poller that read an older generation changes nothing.
        assert!(!e.l.reap_if_gone(vm.id, generation - 1).await.unwrap());
        let now = e.l.get("ghost").unwrap();
        assert_eq!((now.state, now.generation), (VmState::Running, generation));

        // The current one tears down.
        let round = e.poller(Duration::from_secs(1)).round().await.unwrap();
        assert_eq!(round.reaping, 1);
        let vm = e.wait_state("ghost", VmState::Stopped).await;
        assert!(vm.runtime.pid.is_none());
        assert_eq!(
            e.reasons("ghost").last().map(String::as_str),
            Some("VMM gone (noticed by the poller)")
        );
        // Done once: a second call at the old generation is refused.
        assert!(!e.l.reap_if_gone(vm.id, generation).await.unwrap());
    }

    #[tokio::test]
    async fn a_live_vmm_is_not_reaped_on_the_readers_word() {
        let e = env();
        e.create("a", None);
        let vm = e.l.start("a").await.unwrap();
        e.reader.blind.store(true, Ordering::SeqCst);
        let poller = e.poller(Duration::from_secs(1));
        assert_eq!(poller.round().await.unwrap().reaping, 1);
        // reap_if_gone checks again under the lock, and the VMM is alive.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = e.l.get("a").unwrap();
        assert_eq!(
            (now.state, now.generation),
            (VmState::Running, vm.generation)
        );
        e.l.kill("a").await.unwrap();
    }

    #[tokio::test]
    async fn an_ended_ttl_stops_a_running_vm_once() {
        let e = env();
        let vm = e.create("a", Some(3600));
        assert!(vm.ttl_deadline_ms.unwrap() >= vm.created_at_ms + 3_600_000);
        e.l.start("a").await.unwrap();
        let task = e.poller(Duration::from_millis(10)).spawn();
        // Shorten the lease to a moment from now.
        let deadline = now_ms() + 100;
        e.l.store().set_ttl(vm.id, Some(deadline)).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(e.l.get("a").unwrap().state, VmState::Running, "too early");

        let vm = e.wait_state("a", VmState::Stopped).await;
        assert!(now_ms() >= deadline);
        let reasons = e.reasons("a");
        let last = reasons.last().unwrap();
        assert!(
            last.starts_with("ttl expired: guest shut down"),
            "{reasons:?}"
        );
        // Cleared once the stop is done: a restart runs without a limit.
        let start = std::time::Instant::now();
        while e.l.get("a").unwrap().ttl_deadline_ms.is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "ttl never cleared"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(e.l.start("a").await.unwrap().state, VmState::Running);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(e.l.get("a").unwrap().state, VmState::Running);
        task.abort();
        e.l.kill(&vm.name).await.unwrap();
    }

    #[tokio::test]
    async fn expiry_at_a_stale_generation_changes_nothing() {
        let e = env();
        e.create("a", None);
        let vm = e.l.start("a").await.unwrap();
        assert!(!e.l.expire(vm.id, vm.generation - 1).await.unwrap());
        assert_eq!(e.l.get("a").unwrap().state, VmState::Running);
        e.l.kill("a").await.unwrap();
    }

    #[tokio::test]
    async fn a_ttl_that_ends_while_not_running_is_only_cleared() {
        let e = env();
        let vm = e.create("a", None);
        e.l.store().set_ttl(vm.id, Some(now_ms() - 1)).unwrap();
        let round = e.poller(Duration::from_secs(1)).round().await.unwrap();
        assert_eq!(
            round,
            Round {
                ttl_cleared: 1,
                ..Round::default()
            }
        );
        let now = e.l.get("a").unwrap();
        assert_eq!((now.state, now.ttl_deadline_ms), (VmState::Created, None));
        // A deadline set anew in the meantime is not cleared.
        e.l.store().set_ttl(vm.id, Some(42)).unwrap();
        assert!(!e.l.store().clear_ttl_if(vm.id, 41).unwrap());
        assert_eq!(e.l.get("a").unwrap().ttl_deadline_ms, Some(42));
    }

    #[tokio::test]
    async fn set_ttl_checks_sets_and_clears() {
        let e = env();
        e.create("a", None);
        let before = now_ms();
        let vm = e.l.set_ttl("a", Some(90)).unwrap();
        let at = vm.ttl_deadline_ms.unwrap();
        assert!(at >= before + 90_000 && at <= now_ms() + 90_000, "{at}");
        assert_eq!(e.l.stats("a").unwrap().ttl_deadline_ms, Some(at));
        for bad in [0, MAX_TTL_SECS + 1] {
            assert!(matches!(
                e.l.set_ttl("a", Some(bad)),
                Err(LifecycleError::Invalid {
                    field: "ttl_secs",
                    ..
                })
            ));
        }
        assert_eq!(e.l.get("a").unwrap().ttl_deadline_ms, Some(at));
        assert_eq!(e.l.set_ttl("a", None).unwrap().ttl_deadline_ms, None);
        assert!(matches!(
            e.l.set_ttl("ghost", Some(5)),
            Err(LifecycleError::NotFound(_))
        ));
    }
}
