//! The orphan sweep: find every kernel object and file that carries
//! hearth's mark (DESIGN.md, "Ownership marks") but that no VM record
//! claims, and remove them in dependency order — processes, firewall, dm,
//! loops, taps, files.
//!
//! Kernel objects are listed *before* the store is read. Every object a
//! start creates is recorded before it is created, so anything found in
//! the kernel is already claimed in the store read afterwards; and every
//! teardown removes an object before it drops its record. A sweep running
//! beside live operations therefore never mistakes a VM's fresh object for
//! an orphan. A VM whose runtime record is corrupt claims nothing but its
//! directory: its objects are exactly what the sweep is for.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use hearth_api::Orphan;

use crate::config::Config;
use crate::lifecycle::{Host, error_chain};
use crate::store::{Store, StoreError};

/// Why a sweep could not list what it needs.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// Listing kernel objects failed.
    #[error("cannot list {what}")]
    List {
        /// Which kind.
        what: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn list<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> SweepError {
    move |e| SweepError::List {
        what,
        source: Box::new(e),
    }
}

/// One orphan and how to remove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A VMM whose API socket lies under the state dir.
    Process {
        /// Its pid.
        pid: u32,
        /// Its start time.
        start_time: u64,
        /// The API socket on its command line.
        socket: PathBuf,
    },
    /// Elements of hearth's nft sets marked `hearth:vm:<id>`.
    Firewall {
        /// The VM id in the marks.
        vm_id: String,
    },
    /// A dm device `hearth-…`.
    Dm {
        /// Its name.
        name: String,
    },
    /// A loop device backed by a file under the state dir.
    Loop {
        /// The device.
        dev: PathBuf,
        /// Its backing file.
        backing: PathBuf,
    },
    /// A tap `hth…` not in the pool.
    Tap {
        /// Its name.
        name: String,
    },
    /// A VM directory without a row.
    VmDir {
        /// The directory.
        path: PathBuf,
    },
}

impl Target {
    /// Removal order: what holds something goes before what it holds.
    fn rank(&self) -> u8 {
        match self {
            Target::Process { .. } => 0,
            Target::Firewall { .. } => 1,
            Target::Dm { .. } => 2,
            Target::Loop { .. } => 3,
            Target::Tap { .. } => 4,
            Target::VmDir { .. } => 5,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Target::Process { .. } => "process",
            Target::Firewall { .. } => "firewall",
            Target::Dm { .. } => "dm",
            Target::Loop { .. } => "loop",
            Target::Tap { .. } => "tap",
            Target::VmDir { .. } => "vm-dir",
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Process { pid, socket, .. } => {
                format!("VMM pid {pid} (--api-sock {})", socket.display())
            }
            Target::Firewall { vm_id } => {
                format!("nft elements marked hearth:vm:{vm_id} in table ip hearth")
            }
            Target::Dm { name } => format!("dm device {name}"),
            Target::Loop { dev, backing } => {
                format!("loop {} backed by {}", dev.display(), backing.display())
            }
            Target::Tap { name } => format!("tap {name}"),
            Target::VmDir { path } => format!("VM dir {}", path.display()),
        }
    }
}

/// An orphan found by [`find`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// What it is.
    pub target: Target,
    /// Why no record claims it.
    pub reason: String,
}

impl Found {
    /// The VM this orphan belonged to, when its name says (a VM dir, or a
    /// VMM whose API socket lies in one); the nil id otherwise.
    pub fn vm_id(&self) -> uuid::Uuid {
        let from = |p: &Path| {
            p.components()
                .rev()
                .find_map(|c| uuid::Uuid::parse_str(c.as_os_str().to_str()?).ok())
        };
        match &self.target {
            Target::VmDir { path } => from(path),
            Target::Process { socket, .. } => from(socket),
            Target::Loop { backing, .. } => from(backing),
            _ => None,
        }
        .unwrap_or_default()
    }

    /// The kind, as the API and metrics name it.
    pub fn kind(&self) -> &'static str {
        self.target.kind()
    }

    /// The API view, with the outcome of a removal if there was one.
    pub fn to_api(&self, error: Option<String>) -> Orphan {
        Orphan {
            kind: self.target.kind().to_owned(),
            object: self.target.describe(),
            reason: self.reason.clone(),
            error,
        }
    }
}

