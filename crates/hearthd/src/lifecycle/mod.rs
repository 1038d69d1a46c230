//! VM lifecycle: create, start, stop, kill, delete — each under a per-VM
//! lock, each a journal of steps whose output is in the store before the
//! next step runs (DESIGN.md, "Operations as journaled steps").
//!
//! Different VMs never wait on each other: the only host-wide locks are the
//! lock-table mutex (held for a map lookup) and the store's connection
//! mutex (held for one SQLite statement). The in-memory part of a VM — its
//! lock and its process watcher — is rebuilt from the store at start
//! ([`Lifecycle::recover`]), never the other way round.

mod console;
mod observe;
mod start;
mod teardown;
mod validate;

#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::error::Error as StdError;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use hearth_api::{CreateVmRequest, Runtime, Vm, VmState};
use uuid::Uuid;

pub use console::{ConsoleFollow, tail_bytes};
pub use observe::EventFollow;
pub use teardown::RecoverReport;

use crate::capability::HostNet;
use crate::config::{Config, DiskStrategy};
use crate::host::ProcessHost;
use crate::host::disk::DiskHost;
use crate::host::firewall::Firewall;
use crate::host::net::NetHost;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, VmRow};
use crate::vmm::Backend;

/// Why a lifecycle operation failed. The API maps each variant to one
/// status code (`api::status_of`).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The request is malformed or names something unusable.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The request collides with another VM (a host port, say).
    #[error("conflicting {what}: {reason}")]
    Conflict {
        /// Which part of the request.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// No VM has this id or name.
    #[error("no VM with id or name {0:?}")]
    NotFound(String),
    /// The VM is in a state that does not allow the operation.
    #[error("cannot {op} VM {name}: it is {state}")]
    WrongState {
        /// The operation.
        op: &'static str,
        /// The VM.
        name: String,
        /// Its state.
        state: VmState,
    },
    /// The VM's record cannot be parsed, so the operation cannot be
    /// planned from it. `kill` and `rm --force` still work.
    #[error(
        "VM {name} has a corrupt record ({reason}); `hearth kill` or `hearth rm --force` cleans it up"
    )]
    Corrupt {
        /// The VM.
        name: String,
        /// The parse error.
        reason: String,
    },
    /// A start step failed; everything done so far was unwound.
    #[error("start of VM {name} failed")]
    StartFailed {
        /// The VM.
        name: String,
        /// The step's error (boxed: it is large and rare).
        #[source]
        source: Box<StepError>,
    },
    /// Some teardown steps failed; what is left is still named in the
    /// VM's runtime record and the next stop, kill or delete retries.
    #[error("teardown of VM {name} incomplete: {}", errors.join("; "))]
    TeardownFailed {
        /// The VM.
        name: String,
        /// Every step's error chain.
        errors: Vec<String>,
    },
    /// A file the daemon keeps could not be read.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The metrics text could not be written.
    #[error("cannot encode the metrics")]
    Metrics {
        /// The formatter's error.
        #[source]
        source: std::fmt::Error,
    },
    /// The orphan sweep could not list what it needs.
    #[error(transparent)]
    Sweep(#[from] crate::sweep::SweepError),
    /// A network call outside any VM's journal (pool pre-warming).
    #[error(transparent)]
    Net(#[from] crate::host::net::NetError),
    /// An armed failpoint (crash harness builds only).
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A journal step's failure.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A file or directory operation.
    #[error("{op} {}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM process.
    #[error(transparent)]
    Process(#[from] crate::host::ProcessError),
    /// The VMM's API.
    #[error(transparent)]
    Vmm(#[from] crate::vmm::VmmError),
    /// Taps, addresses, sysctls.
    #[error(transparent)]
    Net(#[from] crate::host::net::NetError),
    /// nftables.
    #[error(transparent)]
    Firewall(#[from] crate::host::firewall::FirewallError),
    /// Copies, loops, dm.
    #[error(transparent)]
    Disk(#[from] crate::host::disk::DiskError),
    /// An armed failpoint (crash harness builds only).
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
    /// A plan that cannot be carried out (no uplink for nat, …).
    #[error("{0}")]
    Plan(String),
    /// Writing the journal.
    #[error("journal write failed")]
    Store(#[from] StoreError),
}

/// Renders an error and its causes, outermost first, each once.
pub fn error_chain(e: &(dyn StdError + 'static)) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if out.last() != Some(&s) {
            out.push(s);
        }
        cur = c.source();
    }
    out
}

/// Where a VM's files live: derived from the state dir and the id alone,
/// so they can be found even when a runtime record is unreadable.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// `<state>/vms/<id>`.
    pub dir: PathBuf,
    /// Firecracker's API socket.
    pub api_socket: PathBuf,
    /// The VMM's stdout and stderr (the serial console).
    pub console_log: PathBuf,
    /// Firecracker's own log.
    pub vmm_log: PathBuf,
    /// Firecracker's metrics.
    pub metrics: PathBuf,
    /// `copy`: the VM's own copy of its image.
    pub rootfs_copy: PathBuf,
    /// `dm-snapshot`: the per-VM link the origin loop is attached through.
    pub origin_link: PathBuf,
    /// `dm-snapshot`: the copy-on-write file.
    pub cow_file: PathBuf,
}

impl VmPaths {
    /// Paths of VM `id` under `config.state_dir`.
    pub fn new(config: &Config, id: Uuid) -> VmPaths {
        let dir = config.vms_dir().join(id.to_string());
        VmPaths {
            api_socket: dir.join("api.sock"),
            console_log: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
            metrics: dir.join("metrics.json"),
            rootfs_copy: dir.join("rootfs.img"),
            origin_link: dir.join("origin.img"),
            cow_file: dir.join("cow.img"),
            dir,
        }
    }
}

/// The host implementations a lifecycle drives: real ones in the daemon,
/// fakes in unit tests.
#[derive(Debug, Clone)]
pub struct Host {
    /// VMM processes.
    pub procs: Arc<dyn ProcessHost>,
    /// Taps, addresses, sysctls.
    pub net: Arc<dyn NetHost>,
    /// nftables.
    pub firewall: Arc<dyn Firewall>,
    /// Root disks.
    pub disk: Arc<dyn DiskHost>,
}

/// Owns every VM: the store, the host, the VMM backend, the per-VM locks.
#[derive(Debug)]
pub struct Lifecycle {
    store: Arc<Store>,
    config: Config,
    procs: Arc<dyn ProcessHost>,
    net: Arc<dyn NetHost>,
    firewall: Arc<dyn Firewall>,
    disk: Arc<dyn DiskHost>,
    vmm: Arc<dyn Backend>,
    host_net: HostNet,
    disk_strategy: DiskStrategy,
    forwarding_enabled: std::sync::atomic::AtomicBool,
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    create_lock: Mutex<()>,
    metrics: Metrics,
    samples: crate::poller::Samples,
    me: Weak<Lifecycle>,
}

impl Lifecycle {
    /// A lifecycle over the given store, host and backend. `host_net` is
    /// what the daemon found out about the host's network at start; the
    /// configured disk strategy is resolved here (`auto` → dm-snapshot where
    /// device-mapper works, else copy).
    pub fn new(
        store: Arc<Store>,
        config: Config,
        host: Host,
        vmm: Arc<dyn Backend>,
        host_net: HostNet,
    ) -> Arc<Lifecycle> {
        let disk_strategy = match config.disk_strategy {
            DiskStrategy::Auto if host.disk.dm_available() => DiskStrategy::DmSnapshot,
            DiskStrategy::Auto => DiskStrategy::Copy,
            other => other,
        };
        Arc::new_cyclic(|me| Lifecycle {
            store,
            config,
            procs: host.procs,
            net: host.net,
            firewall: host.firewall,
            disk: host.disk,
            vmm,
            host_net,
            disk_strategy,
            forwarding_enabled: std::sync::atomic::AtomicBool::new(false),
            locks: Mutex::new(HashMap::new()),
            create_lock: Mutex::new(()),
            metrics: Metrics::new(),
            samples: crate::poller::Samples::default(),
            me: me.clone(),
        })
    }

    /// The root disk strategy in force (never `auto`).
    pub fn disk_strategy(&self) -> DiskStrategy {
        self.disk_strategy
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The stats poller's latest sample of each running VM.
    pub fn samples(&self) -> &crate::poller::Samples {
        &self.samples
    }

    /// The daemon's metrics (counters the API, the sweep and `main` bump).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn lock_for(&self, id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone()
    }

    fn forget_lock(&self, id: Uuid) {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn lookup(&self, key: &str) -> Result<VmRow, LifecycleError> {
        self.store
            .find(key)?
            .ok_or_else(|| LifecycleError::NotFound(key.to_owned()))
    }

    /// Takes VM `key`'s lock and reads its row afresh under it.
    async fn locked(
        &self,
        key: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, VmRow), LifecycleError> {
        let id = self.lookup(key)?.id;
        let guard = self.lock_for(id).lock_owned().await;
        // Re-read under the lock: the row may have moved on (or gone)
        // while this call waited.
        match self.store.get(id) {
            Ok(row) => Ok((guard, row)),
            Err(StoreError::NotFound { .. }) => Err(LifecycleError::NotFound(key.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// Validates `req` completely, then records the VM in state `created`.
    /// Nothing is written if anything is wrong.
    pub fn create(&self, req: CreateVmRequest) -> Result<Vm, LifecycleError> {
        let (spec, caps) = validate::create_request(&req)?;
        // Held from the conflict check to the insert, so two creates
        // cannot both claim one host port. Only store reads inside.
        let _create = self.create_lock.lock().unwrap_or_else(|p| p.into_inner());
        let others: Vec<_> = self
            .store
            .list()?
            .into_iter()
            .filter_map(|r| r.spec.ok())
            .map(|s| crate::capability::parse_all(&s.capabilities).unwrap_or_default())
            .collect();
        crate::capability::check_conflicts(&caps, &others).map_err(|reason| {
            LifecycleError::Conflict {
                what: "capabilities",
                reason,
            }
        })?;
        let ttl = req.ttl_secs.map(std::time::Duration::from_secs);
        let row = self
            .store
            .insert_vm_with_ttl(Uuid::now_v7(), &req.name, &spec, ttl)?;
        tracing::info!(vm = %req.name, id = %row.id, "created");
        Ok(row.to_api())
    }

    /// One VM by id or name.
    pub fn get(&self, key: &str) -> Result<Vm, LifecycleError> {
        Ok(self.lookup(key)?.to_api())
    }

    /// Every VM.
    pub fn list(&self) -> Result<Vec<Vm>, LifecycleError> {
        Ok(self.store.list()?.iter().map(VmRow::to_api).collect())
    }

    /// Events of one VM after `since`.
    pub fn events(&self, key: &str, since: i64) -> Result<Vec<hearth_api::Event>, LifecycleError> {
        let row = self.lookup(key)?;
        Ok(self.store.events(Some(row.id), since, 10_000)?)
    }

    /// The host implementations, as one value.
    pub fn host(&self) -> Host {
        Host {
            procs: self.procs.clone(),
            net: self.net.clone(),
            firewall: self.firewall.clone(),
            disk: self.disk.clone(),
        }
    }

    /// Marked objects no VM record claims (`hearth doctor --leaks`).
    pub async fn leaks(&self) -> Result<Vec<hearth_api::Orphan>, LifecycleError> {
        let found = crate::sweep::find(&self.config, &self.store, &self.host()).await?;
        Ok(found.iter().map(|f| f.to_api(None)).collect())
    }

    /// Finds and removes orphans (`hearth gc`, and at daemon start after
    /// recovery); each removal is logged with what it was and why.
    pub async fn gc(&self) -> Result<Vec<hearth_api::Orphan>, LifecycleError> {
        let host = self.host();
        let found = crate::sweep::find(&self.config, &self.store, &host).await?;
        crate::failpoint::check("sweep.after_list")?;
        let removed = crate::sweep::remove(&found, &host).await;
        for (f, error) in &removed {
            let o = f.to_api(error.clone());
            let what = match error {
                None => format!("swept orphan {}: {} ({})", o.kind, o.object, o.reason),
                Some(e) => format!("could not sweep orphan {}: {}: {e}", o.kind, o.object),
            };
            if error.is_none() {
                self.metrics.orphan_swept(f.kind());
            }
            // Orphans of no known VM are logged under the nil VM id.
            if let Err(e) = self
                .store
                .append_event(f.vm_id(), hearth_api::EventKind::Sweep, &what)
            {
                tracing::warn!(error = %e, "cannot record a sweep event");
            }
        }
        Ok(removed.into_iter().map(|(f, e)| f.to_api(e)).collect())
    }

    /// Makes sure `tap_pool_prewarm` idle taps exist, kernel side included
    /// (after a host reboot the rows are there but the taps are not). Each
    /// new tap's row is written before the tap is created.
    pub async fn prewarm_taps(&self) -> Result<(), LifecycleError> {
        let want = self.config.tap_pool_prewarm as usize;
        let mut idle: Vec<String> = self
            .store
            .taps()?
            .into_iter()
            .filter(|t| t.vm_id.is_none())
            .map(|t| t.name)
            .collect();
        while idle.len() < want {
            match self.store.add_idle_tap(self.config.pool().slots())? {
                Some(name) => idle.push(name),
                None => break,
            }
        }
        for name in idle.iter().take(want) {
            self.net.create_tap(name).await?;
        }
        if want > 0 {
            tracing::info!(taps = idle.len().min(want), "tap pool pre-warmed");
        }
        Ok(())
    }

    /// The runtime to drive a teardown from: the stored one, or — when the
    /// record is corrupt — one rebuilt from the paths every VM's objects
    /// have, so the VMM can still be found by its API socket.
    ///
    /// Everything a VM can hold is derivable that way except its firewall
    /// keys: a corrupt VM's nft elements are removed by the VM id in their
    /// marks (`Firewall::remove_orphan`) after the teardown.
    fn teardown_runtime(&self, row: &VmRow) -> Runtime {
        row.runtime.clone().unwrap_or_else(|_| {
            let p = VmPaths::new(&self.config, row.id);
            let tap = self
                .store
                .taps()
                .ok()
                .and_then(|t| t.into_iter().find(|t| t.vm_id == Some(row.id)))
                .map(|t| t.name);
            Runtime {
                api_socket: Some(p.api_socket),
                metrics_path: Some(p.metrics),
                console_log: Some(p.console_log),
                vmm_log: Some(p.vmm_log),
                tap,
                disk: Some(hearth_api::DiskRecord {
                    strategy: "unknown (record corrupt)".into(),
                    origin_link: Some(p.origin_link),
                    cow_file: Some(p.cow_file),
                    dm_name: Some(format!("hearth-{}", hearth_api::short_id(&row.id))),
                    ..hearth_api::DiskRecord::default()
                }),
                vm_dir: Some(p.dir),
                ..Runtime::default()
            }
        })
    }
}

/// True when a runtime record still names a process, kernel object or
/// file to remove.
pub fn holds_resources(rt: &Runtime) -> bool {
    rt.pid.is_some()
        || rt.api_socket.is_some()
        || rt.metrics_path.is_some()
        || rt.tap.is_some()
        || rt.firewall.is_some()
        || rt.disk.is_some()
}

/// The guest's MAC: locally administered, unicast, from the VM id's random
/// tail, so it is stable across restarts.
pub fn mac_for(id: Uuid) -> String {
    let b = id.as_bytes();
    format!(
        "06:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[11], b[12], b[13], b[14], b[15]
    )
}
