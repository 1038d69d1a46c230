//! The one teardown routine, and every path that runs it: stop (normal and
//! stale), kill, delete, the unwind of a failed start, the process watcher,
//! and recovery at daemon start (DESIGN.md, invariant 2).
//!
//! Teardown is driven by the runtime record alone, removes the VMM first
//! (it holds the tap and the disk), then the rest (firewall and tap side
//! by side, then dm, loops, files), treats "already gone" as success,
//! clears each field only after its object is confirmed gone, and never
//! stops at the first error: it tries every step and reports all failures
//! together. The record is written once, at the end,
//! with the tap given back to the pool and the teardown's event in the
//! same transaction: until then it names more than exists, which the next
//! teardown (after a crash, say) finds already gone.

use std::path::PathBuf;
use std::time::Duration;

use hearth_api::{Runtime, Vm, VmState};
use uuid::Uuid;

use super::{Lifecycle, LifecycleError, VmPaths, error_chain, holds_resources};
use crate::failpoint;
use crate::store::{TapRelease, Transition, VmRow};
use crate::vmm::ApiCall;

/// Passes a failpoint inside teardown: an injected error ends the teardown
/// there, as a failed step would, with what is left still recorded.
macro_rules! fp {
    ($name:literal, $errors:ident) => {
        if let Err(e) = failpoint::check($name) {
            $errors.push(e.to_string());
            return Err($errors);
        }
    };
}

fn remove_file(path: &std::path::Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("remove {}: {e}", path.display())),
    }
}

impl Lifecycle {
    /// Removes everything `rt` names, clearing each field once its object
    /// is gone, then records the result at generation `generation` in one
    /// store write: the runtime, the tap back in the pool, and (when it
    /// removed something or failed) one `teardown` event saying what.
    /// Returns every failure; what failed stays named in `rt`.
    pub(super) async fn teardown(
        &self,
        id: Uuid,
        generation: u64,
        rt: &mut Runtime,
    ) -> Result<(), Vec<String>> {
        let before = rt.clone();
        let mut removed = Vec::new();
        let mut release = None;
        let mut result = self.teardown_steps(rt, &mut removed, &mut release).await;
        let mut summary = Vec::new();
        if !removed.is_empty() {
            summary.push(format!("removed {}", removed.join(", ")));
        }
        if let Err(errors) = &result {
            summary.push(format!("failed: {}", errors.join("; ")));
        }
        let note = (!summary.is_empty()).then(|| summary.join("; "));
        if *rt != before || release.is_some() || note.is_some() {
            let release = release.as_ref().map(|(name, delete_row)| TapRelease {
                name,
                delete_row: *delete_row,
            });
            if let Err(e) = self
                .store
                .end_teardown(id, generation, rt, release, note.as_deref())
            {
                let e = error_chain(&e).join(": ");
                tracing::warn!(vm = %id, error = %e, "cannot record the teardown");
                // The tap was not given back to the pool: the record must
                // keep naming it, and everything else, for the next
                // teardown (which finds what went already gone).
                *rt = before;
                if let Err(errors) = &mut result {
                    errors.push(e);
                } else {
                    result = Err(vec![e]);
                }
            }
        }
        if result.is_err() {
            self.metrics.teardown_failed();
        }
        result
    }

    async fn teardown_steps(
        &self,
        rt: &mut Runtime,
        removed: &mut Vec<String>,
        release: &mut Option<(String, bool)>,
    ) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();

        // The VMM process. Its pid if recorded; otherwise the process
        // whose command line names the recorded API socket.
        let targets = match (rt.pid, rt.pid_start_time, &rt.api_socket) {
            (Some(pid), Some(st), _) => vec![(pid, st)],
            (_, _, Some(sock)) => self.procs.find_by_arg(sock),
            _ => Vec::new(),
        };
        let mut process_gone = true;
        for (pid, st) in targets {
            match self.procs.kill(pid, st).await {
                Ok(()) => removed.push(format!("vmm pid {pid}")),
                Err(e) => {
                    process_gone = false;
                    errors.push(error_chain(&e).join(": "));
                }
            }
        }
        fp!("teardown.after_kill", errors);
        if process_gone {
            rt.pid = None;
            rt.pid_start_time = None;
        }