/// Lists every marked object no record claims, in removal order.
pub async fn find(config: &Config, store: &Store, host: &Host) -> Result<Vec<Found>, SweepError> {
    // The kernel first, the store second (module doc).
    let vms_dir = config.vms_dir();
    let procs: Vec<_> = host
        .procs
        .find_by_arg_under(&vms_dir)
        .into_iter()
        .filter(|(_, _, arg)| arg.file_name().is_some_and(|n| n == "api.sock"))
        .collect();
    let marked = host
        .firewall
        .list_vms()
        .await
        .map_err(list("nft elements"))?;
    let dms = host.disk.list_dm("hearth-").map_err(list("dm devices"))?;
    let loops: Vec<_> = host
        .disk
        .list_loops()
        .map_err(list("loop devices"))?
        .into_iter()
        .filter(|(_, backing)| backing.starts_with(&config.state_dir))
        .collect();
    let taps = host.net.list_taps("hth").await.map_err(list("taps"))?;
    let dirs: Vec<PathBuf> = match std::fs::read_dir(&vms_dir) {
        Ok(d) => d.filter_map(|e| Some(e.ok()?.path())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(list("VM dirs")(e)),
    };

    let rows = store.list()?;
    let pool: HashSet<String> = store.taps()?.into_iter().map(|t| t.name).collect();
    let ids: HashSet<String> = rows.iter().map(|r| r.id.to_string()).collect();
    let (mut sockets, mut fw_ids, mut dm_names, mut backings) = (
        HashSet::new(),
        HashSet::new(),
        HashSet::new(),
        HashSet::<PathBuf>::new(),
    );
    for row in &rows {
        let Ok(rt) = &row.runtime else { continue };
        sockets.extend(rt.api_socket.clone());
        if let Some(f) = &rt.firewall {
            fw_ids.insert(f.vm_id.clone());
        }
        if let Some(d) = &rt.disk {
            dm_names.extend(d.dm_name.clone());
            backings.extend(
                [&d.attaching, &d.origin_link, &d.cow_file]
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
    }
    let unclaimed = |what: &str| format!("no VM record names this {what}");
    let mut found = Vec::new();
    for (pid, start_time, socket) in procs {
        if !sockets.contains(&socket) {
            found.push(Found {
                target: Target::Process {
                    pid,
                    start_time,
                    socket,
                },
                reason: unclaimed("API socket"),
            });
        }
    }
    for vm_id in marked.into_iter().filter(|s| !fw_ids.contains(s)) {
        found.push(Found {
            target: Target::Firewall { vm_id },
            reason: unclaimed("VM's firewall rules"),
        });
    }
    for name in dms.into_iter().filter(|n| !dm_names.contains(n)) {
        found.push(Found {
            target: Target::Dm { name },
            reason: unclaimed("dm device"),
        });
    }
    for (dev, backing) in loops.into_iter().filter(|(_, b)| !backings.contains(b)) {
        found.push(Found {
            target: Target::Loop { dev, backing },
            reason: unclaimed("loop's backing file"),
        });
    }
    for name in taps.into_iter().filter(|t| !pool.contains(t)) {
        found.push(Found {
            target: Target::Tap { name },
            reason: "not in the tap pool".into(),
        });
    }
    for path in dirs {
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !ids.contains(named) {
            found.push(Found {
                target: Target::VmDir { path },
                reason: "no VM has this id".into(),
            });
        }
    }
    found.sort_by_key(|f| f.target.rank());
    Ok(found)
}

/// Removes each orphan (in the order given, which [`find`] makes the
/// dependency order); returns each with `None` if it is gone, else why not.
pub async fn remove(found: &[Found], host: &Host) -> Vec<(Found, Option<String>)> {
    let mut out = Vec::with_capacity(found.len());
    for f in found {
        let result = match &f.target {
            Target::Process {
                pid, start_time, ..
            } => host
                .procs
                .kill(*pid, *start_time)
                .await
                .map_err(|e| error_chain(&e)),
            Target::Firewall { vm_id } => host
                .firewall
                .remove_orphan(vm_id)
                .await
                .map_err(|e| error_chain(&e)),
            Target::Dm { name } => host.disk.dm_remove(name).map_err(|e| error_chain(&e)),
            Target::Loop { dev, .. } => host.disk.detach_loop(dev).map_err(|e| error_chain(&e)),
            Target::Tap { name } => host
                .net
                .delete_link(name)
                .await
                .map_err(|e| error_chain(&e)),
            Target::VmDir { path } => remove_dir(path).map_err(|e| vec![e]),
        };
        let result = result.and_then(|()| {
            crate::failpoint::check("sweep.after_remove").map_err(|e| vec![e.to_string()])
        });
        let error = result.err().map(|chain| chain.join(": "));
        match &error {
            None => tracing::info!(
                kind = f.target.kind(),
                object = %f.target.describe(),
                reason = %f.reason,
                "removed orphan"
            ),
            Some(e) => tracing::warn!(
                kind = f.target.kind(),
                object = %f.target.describe(),
                error = %e,
                "could not remove orphan"
            ),
        }
        out.push((f.clone(), error));
    }
    out
}

fn remove_dir(path: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("remove {}: {e}", path.display())),
    }
}

/// `hearth doctor --leaks` and `hearth gc` when no daemon is running: the
/// same sweep, straight from the store. Takes the state dir's lock first,
/// so no daemon can start meanwhile (and a running one is never raced).
pub async fn offline(config: &Config, remove_them: bool) -> anyhow::Result<Vec<Orphan>> {
    use anyhow::Context;
    let _lock = crate::daemon::lock_state_dir(config)?;
    let store = Store::open(&config.db_path())
        .with_context(|| format!("open the store at {}", config.db_path().display()))?;
    let host = crate::daemon::linux_host()?;
    let found = find(config, &store, &host).await?;
    if !remove_them {
        return Ok(found.iter().map(|f| f.to_api(None)).collect());
    }
    Ok(remove(&found, &host)
        .await
        .into_iter()
        .map(|(f, e)| f.to_api(e))
        .collect())
}

#[cfg(test)]
mod tests {
    use hearth_api::{CreateVmRequest, VmSpec};

    use super::*;
    use crate::host::net::NetHost;
    use crate::host::{ProcessHost, SpawnSpec};

    #[tokio::test]
    async fn finds_only_unclaimed_objects_and_removes_them_in_order() {
        let fx = crate::lifecycle::testkit::env_with(true);
        let (l, procs, net, fw, disk) = (&fx.l, &fx.procs, &fx.net, &fx.fw, &fx.disk);
        let (config, store, host) = (l.config().clone(), l.store(), l.host());
        let dir = fx._dir.path();
        l.create(CreateVmRequest {
            name: "live".into(),
            spec: VmSpec {
                capabilities: vec!["nat".into()],
                ..fx.spec.clone()
            },
            ttl_secs: None,
        })
        .unwrap();
        l.start("live").await.unwrap();
        assert!(
            find(&config, store, &host).await.unwrap().is_empty(),
            "a live VM is not an orphan"
        );

        // One orphan of each kind.
        let ghost = config
            .vms_dir()
            .join("0190f3a2-1b2c-7000-8000-000000000000");
        std::fs::create_dir_all(&ghost).unwrap();
        procs
            .spawn(&SpawnSpec {
                program: "vmm".into(),
                args: vec!["--api-sock".into(), ghost.join("api.sock").into()],
                console_log: dir.join("c.log"),
            })
            .unwrap();
        net.create_tap("hth99").await.unwrap();
        net.add_link("hthu0", false);
        fw.insert(hearth_api::VmRules {
            short_id: "00000000dead".into(),
            vm_id: "x".into(),
            tap: "hth99".into(),
            guest_ip: "10.231.9.2".parse().unwrap(),
            nat_uplink: None,
            port_forwards: vec![],
        });
        let cow = ghost.join("cow.img");
        std::fs::write(&cow, b"").unwrap();
        disk.add_orphan_loop(&cow, false);
        disk.add_orphan_dm("hearth-00000000dead", &cow, &cow);

        let found = find(&config, store, &host).await.unwrap();
        let kinds: Vec<_> = found.iter().map(|f| f.target.kind()).collect();
        assert_eq!(
            kinds,
            ["process", "firewall", "dm", "loop", "tap", "vm-dir"],
            "{found:?}"
        );
        let removed = remove(&found, &host).await;
        assert!(removed.iter().all(|(_, e)| e.is_none()), "{removed:?}");
        assert!(find(&config, store, &host).await.unwrap().is_empty());
        // The live VM kept everything; the veth named hth* was never touched.
        assert_eq!(l.get("live").unwrap().state, hearth_api::VmState::Running);
        assert_eq!(fw.installed().len(), 1);
        assert!(net.calls().iter().all(|c| c != "delete_link hthu0"));
        l.kill("live").await.unwrap();
    }
}
