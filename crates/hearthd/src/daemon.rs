//! What `hearthd` and the CLI's offline mode share: the state-dir lock
//! that makes one daemon per state dir, and the real host.

use std::sync::Arc;

use crate::config::Config;
use crate::host::LinuxProcesses;
use crate::host::disk::linux::LinuxDisk;
use crate::host::firewall::nft::Nft;
use crate::host::net::linux::LinuxNet;
use crate::lifecycle::Host;

/// Why the daemon (or an offline sweep) cannot own the state dir.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state dir or its lock file could not be made.
    #[error("cannot open {}", path.display())]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the lock.
    #[error("another hearthd holds {}; refusing to start", path.display())]
    Locked {
        /// The state dir.
        path: std::path::PathBuf,
    },
    /// rtnetlink could not be opened.
    #[error("cannot open the host's network interfaces")]
    Net(#[from] crate::host::net::NetError),
}

/// One daemon per state dir: an exclusive `flock` on `<state>/hearthd.lock`,
/// held as long as the returned file lives (the kernel drops it when the
/// process dies, however it dies). Makes the state dir and its VMs dir.
pub fn lock_state_dir(config: &Config) -> Result<std::fs::File, DaemonError> {
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| DaemonError::Io { path, source }
    };
    std::fs::create_dir_all(&config.state_dir).map_err(io(&config.state_dir))?;
    let path = config.state_dir.join("hearthd.lock");
    let file = std::fs::File::create(&path).map_err(io(&path))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| DaemonError::Locked {
            path: config.state_dir.clone(),
        },
    )?;
    let vms = config.vms_dir();
    std::fs::create_dir_all(&vms).map_err(io(&vms))?;
    mark_top_dir(&vms);
    Ok(file)
}

/// Marks the VMs dir as the top of unrelated trees (`chattr +T`), so ext4's
/// Orlov allocator gives each VM's dir, and with it the VM's files, a block
/// group of its own choosing instead of packing every VM into the parent's.
/// Under churn (VMs made and deleted many times a second) that matters: on
/// ext4 without a journal the inode allocator skips, one by one, every
/// inode of the group freed in the last minutes (`recently_deleted`), and a
/// single group took that whole cost: 6–17 % of the machine's CPU in the
/// throughput bench, growing with the churn of the minutes before.
/// Best effort: other filesystems ignore or refuse the flag, and nothing
/// depends on it.
fn mark_top_dir(dir: &std::path::Path) {
    use rustix::fs::{IFlags, Mode, OFlags, ioctl_getflags, ioctl_setflags, open};
    let set = open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .and_then(|f| {
        let flags = ioctl_getflags(&f)?;
        if flags.contains(IFlags::TOPDIR) {
            return Ok(());
        }
        ioctl_setflags(&f, flags | IFlags::TOPDIR)
    });
    if let Err(e) = set {
        tracing::debug!(dir = %dir.display(), error = %e, "cannot mark the VMs dir +T (top of unrelated trees)");
    }
}

/// The real host: /proc and pidfds, rtnetlink and tun ioctls, nft, loop
/// and dm ioctls. Must be called inside a tokio runtime, in the network
/// namespace the daemon manages.
pub fn linux_host() -> Result<Host, DaemonError> {
    Ok(Host {
        procs: Arc::new(LinuxProcesses),
        net: Arc::new(LinuxNet::new()?),
        firewall: Arc::new(Nft::new()),
        disk: Arc::new(LinuxDisk::new()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_lock_makes_a_top_vms_dir_and_excludes_a_second_holder() {
        // Under the workspace's target dir: on the disk the repo is on, not
        // a tmpfs /tmp (which keeps no such flag).
        let tmp = tempfile::Builder::new()
            .prefix("hearth-test-lock-")
            .tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target"))
            .unwrap();
        let config = Config {
            state_dir: tmp.path().join("state"),
            ..Config::default()
        };
        let lock = lock_state_dir(&config).unwrap();
        assert!(matches!(
            lock_state_dir(&config),
            Err(DaemonError::Locked { .. })
        ));
        // ext4 keeps the flag (this machine's disk, and CI's).
        let vms = rustix::fs::open(
            config.vms_dir(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let flags = rustix::fs::ioctl_getflags(&vms).unwrap();
        assert!(flags.contains(rustix::fs::IFlags::TOPDIR), "{flags:?}");
        drop(lock);
        // Marking an already marked dir, after the first holder is gone.
        drop(lock_state_dir(&config).unwrap());
    }
}