        // Every kernel object below may still be in use by a live VMM:
        // while it could not be killed, nothing else is removed.
        if !process_gone {
            return Err(errors);
        }

        // Firewall and tap share nothing (the elements name the tap as a
        // string): removed side by side, each result then applied in
        // order. The firewall: the recorded plan, in one transaction. The
        // tap: back to the idle pool (cleared), or deleted when the pool
        // has enough idle taps; the store gives it back (with the final
        // write) only once the kernel side is done.
        let firewall_side = async {
            match &rt.firewall {
                Some(plan) => Some(
                    self.firewall
                        .remove(plan)
                        .await
                        .map(|()| plan.short_id.clone()),
                ),
                None => None,
            }
        };
        let tap_side = async {
            let tap = rt.tap.clone()?;
            let keep = self
                .store
                .idle_taps()
                .is_ok_and(|n| n < self.config.tap_pool_idle_max);
            let done = if keep {
                self.net.reset_tap(&tap).await
            } else {
                self.net.delete_link(&tap).await
            };
            Some((tap, keep, done))
        };
        let (firewall_done, tap_done) = tokio::join!(firewall_side, tap_side);
        match firewall_done {
            Some(Ok(short_id)) => {
                removed.push(format!("firewall vm-{short_id}"));
                fp!("teardown.after_firewall_removed", errors);
                rt.firewall = None;
                rt.firewall_handles.clear();
            }
            Some(Err(e)) => errors.push(error_chain(&e).join(": ")),
            None => {}
        }
        match tap_done {
            Some((tap, keep, Ok(()))) => {
                fp!("teardown.after_tap_reset", errors);
                removed.push(if keep {
                    format!("tap {tap} (back to the pool)")
                } else {
                    format!("tap {tap}")
                });
                rt.tap = None;
                rt.host_ip = None;
                rt.guest_ip = None;
                rt.prefix_len = None;
                rt.mac = None;
                *release = Some((tap, !keep));
            }
            Some((_, _, Err(e))) => errors.push(error_chain(&e).join(": ")),
            None => {}
        }

        // Disk: dm before loops. The copy and cow files are the VM's disk
        // and stay in its dir until delete.
        if rt.disk.is_some() {
            let disk_errors = self.teardown_disk(rt, removed);
            let gone = disk_errors.is_empty();
            errors.extend(disk_errors);
            fp!("teardown.after_disk_removed", errors);
            if gone {
                rt.disk = None;
            }
        }

