//! Start, as a journal of steps. What a step will create is in the VM's
//! runtime record before the step runs; steps whose objects hearth names
//! itself are recorded together, in one store write, so a start costs
//! three writes, not one per step:
//!
//! ```text
//!  1. state → starting; runtime.vm_dir, api_socket,
//!     logs, metrics paths                       (store)   then mkdir, remove
//!                                                          a stale socket,
//!                                                          create the files
//!  2. spawn the VMM in its own session (found by the API socket on its
//!     command line until its pid is recorded)
//!  3. runtime.pid + start time, the tap reserved
//!     in the pool + runtime.tap, addresses, MAC,
//!     runtime.disk (copy: the file; dm: link and
//!     cow file), runtime.firewall = the VM's
//!     rules                  (one store transaction)   then, side by side:
//!  4.   create the tap, flush and address it
//!  5.   copy the disk (dm: attach each loop, recording its
//!       backing file before and the device after, then the dm device)
//!  6.   one nftables transaction
//!  7a.  PUT /logger, /metrics, /machine-config, /boot-source once the
//!       VMM answers (they name neither disk nor tap)
//!  7b. PUT /drives/rootfs, /network-interfaces/eth0 (the tap must still
//!     exist)
//!  8. PUT /actions InstanceStart
//!  9. state → running (with what nftables installed, for inspect)
//!                                                (store)   then watch the pid
//! ```
//!
//! Recording ahead is safe because teardown treats "already gone" (or
//! "never made") as success: a record may name more than exists, never
//! less. The VMM is spawned before the host side is made so that its
//! start-up (exec, binding the API socket: a few ms) and the PUTs that do
//! not name the tap or the disk overlap steps 4–6 instead of adding to
//! them (Firecracker takes its pre-boot configuration in any order).
//!
//! A failure anywhere runs the one teardown routine over whatever the
//! record names, then records state `error` with the cause. Between 2's
//! spawn and 3's store write the pid is unknown, but the API socket path
//! on the VMM's command line was recorded in 1, so teardown finds it.

use std::path::PathBuf;

use hearth_api::{DiskRecord, Runtime, Vm, VmRules, VmSpec, VmState, short_id};
use uuid::Uuid;

use super::{Lifecycle, LifecycleError, StepError, VmPaths, error_chain, holds_resources, mac_for};
use crate::config::DiskStrategy;
use crate::failpoint;
use crate::host::SpawnSpec;
use crate::store::{Transition, now_ms};
use crate::vmm::ApiCall;

/// Each tap's subnet is a /30: the tap, the guest, network and broadcast.
pub const TAP_PREFIX_LEN: u8 = 30;

