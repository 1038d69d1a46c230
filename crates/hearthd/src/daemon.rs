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
/// process dies, however it dies).
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
    Ok(file)
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
