//! Start, as a journal of steps. Each step records what it is about to
//! create in the VM's runtime record first, then creates it:
//!
//! ```text
//!  1. state → starting, runtime.vm_dir          (store)   then mkdir
//!  2. runtime.api_socket, logs, metrics paths   (store)   then remove a stale
//!                                                          socket, create files
//!  3. spawn the VMM in its own session                     then runtime.pid +
//!                                                          start time (store)
//!  4. PUT /logger, /metrics, /machine-config, /boot-source, /drives/rootfs
//!  5. PUT /actions InstanceStart
//!  6. state → running                            (store)   then watch the pid
//! ```
//!
//! A failure anywhere runs the one teardown routine over whatever the
//! record names, then records state `error` with the cause. Between 3's
//! spawn and its store write the pid is unknown, but the API socket path
//! on the VMM's command line was recorded in 2, so teardown finds it.

use hearth_api::{Runtime, Vm, VmSpec, VmState};
use uuid::Uuid;

use super::{Lifecycle, LifecycleError, StepError, VmPaths, error_chain, holds_resources};
use crate::host::SpawnSpec;
use crate::store::{Transition, now_ms};
use crate::vmm::ApiCall;

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
        rt = Runtime {
            vm_dir: Some(paths.dir.clone()),
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
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => {
                if let (Some(pid), Some(st)) = (rt.pid, rt.pid_start_time) {
                    self.watch(id, pid, st);
                }
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
        // 1. The VM dir (recorded by the `starting` transition).
        std::fs::create_dir_all(&paths.dir).map_err(io("create VM dir", &paths.dir))?;

        // 2. Files, recorded first.
        rt.api_socket = Some(paths.api_socket.clone());
        rt.console_log = Some(paths.console_log.clone());
        rt.vmm_log = Some(paths.vmm_log.clone());
        rt.metrics_path = Some(paths.metrics.clone());
        self.store.set_runtime(id, generation, rt)?;
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
        let (program, args) = self.vmm.command(&paths.api_socket, &id.to_string());
        let (pid, start_time) = self.procs.spawn(&SpawnSpec {
            program,
            args,
            console_log: paths.console_log.clone(),
        })?;
        rt.pid = Some(pid);
        rt.pid_start_time = Some(start_time);
        self.store.set_runtime(id, generation, rt)?;

        // 4–5. Configure and boot.
        let procs = self.procs.clone();
        let alive = move || procs.is_alive(pid, start_time, None);
        let mut api = self
            .vmm
            .connect(&paths.api_socket, self.config.vmm_ready_timeout(), &alive)
            .await?;
        let calls = [
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
                boot_args: spec.kernel_args.clone(),
                initrd: spec.initrd.clone(),
            },
            ApiCall::Drive {
                id: "rootfs".into(),
                path: spec.rootfs.clone(),
                is_root: true,
                read_only: false,
            },
            ApiCall::InstanceStart,
        ];
        for call in &calls {
            api.call(call).await?;
        }
        Ok(())
    }
}