fn io(op: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> StepError {
    let path = path.to_owned();
    move |source| StepError::Io { op, path, source }
}

impl Lifecycle {
    /// Starts VM `key`; answers once the record says `running`.
    pub async fn start(&self, key: &str) -> Result<Vm, LifecycleError> {
        let (_guard, row) = self.locked(key).await?;
        if let Some(reason) = row.corruption() {
            return Err(LifecycleError::Corrupt {
                name: row.name,
                reason,
            });
        }
        if !row.state.can_start() {
            return Err(LifecycleError::WrongState {
                op: "start",
                name: row.name,
                state: row.state,
            });
        }
        let (id, name) = (row.id, row.name.clone());
        let spec = row.spec.clone().map_err(|reason| LifecycleError::Corrupt {
            name: name.clone(),
            reason,
        })?;
        let mut rt = self.teardown_runtime(&row);
        let mut generation = row.generation;
        // An `error` VM may still hold what a failed teardown left: retry
        // that first, so a start never runs on top of leftovers.
        if holds_resources(&rt) {
            self.teardown(id, generation, &mut rt)
                .await
                .map_err(|errors| LifecycleError::TeardownFailed {
                    name: name.clone(),
                    errors,
                })?;
        }
        let paths = VmPaths::new(&self.config, id);
        // The dir and every file in it are named before any is made.
        rt = Runtime {
            vm_dir: Some(paths.dir.clone()),
            api_socket: Some(paths.api_socket.clone()),
            console_log: Some(paths.console_log.clone()),
            vmm_log: Some(paths.vmm_log.clone()),
            metrics_path: Some(paths.metrics.clone()),
            ..Runtime::default()
        };
        generation = self.store.transition(
            id,
            generation,
            row.state,
            Transition {
                to: VmState::Starting,
                runtime: Some(&rt),
                last_error: Some(None),
                reason: "start",
            },
        )?;
        let steps = self
            .start_steps(id, generation, &spec, &paths, &mut rt)
            .await;
        let result = match steps {
            Ok(()) => {
                rt.started_at_ms = Some(now_ms());
                failpoint::check("start.after_instance_start")
                    .map_err(StepError::from)
                    .and_then(|()| {
                        self.store
                            .transition(
                                id,
                                generation,
                                VmState::Starting,
                                Transition {
                                    to: VmState::Running,
                                    runtime: Some(&rt),
                                    last_error: None,
                                    reason: "InstanceStart answered",
                                },
                            )
                            .map_err(StepError::from)
                    })
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => {
                if let (Some(pid), Some(st)) = (rt.pid, rt.pid_start_time) {
                    self.watch(id, pid, st);
                }
                failpoint::check("start.after_running")?;
                tracing::info!(vm = %name, pid = rt.pid.unwrap_or_default(), "running");
                Ok(self.store.get(id)?.to_api())
            }
            Err(step) => {
                let cause = error_chain(&step).join(": ");
                tracing::warn!(vm = %name, error = %cause, "start failed; unwinding");
                let (to, last_error) = match self.teardown(id, generation, &mut rt).await {
                    Ok(()) => (VmState::Error, cause.clone()),
                    Err(errs) => (
                        VmState::Error,
                        format!("{cause}; unwind incomplete: {}", errs.join("; ")),
                    ),
                };
                self.store.transition(
                    id,
                    generation,
                    VmState::Starting,
                    Transition {
                        to,
                        runtime: Some(&rt),
                        last_error: Some(Some(&last_error)),
                        reason: &format!("start failed: {last_error}"),
                    },
                )?;
                Err(LifecycleError::StartFailed {
                    name,
                    source: Box::new(step),
                })
            }
        }
    }

    async fn start_steps(
        &self,
        id: Uuid,
        generation: u64,
        spec: &VmSpec,
        paths: &VmPaths,
        rt: &mut Runtime,
    ) -> Result<(), StepError> {
        // The firewall plan, but for the tap and guest address the
        // reservation below fills in: a plan the host cannot serve fails
        // here, before anything is made.
        let mut plan = VmRules {
            short_id: short_id(&id),
            vm_id: id.to_string(),
            tap: String::new(),
            guest_ip: std::net::Ipv4Addr::UNSPECIFIED,
            nat_uplink: None,
            port_forwards: Vec::new(),
        };
        let caps = crate::capability::parse_all(&spec.capabilities).map_err(StepError::Plan)?;
        for cap in &caps {
            cap.setup(&self.host_net, &mut plan)
                .map_err(StepError::Plan)?;
        }

        // 1–2. The VM dir and files (named by the `starting` transition).
        failpoint::check("start.after_starting")?;
        std::fs::create_dir_all(&paths.dir).map_err(io("create VM dir", &paths.dir))?;
        match std::fs::remove_file(&paths.api_socket) {
            Ok(()) => {
                tracing::info!(socket = %paths.api_socket.display(), "removed a stale API socket")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove stale API socket", &paths.api_socket)(e)),
        }
        // Firecracker opens its log and metrics paths without O_CREAT.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.vmm_log)
            .map_err(io("create VMM log", &paths.vmm_log))?;
        std::fs::File::create(&paths.metrics).map_err(io("create metrics file", &paths.metrics))?;

        // 3. The VMM, in its own session; pid and start time right after.
        //    It starts up (exec, API socket) while the host side below is
        //    made: nothing of it is needed before the PUTs.
        let (program, args) = self.vmm.command(&paths.api_socket, &id.to_string());
        let (pid, start_time) = self.procs.spawn(&SpawnSpec {
            program,
            args,
            console_log: paths.console_log.clone(),
        })?;
        failpoint::check("start.after_spawn")?;
        rt.pid = Some(pid);
        rt.pid_start_time = Some(start_time);

        // 4–6, recorded: in one transaction, the pid, the tap reserved in
        //    the pool with its addresses, the disk's files and the firewall
        //    plan. Then each is made.
        let pool = self.config.pool();
        let mac = mac_for(id);
        rt.disk = Some(self.disk_record(spec, paths));
        let (tap, _) = self
            .store
            .reserve_tap(id, generation, pool.slots(), |name, idx| {
                let (host, guest) = pool.slot(idx);
                rt.tap = Some(name.to_owned());
                rt.host_ip = Some(host);
                rt.guest_ip = Some(guest);
                rt.prefix_len = Some(TAP_PREFIX_LEN);
                rt.mac = Some(mac.clone());
                plan.tap = name.to_owned();
                plan.guest_ip = guest;
                rt.firewall = (!plan.is_empty()).then(|| plan.clone());
                rt.clone()
            })?;
        let (host_ip, guest_ip) = match (rt.host_ip, rt.guest_ip) {
            (Some(h), Some(g)) => (h, g),
            _ => return Err(StepError::Plan("tap reserved without addresses".into())),
        };
        failpoint::check("start.after_tap_reserved")?;

        // 4–6 are independent of each other once recorded, and the PUTs
        // that name neither the disk nor the tap (7a) need only the VMM:
        // all four go side by side, so a start waits for the slowest (the
        // disk's fsync, under load), not for their sum. A failure in one
        // still lets the others finish before teardown runs over
        // everything recorded.
        let netmask = std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(TAP_PREFIX_LEN)));
        let boot_args = format!(
            "{} ip={guest_ip}::{host_ip}:{netmask}::eth0:off:{}",
            spec.kernel_args, self.config.guest_dns
        );
        let early = [
            ApiCall::Logger {
                log_path: paths.vmm_log.clone(),
            },
            ApiCall::Metrics {
                metrics_path: paths.metrics.clone(),
            },
            ApiCall::MachineConfig {
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
            },
            ApiCall::BootSource {
                kernel: spec.kernel.clone(),
                boot_args,
                initrd: spec.initrd.clone(),
            },
        ];
        let tap_side = async {
            self.net.create_tap(&tap).await?;
            failpoint::check("start.after_tap_created")?;
            self.net
                .configure_tap(&tap, host_ip, TAP_PREFIX_LEN)
                .await?;
            failpoint::check("start.after_tap_configured")?;
            // Loopback-sourced connections DNATed to the guest must be
            // allowed to leave through the tap.
            let localnet = if plan.port_forwards.is_empty() {
                "0"
            } else {
                "1"
            };
            self.net
                .set_sysctl(&format!("net.ipv4.conf.{tap}.route_localnet"), localnet)?;
            Ok::<_, StepError>(())
        };
        let disk_side = async {
            let drive = self.prepare_disk(id, generation, spec, paths, rt).await?;
            failpoint::check("start.after_disk_made")?;
            Ok::<_, StepError>(drive)
        };
        // What nftables installed is kept for `inspect` (with the
        // `running` write).
        let firewall_side = async {
            if plan.is_empty() {
                return Ok(Vec::new());
            }
            self.enable_forwarding()?;
            let installed = self.firewall.apply(&plan).await?;
            failpoint::check("start.after_firewall_applied")?;
            Ok::<_, StepError>(installed)
        };
        let vmm_side = async {
            let procs = self.procs.clone();
            let alive = move || procs.is_alive(pid, start_time, None);
            let mut api = self
                .vmm
                .connect(&paths.api_socket, self.config.vmm_ready_timeout(), &alive)
                .await?;
            for call in &early {
                failpoint::check("start.before_put")?;
                api.call(call).await?;
            }
            Ok::<_, StepError>(api)
        };
        let (made_tap, drive, installed, api) =
            tokio::join!(tap_side, disk_side, firewall_side, vmm_side);
        made_tap?;
        let drive = drive?;
        rt.firewall_handles = installed?;
        let mut api = api?;

        // 7b–8. The PUTs that name the disk and the tap, and the boot.
        let calls = [
            ApiCall::Drive {
                id: "rootfs".into(),
                path: drive,
                is_root: true,
                read_only: false,
            },
            ApiCall::NetworkInterface {
                id: "eth0".into(),
                tap: tap.clone(),
                mac,
            },
            ApiCall::InstanceStart,
        ];
        for call in &calls {
            if let ApiCall::NetworkInterface { tap, .. } = call {
                // Firecracker would create a missing tap itself, unowned
                // and unrecorded: a missing tap is an error instead.
                if !self.net.link_exists(tap).await? {
                    return Err(StepError::Plan(format!(
                        "tap {tap} vanished before the VMM could open it"
                    )));
                }
            }
            if matches!(call, ApiCall::InstanceStart) {
                failpoint::check("start.before_instance_start")?;
            } else {
                failpoint::check("start.before_put")?;
            }
            api.call(call).await?;
        }
        Ok(())
    }

    /// Turns on IPv4 forwarding the first time a VM needs it, and says so.
    fn enable_forwarding(&self) -> Result<(), StepError> {
        use std::sync::atomic::Ordering;
        if self.forwarding_enabled.load(Ordering::Relaxed) {
            return Ok(());
        }
        if self.net.get_sysctl("net.ipv4.ip_forward")?.trim() != "1" {
            self.net.set_sysctl("net.ipv4.ip_forward", "1")?;
            tracing::info!(
                "enabled IPv4 forwarding (net.ipv4.ip_forward=1) for VM NAT and port forwarding"
            );
        }
        self.forwarding_enabled.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The files the VM's disk is made of, whichever way it is made:
    /// recorded before any is.
    fn disk_record(&self, spec: &VmSpec, paths: &VmPaths) -> DiskRecord {
        if self.disk_strategy == DiskStrategy::DmSnapshot {
            DiskRecord {
                strategy: "dm-snapshot".into(),
                image: spec.rootfs.clone(),
                origin_link: Some(paths.origin_link.clone()),
                cow_file: Some(paths.cow_file.clone()),
                ..DiskRecord::default()
            }
        } else {
            DiskRecord {
                strategy: "copy".into(),
                image: spec.rootfs.clone(),
                device: Some(paths.rootfs_copy.clone()),
                copy_file: Some(paths.rootfs_copy.clone()),
                ..DiskRecord::default()
            }
        }
    }

    /// Makes (or, after a stop, re-attaches) the VM's writable root disk
    /// named by `rt.disk`; returns what Firecracker gets as its root drive.
    async fn prepare_disk(
        &self,
        id: Uuid,
        generation: u64,
        spec: &VmSpec,
        paths: &VmPaths,
        rt: &mut Runtime,
    ) -> Result<PathBuf, StepError> {
        match self.disk_strategy {
            DiskStrategy::DmSnapshot => self.prepare_dm(id, generation, spec, paths, rt).await,
            DiskStrategy::Copy | DiskStrategy::Auto => {
                let file = paths.rootfs_copy.clone();
                // The copy persists across stops (it is the VM's disk) and
                // is made under a temporary name, so a crash mid-copy never
                // leaves a truncated disk that a later start would use.
                if !file.exists() {
                    let tmp = paths.dir.join("rootfs.img.partial");
                    let disk = self.disk.clone();
                    let (src, dst) = (spec.rootfs.clone(), file.clone());
                    // Copy, sync and rename wait on the disk: off the async
                    // workers, all three.
                    let kind = tokio::task::spawn_blocking(move || {
                        let _ = std::fs::remove_file(&tmp);
                        let kind = disk.copy_image(&src, &tmp)?;
                        // Durable before it gets its final name: a power loss
                        // must not leave a half-written disk under that name.
                        std::fs::File::open(&tmp)
                            .and_then(|f| f.sync_all())
                            .map_err(io("sync root disk", &tmp))?;
                        std::fs::rename(&tmp, &dst).map_err(io("rename root disk", &dst))?;
                        Ok::<_, StepError>(kind)
                    })
                    .await
                    .map_err(|e| StepError::Plan(format!("copy task failed: {e}")))??;
                    tracing::debug!(?kind, disk = %file.display(), "root disk copied");
                }
                Ok(file)
            }
        }
    }

    async fn prepare_dm(
        &self,
        id: Uuid,
        generation: u64,
        spec: &VmSpec,
        paths: &VmPaths,
        rt: &mut Runtime,
    ) -> Result<PathBuf, StepError> {
        let (origin_link, cow_file) = (paths.origin_link.clone(), paths.cow_file.clone());
        if !origin_link.exists() {
            // A hard link normally, but a full copy across filesystems:
            // off the async workers either way.
            let disk = self.disk.clone();
            let (src, dst) = (spec.rootfs.clone(), origin_link.clone());
            tokio::task::spawn_blocking(move || disk.link_or_copy(&src, &dst))
                .await
                .map_err(|e| StepError::Plan(format!("link task failed: {e}")))??;
        }
        if !cow_file.exists() {
            let size = std::fs::metadata(&spec.rootfs)
                .map_err(io("stat image", &spec.rootfs))?
                .len();
            self.disk.create_sparse(&cow_file, size)?;
        }
        // Each loop: its backing file (the key) is recorded before the
        // attach, the device the kernel picked right after.
        let mut attach = |file: &PathBuf, ro: bool| -> Result<PathBuf, StepError> {
            if let Some(d) = rt.disk.as_mut() {
                d.attaching = Some(file.clone());
            }
            self.store.set_runtime(id, generation, rt)?;
            let dev = self.disk.attach_loop(file, ro)?;
            if let Some(d) = rt.disk.as_mut() {
                d.attaching = None;
                if ro {
                    d.origin_loop = Some(dev.clone());
                } else {
                    d.cow_loop = Some(dev.clone());
                }
            }
            self.store.set_runtime(id, generation, rt)?;
            Ok(dev)
        };
        let origin = attach(&origin_link, true)?;
        let cow = attach(&cow_file, false)?;
        let name = format!("hearth-{}", short_id(&id));
        if let Some(d) = rt.disk.as_mut() {
            d.dm_name = Some(name.clone());
        }
        self.store.set_runtime(id, generation, rt)?;
        let device = self.disk.dm_create_snapshot(&name, &origin, &cow)?;
        if let Some(d) = rt.disk.as_mut() {
            d.device = Some(device.clone());
        }
        self.store.set_runtime(id, generation, rt)?;
        Ok(device)
    }
}
