//! Disk half of the host: each VM's writable root disk, made so that the
//! image it was created from is never modified.
//!
//! Two strategies: `copy` (a reflink — FICLONE — where the filesystem can,
//! otherwise a sparse copy) and `dm-snapshot` (a read-only loop device over
//! the image, a loop device over a sparse copy-on-write file, and a
//! device-mapper snapshot `hearth-<shortid>` over both). Loop and dm go
//! through the kernel's ioctl interfaces (loopdev-3, devicemapper), not
//! losetup/dmsetup.
//!
//! Every loop device's backing file lies under the state dir (DESIGN.md,
//! "Ownership marks"): the origin loop is attached through a per-VM hard
//! link to the image, so a loop can always be traced back to its VM.

pub mod fake;
pub mod linux;

use std::path::{Path, PathBuf};

/// Why a disk call failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A file operation.
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
    /// A loop device operation.
    #[error("loop {op} {target}")]
    Loop {
        /// What was attempted.
        op: &'static str,
        /// The device or backing file.
        target: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A device-mapper operation.
    #[error("device-mapper {op} {name}")]
    Dm {
        /// What was attempted.
        op: &'static str,
        /// The dm name.
        name: String,
        /// What the kernel said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The device stayed busy through every retry.
    #[error("{what} {target} still busy after {tries} tries")]
    Busy {
        /// `loop` or `dm`.
        what: &'static str,
        /// Which.
        target: String,
        /// How many attempts.
        tries: u32,
    },
}

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyKind {
    /// FICLONE: shares extents, instant.
    Reflink,
    /// Data extents copied, holes kept.
    Sparse,
    /// A hard link (same inode; only for read-only use).
    Hardlink,
}

/// The disk operations lifecycle needs. Sync: each is a few syscalls,
/// except copies, which callers run on a blocking thread.
pub trait DiskHost: Send + Sync + std::fmt::Debug {
    /// Whether device-mapper works on this host (`/dev/mapper/control`
    /// answers DM_VERSION).
    fn dm_available(&self) -> bool;

    /// Copies `src` to `dst` (which must not exist): reflink if possible,
    /// else sparse. A partial `dst` is removed on failure.
    fn copy_image(&self, src: &Path, dst: &Path) -> Result<CopyKind, DiskError>;

    /// Makes `dst` name `src`'s contents for read-only use: a hard link when
    /// both are on one filesystem, else a copy as [`DiskHost::copy_image`].
    fn link_or_copy(&self, src: &Path, dst: &Path) -> Result<CopyKind, DiskError>;

    /// Creates a sparse file of `size` bytes (absent only).
    fn create_sparse(&self, path: &Path, size: u64) -> Result<(), DiskError>;

    /// Attaches `file` to a free loop device; returns `/dev/loopN`.
    fn attach_loop(&self, file: &Path, read_only: bool) -> Result<PathBuf, DiskError>;

    /// Loop devices whose backing file is `file` (the key that finds a loop
    /// whose number was never recorded).
    fn find_loops(&self, file: &Path) -> Result<Vec<PathBuf>, DiskError>;

    /// Every loop device and its backing file.
    fn list_loops(&self) -> Result<Vec<(PathBuf, PathBuf)>, DiskError>;

    /// Detaches a loop device; not attached or absent is success; busy is
    /// retried briefly, then reported.
    fn detach_loop(&self, dev: &Path) -> Result<(), DiskError>;

    /// Creates dm device `name` as a persistent snapshot of `origin` with
    /// `cow` as exception store; returns `/dev/mapper/<name>`.
    fn dm_create_snapshot(
        &self,
        name: &str,
        origin: &Path,
        cow: &Path,
    ) -> Result<PathBuf, DiskError>;

    /// Removes dm device `name`; absent is success; busy is retried
    /// briefly, then reported.
    fn dm_remove(&self, name: &str) -> Result<(), DiskError>;

    /// Names of dm devices starting with `prefix`.
    fn list_dm(&self, prefix: &str) -> Result<Vec<String>, DiskError>;
}