        // Files the VMM used. The socket is the key that finds the VMM,
        // so it went only now that the VMM is known to be gone. Console
        // and VMM logs stay for `hearth logs` until the VM is deleted.
        for field in [&mut rt.api_socket, &mut rt.metrics_path] {
            if let Some(path) = field.as_deref() {
                match remove_file(path) {
                    Ok(()) => *field = None,
                    Err(e) => errors.push(e),
                }
            }
        }
        fp!("teardown.after_files_removed", errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Removes the dm device, then the loops, clearing each field of the
    /// disk record as its object goes. Returns the failures.
    fn teardown_disk(&self, rt: &mut Runtime, removed: &mut Vec<String>) -> Vec<String> {
        let mut errors = Vec::new();
        let Some(d) = rt.disk.as_mut() else {
            return errors;
        };
        if let Some(name) = d.dm_name.clone() {
            match self.disk.dm_remove(&name) {
                Ok(()) => {
                    removed.push(format!("dm {name}"));
                    d.dm_name = None;
                    d.device = None;
                }
                Err(e) => {
                    // The loops are held by the dm device: leave them.
                    errors.push(error_chain(&e).join(": "));
                    return errors;
                }
            }
        }
        // Loops are found by their backing files, which are unique to this
        // VM (they lie in its dir) and were recorded before each attach.
        // A recorded device number alone could by now name another VM's
        // loop, if a detach went through but its store write did not.
        let files: Vec<PathBuf> = [&d.attaching, &d.origin_link, &d.cow_file]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let mut all_gone = true;
        for file in files {
            match self.disk.find_loops(&file) {
                Ok(devs) => {
                    for dev in devs {
                        match self.disk.detach_loop(&dev) {
                            Ok(()) => removed.push(format!("loop {}", dev.display())),
                            Err(e) => {
                                all_gone = false;
                                errors.push(error_chain(&e).join(": "));
                            }
                        }
                    }
                }
                Err(e) => {
                    all_gone = false;
                    errors.push(error_chain(&e).join(": "));
                }
            }
        }
        if all_gone {
            d.attaching = None;
            d.origin_loop = None;
            d.cow_loop = None;
        }
        errors
    }

    /// Runs the teardown of a VM already in `stopping` at `generation`, then
    /// records `stopped` (or `error` with what is left).
    async fn finish_stop(
        &self,
        row: &VmRow,
        generation: u64,
        mut rt: Runtime,
        reason: &str,
    ) -> Result<Vm, LifecycleError> {
        let mut teardown = self.teardown(row.id, generation, &mut rt).await;
        if let Err(e) = failpoint::check("teardown.before_final_state") {
            teardown = Err(vec![e.to_string()]);
        }
        let (to, last_error, result) = match teardown {
            Ok(()) => (VmState::Stopped, None, Ok(())),
            Err(errors) => (
                VmState::Error,
                Some(format!("teardown incomplete: {}", errors.join("; "))),
                Err(errors),
            ),
        };
        self.store.transition(
            row.id,
            generation,
            VmState::Stopping,
            Transition {
                to,
                runtime: Some(&rt),
                last_error: Some(last_error.as_deref()),
                reason: last_error.as_deref().unwrap_or(reason),
            },
        )?;
        match result {
            Ok(()) => {
                tracing::info!(vm = %row.name, %reason, "stopped");
                Ok(self.store.get(row.id)?.to_api())
            }
            Err(errors) => Err(LifecycleError::TeardownFailed {
                name: row.name.clone(),
                errors,
            }),
        }
    }

    /// A stop or kill that failed between its `stopping` transition and
    /// its teardown: record `error` with everything still named, so the
    /// next kill, delete or daemon start finishes the job.
    fn abandon_stop(
        &self,
        row: &VmRow,
        generation: u64,
        rt: &Runtime,
        why: String,
    ) -> LifecycleError {
        let recorded = self.store.transition(
            row.id,
            generation,
            VmState::Stopping,
            Transition {
                to: VmState::Error,
                runtime: Some(rt),
                last_error: Some(Some(&why)),
                reason: &why,
            },
        );
        match recorded {
            Ok(_) => LifecycleError::TeardownFailed {
                name: row.name.clone(),
                errors: vec![why],
            },
            Err(e) => e.into(),
        }
    }

    fn begin_stop(&self, row: &VmRow, op: &str) -> Result<u64, LifecycleError> {
        Ok(self.store.transition(
            row.id,
            row.generation,
            row.state,
            Transition {
                to: VmState::Stopping,
                runtime: None,
                last_error: None,
                reason: op,
            },
        )?)
    }

    /// Gracefully stops VM `key`: Ctrl-Alt-Del, up to `timeout` for the VMM
    /// to exit, then SIGKILL; then teardown. A VMM that is already gone is
    /// the stale branch: teardown only, no error.
    pub async fn stop(&self, key: &str, timeout: Option<Duration>) -> Result<Vm, LifecycleError> {
        self.stop_as(key, timeout, "stop").await
    }

    /// [`Lifecycle::stop`], with `op` naming why in the events.
    async fn stop_as(
        &self,
        key: &str,
        timeout: Option<Duration>,
        op: &str,
    ) -> Result<Vm, LifecycleError> {
        let (_guard, row) = self.locked(key).await?;
        if !row.state.can_stop() || row.corruption().is_some() {
            return Err(LifecycleError::WrongState {
                op: "stop",
                name: row.name.clone(),
                state: row.to_api().state,
            });
        }
        let rt = self.teardown_runtime(&row);
        let generation = self.begin_stop(&row, op)?;
        if let Err(e) = failpoint::check("stop.after_stopping") {
            return Err(self.abandon_stop(&row, generation, &rt, e.to_string()));
        }
        let timeout = timeout.unwrap_or(self.config.stop_timeout());
        let reason = match (rt.pid, rt.pid_start_time, &rt.api_socket) {
            (Some(pid), Some(st), Some(sock)) if self.procs.is_alive(pid, st, Some(sock)) => {
                let exited = self.procs.wait_exit(pid, st);
                let procs = self.procs.clone();
                let alive = move || procs.is_alive(pid, st, None);
                let asked = async {
                    let mut api = self
                        .vmm
                        .connect(sock, self.config.vmm_ready_timeout(), &alive)
                        .await?;
                    api.call(&ApiCall::SendCtrlAltDel).await
                }
                .await;
                if let Err(e) = failpoint::check("stop.after_ctrl_alt_del") {
                    return Err(self.abandon_stop(&row, generation, &rt, e.to_string()));
                }
                match asked {
                    Err(e) => format!(
                        "{op}: Ctrl-Alt-Del failed ({}), killed",
                        error_chain(&e).join(": ")
                    ),
                    Ok(()) => match tokio::time::timeout(timeout, exited).await {
                        Ok(info) => format!("{op}: guest shut down ({})", info.description),
                        Err(_) => format!("{op}: no shutdown within {timeout:?}, killed"),
                    },
                }
            }
            _ => format!("{op}: VMM had already exited"),
        };
        self.finish_stop(&row, generation, rt, &reason).await
    }

    /// The poller's auto-stop: if VM `id` is still `running` at generation
    /// `seen` (what the poller read) and its VMM is gone, tear it down.
    /// Returns whether it did. A newer state always wins: a poller that
    /// read an old generation changes nothing.
    pub async fn reap_if_gone(&self, id: Uuid, seen: u64) -> Result<bool, LifecycleError> {
        let (_guard, row) = self.locked(&id.to_string()).await?;
        if row.generation != seen || row.state != VmState::Running {
            return Ok(false);
        }
        let Ok(rt) = row.runtime.clone() else {
            return Ok(false);
        };
        let alive = match (rt.pid, rt.pid_start_time) {
            (Some(pid), Some(st)) => self.procs.is_alive(pid, st, rt.api_socket.as_deref()),
            _ => false,
        };
        if alive {
            return Ok(false);
        }
        let reason = "VMM gone (noticed by the poller)";
        let generation = self.begin_stop(&row, reason)?;
        self.finish_stop(&row, generation, rt, reason).await?;
        Ok(true)
    }

    /// TTL expiry: if VM `id` is still `running` at generation `seen`, stop
    /// it gracefully (then forcibly after the stop timeout). Returns
    /// whether it did.
    pub async fn expire(&self, id: Uuid, seen: u64) -> Result<bool, LifecycleError> {
        {
            let (_guard, row) = self.locked(&id.to_string()).await?;
            if row.generation != seen || row.state != VmState::Running {
                return Ok(false);
            }
        }
        // Between the check and the stop another operation may win the
        // lock; stop then refuses or finds it stopped, which is fine.
        match self.stop_as(&id.to_string(), None, "ttl expired").await {
            Ok(_) => Ok(true),
            Err(LifecycleError::WrongState { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Kills VM `key` now (SIGKILL), then tears down. Works on a VM with a
    /// corrupt record too: its objects are found by their derived paths.
    pub async fn kill(&self, key: &str) -> Result<Vm, LifecycleError> {
        let (_guard, row) = self.locked(key).await?;
        self.kill_locked(&row, "kill").await
    }

    async fn kill_locked(&self, row: &VmRow, op: &str) -> Result<Vm, LifecycleError> {
        let state = row.to_api().state;
        if !state.can_kill() {
            return Err(LifecycleError::WrongState {
                op: "kill",
                name: row.name.clone(),
                state,
            });
        }
        let rt = self.teardown_runtime(row);
        let generation = self.begin_stop(row, op)?;
        if let Err(e) = failpoint::check("kill.after_stopping") {
            return Err(self.abandon_stop(row, generation, &rt, e.to_string()));
        }
        let vm = self.finish_stop(row, generation, rt, op).await?;
        if row.runtime.is_err() {
            // The record that named the firewall keys is gone: remove
            // what is marked with the VM's id.
            self.firewall
                .remove_orphan(&row.id.to_string())
                .await
                .map_err(|e| LifecycleError::TeardownFailed {
                    name: row.name.clone(),
                    errors: vec![error_chain(&e).join(": ")],
                })?;
        }
        Ok(vm)
    }

    /// Deletes VM `key`: only when it holds nothing running (`force` kills
    /// it first). Removes its directory, then its row.
    pub async fn delete(&self, key: &str, force: bool) -> Result<(), LifecycleError> {
        let (_guard, mut row) = self.locked(key).await?;
        let state = row.to_api().state;
        if !state.can_delete() {
            if !force {
                return Err(LifecycleError::WrongState {
                    op: "delete",
                    name: row.name.clone(),
                    state,
                });
            }
            self.kill_locked(&row, "delete --force").await?;
            row = self.store.get(row.id)?;
        }
        let mut rt = self.teardown_runtime(&row);
        if holds_resources(&rt) {
            self.teardown(row.id, row.generation, &mut rt)
                .await
                .map_err(|errors| LifecycleError::TeardownFailed {
                    name: row.name.clone(),
                    errors,
                })?;
        }
        let dir = VmPaths::new(&self.config, row.id).dir;
        // Unlinking a disk image waits on the device (a discard, when the
        // filesystem is mounted with it): off the async workers.
        let removed = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(LifecycleError::TeardownFailed {
                    name: row.name.clone(),
                    errors: vec![format!("remove {}: {e}", dir.display())],
                });
            }
        }
        failpoint::check("delete.after_dir_removed")?;
        self.store.delete_vm(row.id, row.generation)?;
        failpoint::check("delete.after_row_deleted")?;
        self.forget_lock(row.id);
        tracing::info!(vm = %row.name, "deleted");
        Ok(())
    }

    /// Watches VM `id`'s VMM; when it exits on its own, runs the teardown
    /// (state `stopped`, the exit status in the event).
    pub(super) fn watch(&self, id: Uuid, pid: u32, start_time: u64) {
        let exited = self.procs.wait_exit(pid, start_time);
        let me = self.me.clone();
        tokio::spawn(async move {
            let info = exited.await;
            if let Some(me) = me.upgrade() {
                me.on_vmm_exit(id, pid, start_time, &info.description).await;
            }
        });
    }

    async fn on_vmm_exit(&self, id: Uuid, pid: u32, start_time: u64, how: &str) {
        let Ok((_guard, row)) = self.locked(&id.to_string()).await else {
            return;
        };
        let Ok(rt) = &row.runtime else { return };
        // Someone else (stop, kill) already dealt with this process.
        if row.state != VmState::Running
            || rt.pid != Some(pid)
            || rt.pid_start_time != Some(start_time)
        {
            return;
        }
        let reason = format!("VMM {how} on its own");
        tracing::warn!(vm = %row.name, pid, %how, "VMM exited on its own; tearing down");
        let result = match self.begin_stop(&row, &reason) {
            Ok(generation) => self
                .finish_stop(&row, generation, rt.clone(), &reason)
                .await
                .map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::error!(vm = %row.name, error = %error_chain(&e).join(": "), "auto-stop failed");
        }
    }

    /// Rebuilds the in-memory part of every VM from the store at daemon
    /// start: re-adopts each running VM whose VMM is alive (pid, start time
    /// and API socket all match) and answers `GET /` within the probe
    /// bound; tears down each one that is dead or hung, and every VM caught
    /// mid-start or mid-stop by a crash. VMs are independent, so they are
    /// recovered concurrently.
    pub async fn recover(&self) -> Result<RecoverReport, LifecycleError> {
        use futures_util::StreamExt;
        let rows = self.store.list()?;
        let outcomes: Vec<Recovered> = futures_util::stream::iter(rows)
            .filter(|r| {
                let idle = matches!(r.state, VmState::Created | VmState::Stopped);
                std::future::ready(!idle || r.corruption().is_some())
            })
            .map(|row| self.recover_one(row.id))
            .buffer_unordered(RECOVER_CONCURRENCY)
            .collect()
            .await;
        let mut report = RecoverReport::default();
        for o in outcomes {
            match o {
                Recovered::Adopted => report.adopted += 1,
                Recovered::Cleaned => report.cleaned += 1,
                Recovered::Failed => report.failed += 1,
                Recovered::Corrupt => report.corrupt += 1,
                Recovered::Nothing => {}
            }
        }
        Ok(report)
    }

    async fn recover_one(&self, id: Uuid) -> Recovered {
        let Ok((_guard, row)) = self.locked(&id.to_string()).await else {
            return Recovered::Nothing;
        };
        if let Err(e) = failpoint::check("reconcile.before_vm") {
            tracing::error!(vm = %row.name, error = %e, "recovery skipped");
            return Recovered::Failed;
        }
        if let Some(reason) = row.corruption() {
            tracing::error!(vm = %row.name, %reason, "VM record is corrupt; reported as error");
            return Recovered::Corrupt;
        }
        let rt = self.teardown_runtime(&row);
        let alive = match (rt.pid, rt.pid_start_time, &rt.api_socket) {
            (Some(pid), Some(st), Some(sock)) => self
                .procs
                .is_alive(pid, st, Some(sock))
                .then_some((pid, st, sock.clone())),
            _ => None,
        };
        let hung;
        let reason = match (row.state, alive) {
            (VmState::Running, Some((pid, st, sock))) => {
                match self.probe(&sock, pid, st).await.and_then(|()| {
                    failpoint::check("reconcile.after_probe").map_err(|e| e.to_string())
                }) {
                    Ok(()) => {
                        self.watch(row.id, pid, st);
                        tracing::info!(vm = %row.name, pid, "re-adopted running VM");
                        return Recovered::Adopted;
                    }
                    Err(why) => {
                        hung = format!(
                            "VMM pid {pid} did not answer GET / within {} ms at re-adoption ({why}): treated as hung, killed",
                            self.config.adopt_probe_timeout_ms
                        );
                        &hung
                    }
                }
            }
            (VmState::Running, None) => "exited while hearthd was down",
            (VmState::Starting, _) => "start interrupted by a hearthd restart; unwound",
            (VmState::Stopping, _) => "stop interrupted by a hearthd restart; finished",
            (VmState::Error, _) if holds_resources(&rt) => {
                let mut rt = rt;
                return match self.teardown(row.id, row.generation, &mut rt).await {
                    Ok(()) => Recovered::Cleaned,
                    Err(_) => Recovered::Failed,
                };
            }
            _ => return Recovered::Nothing,
        };
        let generation = if row.state == VmState::Stopping {
            Ok(row.generation)
        } else {
            self.begin_stop(&row, reason)
        };
        let result = match generation {
            Ok(generation) => self
                .finish_stop(&row, generation, rt, reason)
                .await
                .map(drop),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => Recovered::Cleaned,
            Err(e) => {
                tracing::error!(vm = %row.name, error = %error_chain(&e).join(": "), "recovery teardown failed");
                Recovered::Failed
            }
        }
    }

    /// Asks a VMM `GET /`, within the configured bound.
    async fn probe(&self, socket: &std::path::Path, pid: u32, st: u64) -> Result<(), String> {
        let bound = Duration::from_millis(self.config.adopt_probe_timeout_ms);
        let procs = self.procs.clone();
        let alive = move || procs.is_alive(pid, st, None);
        let ask = async {
            let mut api = self.vmm.connect(socket, bound, &alive).await?;
            api.info().await
        };
        match tokio::time::timeout(bound, ask).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(error_chain(&e).join(": ")),
            Err(_) => Err("no answer".into()),
        }
    }
}

/// How many VMs recovery works on at once.
const RECOVER_CONCURRENCY: usize = 64;

enum Recovered {
    Adopted,
    Cleaned,
    Failed,
    Corrupt,
    Nothing,
}

/// What [`Lifecycle::recover`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoverReport {
    /// Running VMs whose VMM was alive and was re-adopted.
    pub adopted: usize,
    /// VMs torn down (dead VMM, interrupted start or stop, leftovers).
    pub cleaned: usize,
    /// VMs whose teardown failed (left in `error`, retried later).
    pub failed: usize,
    /// VMs whose record could not be parsed.
    pub corrupt: usize,
}
