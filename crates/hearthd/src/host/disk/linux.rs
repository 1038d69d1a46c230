//! The real [`DiskHost`]: copies through FICLONE / `copy_file_range`, loop
//! devices through `/dev/loop-control` (loopdev-3), device-mapper through
//! `/dev/mapper/control` (devicemapper). No external commands.
//!
//! Why it is shaped this way:
//!
//! - **Loops are found again by backing file.** The kernel picks the loop
//!   number, so a crash between attach and the store write leaves a loop
//!   whose number nobody recorded. The backing file's path was recorded
//!   first, and `/sys/block/loopN/loop/backing_file` reports it — as the
//!   kernel resolves it (`d_path`: absolute, symlinks resolved, with
//!   ` (deleted)` appended once the file is unlinked). So
//!   [`LinuxDisk::attach_loop`] refuses a path the kernel would report
//!   differently (a relative path, a symlink on the way): such a loop could
//!   not be matched by an exact compare later. [`LinuxDisk::find_loops`]
//!   strips ` (deleted)`, so teardown still finds a loop whose backing file
//!   (or whole VM directory) is already gone.
//! - **Attach is LOOP_SET_FD alone**, on a descriptor opened read-only for
//!   a read-only loop: that gives everything we ask for (no offset, no
//!   autoclear, read-only from the descriptor), while loopdev's builder
//!   adds a LOOP_SET_STATUS64 that costs ~19 ms for nothing. LOOP_SET_FD
//!   answers EBUSY when another process took the free device first; we ask
//!   for the next free one.
//! - **Detach is lazy in the kernel.** `LOOP_CLR_FD` only marks the loop
//!   for autoclear while anyone else (udev's blkid, a dm table, a mount)
//!   holds it open, and returns success. So a detach is confirmed by
//!   watching the loop's `loop/` directory in sysfs disappear, and reported
//!   as [`DiskError::Busy`] if it does not within a short while; the mark
//!   stays, so the kernel frees the loop as soon as the holder lets go.
//!   Detach notes the backing file first and stops touching the device once
//!   it is bound to anything else: a freed number can be handed to another
//!   VM's attach at once.
//! - **Copies** try FICLONE, then copy only the data extents (SEEK_DATA /
//!   SEEK_HOLE, `copy_file_range`, read/write where that is refused), so a
//!   sparse image stays sparse. A partial copy is removed. No fsync (it
//!   would cost a full writeback per start); a caller that needs the copy
//!   durable syncs it.
//! - **dm tables name devices by `major:minor`**, read from the device
//!   nodes we are given, so no path ever needs quoting inside a table line
//!   and a non-block-device is refused before anything is created. A dm
//!   device whose table could not be loaded or resumed is removed again
//!   before the error is returned.
//! - **`/dev/mapper/<name>`** is made by udev where udev runs (the crate
//!   waits on udev's cookie); where it does not, we create the node
//!   ourselves, as libdevmapper's fallback does, and remove it on
//!   [`LinuxDisk::dm_remove`].

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use devicemapper::{DM, DevId, DmError, DmName, DmOptions};
use loopdev::{LoopControl, LoopDevice};
use rustix::fs::SeekFrom;
use rustix::io::Errno;

use super::{CopyKind, DiskError, DiskHost};

/// The device-mapper control node.
const DM_CONTROL: &str = "/dev/mapper/control";
/// Where the kernel lists block devices.
const SYS_BLOCK: &str = "/sys/block";
/// What `d_path` appends to the path of an unlinked file.
const DELETED_SUFFIX: &[u8] = b" (deleted)";
/// Attempts at a loop operation that another process can make busy.
const LOOP_TRIES: u32 = 10;
/// Pause between two such attempts.
const LOOP_PAUSE: Duration = Duration::from_millis(20);
/// How often devicemapper's `device_remove` tries before giving up on
/// EBUSY (it retries internally, 200 ms apart).
const DM_REMOVE_TRIES: u32 = 5;
/// Largest single `copy_file_range` request.
const COPY_CHUNK: u64 = 1 << 30;
/// Buffer for the read/write fallback.
const RW_BUF: usize = 1 << 20;

/// The host's real disk operations. Stateless: every answer comes from the
/// kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinuxDisk;

impl LinuxDisk {
    /// The real disk host.
    pub fn new() -> Self {
        Self
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DiskError {
    move |source| DiskError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn loop_err(
    op: &'static str,
    target: impl std::fmt::Display,
) -> impl FnOnce(io::Error) -> DiskError {
    move |source| DiskError::Loop {
        op,
        target: target.to_string(),
        source,
    }
}

fn dm_err(op: &'static str, name: &str) -> impl FnOnce(DmError) -> DiskError {
    move |e| DiskError::Dm {
        op,
        name: name.to_owned(),
        source: Box::new(e),
    }
}

/// Removes a file on drop unless disarmed: a half-written copy never
/// survives an error (or a panic) in the middle of [`LinuxDisk::copy_image`].
struct RemoveOnError<'a> {
    path: &'a Path,
    armed: bool,
}

impl Drop for RemoveOnError<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

/// FICLONE errors that mean "this filesystem (pair) cannot reflink", as
/// opposed to a real failure such as ENOSPC or EIO.
fn clone_unsupported(e: Errno) -> bool {
    matches!(
        e,
        Errno::OPNOTSUPP | Errno::NOTTY | Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::BADF
    )
}

/// `copy_file_range` errors after which plain read/write still works.
fn cfr_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
    )
}

/// Copies `len` bytes at `off` from `src` to the same offset of `dst`;
/// `use_cfr` is cleared for good once `copy_file_range` proves unusable.
fn copy_range(
    src: &File,
    dst: &File,
    off: u64,
    len: u64,
    use_cfr: &mut bool,
    dst_path: &Path,
) -> Result<(), DiskError> {
    let end = off + len;
    let mut pos = off;
    while *use_cfr && pos < end {
        let chunk = usize::try_from((end - pos).min(COPY_CHUNK)).unwrap_or(usize::MAX);
        let (mut off_in, mut off_out) = (pos, pos);
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), chunk) {
            Ok(0) => {
                return Err(DiskError::Io {
                    op: "copy to",
                    path: dst_path.to_path_buf(),
                    source: io::Error::new(ErrorKind::UnexpectedEof, "source shrank during copy"),
                });
            }
            Ok(n) => pos += n as u64,
            Err(Errno::INTR) => {}
            Err(e) => {
                let e = io::Error::from(e);
                if !cfr_unsupported(&e) {
                    return Err(io_err("copy to", dst_path)(e));
                }
                *use_cfr = false;
            }
        }
    }
    if pos == end {
        // copy_file_range did it all: no bounce buffer (1 MiB, zeroed).
        return Ok(());
    }
    let mut buf = vec![0u8; RW_BUF];
    while pos < end {
        let want = usize::try_from((end - pos).min(RW_BUF as u64)).unwrap_or(RW_BUF);
        let n = match src.read_at(&mut buf[..want], pos) {
            Ok(0) => {
                return Err(DiskError::Io {
                    op: "copy to",
                    path: dst_path.to_path_buf(),
                    source: io::Error::new(ErrorKind::UnexpectedEof, "source shrank during copy"),
                });
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("copy to", dst_path)(e)),
        };
        dst.write_all_at(&buf[..n], pos)
            .map_err(io_err("copy to", dst_path))?;
        pos += n as u64;
    }
    Ok(())
}

/// Copies every data extent of `src` (length `len`) into the empty `dst`,
/// leaving holes as holes, then sets `dst`'s length so trailing holes are
/// kept too.
fn sparse_copy(
    src: &File,
    dst: &File,
    len: u64,
    src_path: &Path,
    dst_path: &Path,
) -> Result<(), DiskError> {
    let mut use_cfr = true;
    let mut pos = 0;
    while pos < len {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d,
            // Nothing but hole from here to the end.
            Err(Errno::NXIO) => break,
            // No SEEK_DATA here: treat the rest as data.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => pos,
            Err(e) => return Err(io_err("seek data in", src_path)(e.into())),
        };
        if data >= len {
            break;
        }
        let hole = match rustix::fs::seek(src, SeekFrom::Hole(data)) {
            Ok(h) => h.min(len),
            Err(Errno::INVAL | Errno::OPNOTSUPP) => len,
            Err(e) => return Err(io_err("seek hole in", src_path)(e.into())),
        };
        if hole <= data {
            // Cannot happen for a file that does not change under us; do not
            // spin if it does.
            return Err(DiskError::Io {
                op: "seek hole in",
                path: src_path.to_path_buf(),
                source: io::Error::other(format!("hole at {hole} before data at {data}")),
            });
        }
        copy_range(src, dst, data, hole - data, &mut use_cfr, dst_path)?;
        pos = hole;
    }
    dst.set_len(len).map_err(io_err("set length of", dst_path))
}

/// The `/sys/block/<name>/loop` directory of loop device `dev`; it exists
/// exactly while the loop is bound to a file.
fn sys_loop_dir(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?;
    Some(Path::new(SYS_BLOCK).join(name).join("loop"))
}

/// Parses the contents of a `backing_file` attribute: one path and a
/// newline, ` (deleted)` appended if the file was unlinked. Returns the
/// path as reported and the path without the suffix.
fn parse_backing_file(raw: &[u8]) -> (PathBuf, PathBuf) {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let stripped = raw.strip_suffix(DELETED_SUFFIX).unwrap_or(raw);
    (
        PathBuf::from(OsStr::from_bytes(raw)),
        PathBuf::from(OsStr::from_bytes(stripped)),
    )
}

/// Every bound loop device: `(/dev/loopN, backing file as reported,
/// backing file without " (deleted)")`.
fn scan_loops() -> Result<Vec<(PathBuf, PathBuf, PathBuf)>, DiskError> {
    let sys = Path::new(SYS_BLOCK);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(sys).map_err(io_err("list", sys))? {
        let entry = entry.map_err(io_err("list", sys))?;
        let name = entry.file_name();
        if !name.as_bytes().starts_with(b"loop") {
            continue;
        }
        let attr = entry.path().join("loop").join("backing_file");
        let raw = match std::fs::read(&attr) {
            Ok(raw) => raw,
            // Not bound, or detached while we looked.
            Err(e) if matches!(e.kind(), ErrorKind::NotFound) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) => continue,
            Err(e) => return Err(io_err("read", &attr)(e)),
        };
        let (reported, stripped) = parse_backing_file(&raw);
        out.push((Path::new("/dev").join(&name), reported, stripped));
    }
    out.sort();
    Ok(out)
}

/// Whether the kernel says loop `dev` is read-only.
fn loop_read_only(dev: &Path) -> bool {
    let Some(name) = dev.file_name() else {
        return false;
    };
    std::fs::read(Path::new(SYS_BLOCK).join(name).join("ro")).is_ok_and(|v| v.starts_with(b"1"))
}

/// The backing file of loop `dev` as the kernel reports it.
fn backing_file_of(dev: &Path) -> Option<PathBuf> {
    let attr = sys_loop_dir(dev)?.join("backing_file");
    std::fs::read(attr)
        .ok()
        .map(|raw| parse_backing_file(&raw).0)
}

/// The backing file of loop `dev` without " (deleted)", or `None` if the
/// loop is not bound (or does not exist).
fn loop_backing(dev: &Path) -> Result<Option<PathBuf>, DiskError> {
    let Some(dir) = sys_loop_dir(dev) else {
        return Err(DiskError::Loop {
            op: "name",
            target: dev.display().to_string(),
            source: io::Error::new(ErrorKind::InvalidInput, "not a device path"),
        });
    };
    let attr = dir.join("backing_file");
    match std::fs::read(&attr) {
        Ok(raw) => Ok(Some(parse_backing_file(&raw).1)),
        Err(e)
            if e.kind() == ErrorKind::NotFound
                || matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) =>
        {
            Ok(None)
        }
        Err(e) => Err(io_err("read", &attr)(e)),
    }
}

/// Opens device-mapper, telling "not on this host" apart from a failure.
fn open_dm(op: &'static str, name: &str) -> Result<DM, DiskError> {
    if !Path::new(DM_CONTROL).exists() {
        return Err(DiskError::Dm {
            op,
            name: name.to_owned(),
            source: format!("device-mapper is not available on this host ({DM_CONTROL} is absent)")
                .into(),
        });
    }
    DM::new().map_err(dm_err(op, name))
}

/// A valid dm name that is also safe as a file name in `/dev/mapper`.
fn checked_dm_name(name: &str) -> Result<&DmName, DiskError> {
    if matches!(name, "control" | "." | "..") || name.contains('/') {
        return Err(DiskError::Dm {
            op: "check name",
            name: name.to_owned(),
            source: "not usable as a device-mapper name".into(),
        });
    }
    DmName::new(name).map_err(dm_err("check name", name))
}

/// The device number of block device `path`.
fn block_dev(path: &Path) -> Result<u64, DiskError> {
    let meta = std::fs::metadata(path).map_err(io_err("stat", path))?;
    if !meta.file_type().is_block_device() {
        return Err(DiskError::Io {
            op: "use as block device",
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::ENOTBLK),
        });
    }
    Ok(meta.rdev())
}

/// The size of block device `path` in bytes (BLKGETSIZE64).
fn block_size(path: &Path) -> Result<u64, DiskError> {
    let f = File::open(path).map_err(io_err("open", path))?;
    const BLKGETSIZE64: rustix::ioctl::Opcode =
        rustix::ioctl::opcode::read::<libc::size_t>(0x12, 114);
    // SAFETY: BLKGETSIZE64 (`_IOR(0x12, 114, size_t)` in <linux/fs.h>) is a
    // getter: the kernel writes one u64, the device size in bytes, through
    // the pointer, and `Getter<_, u64>` provides exactly that buffer.
    let size = unsafe {
        let ctl = rustix::ioctl::Getter::<BLKGETSIZE64, u64>::new();
        rustix::ioctl::ioctl(&f, ctl)
    };
    size.map_err(|e| io_err("read size of", path)(e.into()))
}

/// The errno of a failed dm ioctl.
fn dm_errno(e: &DmError) -> Option<i32> {
    match e {
        DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno)) => Some(**errno as i32),
        _ => None,
    }
}

/// `major:minor`, as dm tables name devices.
fn dev_str(dev: u64) -> String {
    format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev))
}

impl DiskHost for LinuxDisk {
    fn dm_available(&self) -> bool {
        Path::new(DM_CONTROL).exists() && DM::new().and_then(|dm| dm.version()).is_ok()
    }

    fn copy_image(&self, src: &Path, dst: &Path) -> Result<CopyKind, DiskError> {
        let src_file = File::open(src).map_err(io_err("open", src))?;
        let meta = src_file.metadata().map_err(io_err("stat", src))?;
        if !meta.is_file() {
            return Err(DiskError::Io {
                op: "copy from",
                path: src.to_path_buf(),
                source: io::Error::new(ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let dst_file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dst)
            .map_err(io_err("create", dst))?;
        // From here on, dst is ours: remove it unless we finish.
        let mut guard = RemoveOnError {
            path: dst,
            armed: true,
        };
        let kind = match rustix::fs::ioctl_ficlone(&dst_file, &src_file) {
            Ok(()) => CopyKind::Reflink,
            Err(e) if clone_unsupported(e) => {
                // A failed clone may have left some extents behind.
                dst_file.set_len(0).map_err(io_err("truncate", dst))?;
                sparse_copy(&src_file, &dst_file, meta.len(), src, dst)?;
                CopyKind::Sparse
            }
            Err(e) => return Err(io_err("clone into", dst)(e.into())),
        };
        guard.armed = false;
        Ok(kind)
    }

    fn link_or_copy(&self, src: &Path, dst: &Path) -> Result<CopyKind, DiskError> {
        match std::fs::hard_link(src, dst) {
            Ok(()) => Ok(CopyKind::Hardlink),
            // Another filesystem, too many links, or a filesystem without
            // hard links: a copy serves the same read-only purpose.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EMLINK | libc::EPERM | libc::EOPNOTSUPP)
                ) =>
            {
                self.copy_image(src, dst)
            }
            Err(e) => Err(io_err("hard-link", dst)(e)),
        }
    }

    fn create_sparse(&self, path: &Path, size: u64) -> Result<(), DiskError> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err("create", path))?;
        let mut guard = RemoveOnError { path, armed: true };
        f.set_len(size).map_err(io_err("set length of", path))?;
        guard.armed = false;
        Ok(())
    }

    fn attach_loop(&self, file: &Path, read_only: bool) -> Result<PathBuf, DiskError> {
        // Opened once, by exactly this path: the kernel reports the path the
        // file was opened by, and that is the key find_loops matches. The
        // loop is read-only exactly when this descriptor is.
        let backing = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(file)
            .map_err(io_err("open", file))?;
        let ctl = LoopControl::open().map_err(loop_err("open", "/dev/loop-control"))?;
        let mut tries = 0;
        let dev = loop {
            tries += 1;
            let ld = ctl
                .next_free()
                .map_err(loop_err("find free device for", file.display()))?;
            let Some(dev) = ld.path() else {
                return Err(DiskError::Loop {
                    op: "name",
                    target: file.display().to_string(),
                    source: io::Error::other("cannot read the path of the free loop device"),
                });
            };
            // LOOP_SET_FD alone, not loopdev's `with()…attach` builder: the
            // builder follows with LOOP_SET_STATUS64, which here costs ~19 ms
            // (a queue freeze) to set what LOOP_SET_FD already gives — no
            // offset, no autoclear, read-only from the descriptor's mode.
            match ld.attach_fd(backing.as_raw_fd()) {
                Ok(()) => break dev,
                // Another process took this device between next_free and
                // LOOP_SET_FD: ask for the next free one.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < LOOP_TRIES => {}
                Err(e) => {
                    return Err(DiskError::Loop {
                        op: "attach",
                        target: format!("{} to {}", file.display(), dev.display()),
                        source: e,
                    });
                }
            }
        };
        // The exact compare in find_loops only works if the kernel reports
        // the path we were given, and a read-only loop must be read-only:
        // refuse (and undo) anything else.
        let reported = backing_file_of(&dev);
        let problem = if reported.as_deref() != Some(file) {
            Some(format!(
                "the kernel reports the backing file of {} as {}; pass an absolute path \
                 without symlinks so it can be found again",
                dev.display(),
                reported.as_deref().unwrap_or(Path::new("?")).display(),
            ))
        } else if read_only && !loop_read_only(&dev) {
            Some(format!("{} is not read-only", dev.display()))
        } else {
            None
        };
        if let Some(problem) = problem {
            let undo = match self.detach_loop(&dev) {
                Ok(()) => String::new(),
                Err(e) => format!(" (and detaching it failed: {e})"),
            };
            return Err(DiskError::Io {
                op: "attach loop to",
                path: file.to_path_buf(),
                source: io::Error::new(ErrorKind::InvalidInput, format!("{problem}{undo}")),
            });
        }
        Ok(dev)
    }

    fn find_loops(&self, file: &Path) -> Result<Vec<PathBuf>, DiskError> {
        Ok(scan_loops()?
            .into_iter()
            .filter(|(_, reported, stripped)| reported == file || stripped == file)
            .map(|(dev, _, _)| dev)
            .collect())
    }

    fn list_loops(&self) -> Result<Vec<(PathBuf, PathBuf)>, DiskError> {
        Ok(scan_loops()?
            .into_iter()
            .map(|(dev, _, stripped)| (dev, stripped))
            .collect())
    }

    fn detach_loop(&self, dev: &Path) -> Result<(), DiskError> {
        // What `dev` is bound to now. Once it is bound to anything else, ours
        // is gone and another attach reused the number: that loop is not
        // ours to touch.
        let Some(ours) = loop_backing(dev)? else {
            return Ok(());
        };
        let still_ours =
            || -> Result<bool, DiskError> { Ok(loop_backing(dev)?.is_some_and(|now| now == ours)) };
        for _ in 0..LOOP_TRIES {
            let ld = match LoopDevice::open(dev) {
                Ok(ld) => ld,
                // No such device: nothing to detach.
                Err(e)
                    if e.kind() == ErrorKind::NotFound
                        || matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) =>
                {
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    sleep(LOOP_PAUSE);
                    if !still_ours()? {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(loop_err("open", dev.display())(e)),
            };
            if !still_ours()? {
                return Ok(());
            }
            match ld.detach() {
                Ok(()) => {}
                // Not bound (or already being torn down).
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(loop_err("detach", dev.display())(e)),
            }
            // Our own descriptor keeps the loop alive; the kernel tears it
            // down when the last opener closes.
            drop(ld);
            if !still_ours()? {
                return Ok(());
            }
            sleep(LOOP_PAUSE);
            if !still_ours()? {
                return Ok(());
            }
        }
        Err(DiskError::Busy {
            what: "loop",
            target: dev.display().to_string(),
            tries: LOOP_TRIES,
        })
    }

    fn dm_create_snapshot(
        &self,
        name: &str,
        origin: &Path,
        cow: &Path,
    ) -> Result<PathBuf, DiskError> {
        let dm_name = checked_dm_name(name)?;
        let dm = open_dm("create", name)?;
        let origin_dev = block_dev(origin)?;
        let cow_dev = block_dev(cow)?;
        let sectors = block_size(origin)? / 512;
        if sectors == 0 {
            return Err(DiskError::Io {
                op: "use as snapshot origin",
                path: origin.to_path_buf(),
                source: io::Error::new(
                    ErrorKind::InvalidInput,
                    "device is smaller than one sector",
                ),
            });
        }
        let table = [(
            0,
            sectors,
            "snapshot".to_owned(),
            format!("{} {} P 8", dev_str(origin_dev), dev_str(cow_dev)),
        )];

        dm.device_create(dm_name, None, DmOptions::default())
            .map_err(dm_err("create", name))?;
        let id = DevId::Name(dm_name);
        let made = dm
            .table_load(&id, &table, DmOptions::default())
            .map_err(dm_err("load snapshot table for", name))
            .and_then(|_| {
                dm.device_suspend(&id, DmOptions::default())
                    .map_err(dm_err("resume", name))
            });
        let info = match made {
            Ok(info) => info,
            Err(e) => {
                // Do not leave a half-made device behind.
                let _ = dm.device_remove(&id, DmOptions::default());
                return Err(e);
            }
        };

        // udev's node (a symlink to ../dm-N) or ours; anything else (a stale
        // node left for an earlier device of this name) is replaced, as
        // libdevmapper's fallback would.
        let node = Path::new("/dev/mapper").join(name);
        let d = info.device();
        let want = rustix::fs::makedev(d.major, d.minor);
        let right = std::fs::metadata(&node)
            .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == want);
        if !right {
            let _ = std::fs::remove_file(&node);
            let made = rustix::fs::mknodat(
                rustix::fs::CWD,
                &node,
                rustix::fs::FileType::BlockDevice,
                rustix::fs::Mode::from_raw_mode(0o600),
                want,
            );
            match made {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => {
                    let _ = dm.device_remove(&id, DmOptions::default());
                    return Err(io_err("create device node", &node)(e.into()));
                }
            }
        }
        Ok(node)
    }

    fn dm_remove(&self, name: &str) -> Result<(), DiskError> {
        let dm_name = checked_dm_name(name)?;
        if !Path::new(DM_CONTROL).exists() {
            // No device-mapper, so no such device.
            return Ok(());
        }
        let dm = open_dm("remove", name)?;
        // devicemapper retries EBUSY itself (DM_REMOVE_TRIES times, 200 ms
        // apart) before it gives up.
        match dm.device_remove(&DevId::Name(dm_name), DmOptions::default()) {
            Ok(_) => {}
            Err(e) if dm_errno(&e) == Some(libc::ENXIO) => {}
            Err(e) if dm_errno(&e) == Some(libc::EBUSY) => {
                return Err(DiskError::Busy {
                    what: "dm",
                    target: name.to_owned(),
                    tries: DM_REMOVE_TRIES,
                });
            }
            Err(e) => return Err(dm_err("remove", name)(e)),
        }
        // A node we made ourselves (no udev) outlives the device. Only a
        // block device or udev's symlink: never `/dev/mapper/control`.
        let node = Path::new("/dev/mapper").join(name);
        let ours = std::fs::symlink_metadata(&node)
            .is_ok_and(|m| m.file_type().is_block_device() || m.file_type().is_symlink());
        if !ours {
            return Ok(());
        }
        match std::fs::remove_file(&node) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove device node", &node)(e)),
        }
    }

    fn list_dm(&self, prefix: &str) -> Result<Vec<String>, DiskError> {
        if !Path::new(DM_CONTROL).exists() {
            return Ok(Vec::new());
        }
        let dm = open_dm("list", prefix)?;
        let mut names: Vec<String> = dm
            .list_devices()
            .map_err(dm_err("list", prefix))?
            .into_iter()
            .map(|(name, _, _)| name.to_string())
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::unix::fs::MetadataExt as _;
    use std::process::Command;
    use std::time::Instant;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// Privileged tests fail loudly without root, unless the caller opted
    /// out with `HEARTH_SKIP_PRIVILEGED=1` (then the test returns early).
    fn require_root() -> bool {
        if rustix::process::geteuid().is_root() {
            return true;
        }
        if std::env::var("HEARTH_SKIP_PRIVILEGED").as_deref() == Ok("1") {
            eprintln!("SKIPPED: privileged test, not root, HEARTH_SKIP_PRIVILEGED=1");
            return false;
        }
        panic!("this test needs root (loop devices); run as root or set HEARTH_SKIP_PRIVILEGED=1");
    }

    /// A `hearth-test-*` temp dir that, before it is removed, detaches every
    /// loop backed by a file inside it and removes the dm devices it was
    /// told about — also when the test panics half-way.
    struct TestDir {
        dir: tempfile::TempDir,
        dm: Vec<String>,
    }

    impl TestDir {
        fn new() -> Self {
            Self::new_in(std::env::temp_dir())
        }

        fn new_in(parent: impl AsRef<Path>) -> Self {
            let dir = tempfile::Builder::new()
                .prefix("hearth-test-")
                .tempdir_in(parent)
                .unwrap();
            Self {
                dir,
                dm: Vec::new(),
            }
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        fn join(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let disk = LinuxDisk;
            for name in &self.dm {
                let _ = disk.dm_remove(name);
            }
            for (dev, file) in disk.list_loops().unwrap_or_default() {
                if file.starts_with(self.dir.path()) {
                    let _ = disk.detach_loop(&dev);
                }
            }
        }
    }

    /// Writes a sparse file of `len` bytes with `data` at the given offsets.
    fn sparse_file(path: &Path, len: u64, data: &[(u64, &[u8])]) {
        let f = File::create(path).unwrap();
        for (off, bytes) in data {
            f.write_all_at(bytes, *off).unwrap();
        }
        f.set_len(len).unwrap();
        f.sync_all().unwrap();
    }

    fn fs_type(path: &Path) -> String {
        let out = Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn copy_image_keeps_content_and_holes() {
        let d = TestDir::new();
        let src = d.join("image.ext4");
        let block: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        // Data at a few offsets, the last well before the end, so the file
        // ends in a hole.
        sparse_file(
            &src,
            64 * MIB,
            &[
                (0, &block),
                (MIB + 123, b"hello"),
                (33 * MIB, &block),
                (40 * MIB - 3, b"straddles a block"),
            ],
        );
        let dst = d.join("rootfs.ext4");
        let t = Instant::now();
        let kind = LinuxDisk.copy_image(&src, &dst).unwrap();
        let took = t.elapsed();
        eprintln!(
            "copy_image of a 64 MiB sparse image on {}: {kind:?} in {took:?}",
            fs_type(d.path())
        );
        let (sm, dm) = (
            std::fs::metadata(&src).unwrap(),
            std::fs::metadata(&dst).unwrap(),
        );
        assert_eq!(dm.len(), 64 * MIB, "trailing hole kept");
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        eprintln!("st_blocks: src {} dst {}", sm.blocks(), dm.blocks());
        // Sparse: about as many blocks as the source (allow some slack for
        // extent alignment), far fewer than a full 64 MiB (131072).
        assert!(
            dm.blocks() <= sm.blocks() + 256,
            "dst has {} blocks, src {}",
            dm.blocks(),
            sm.blocks()
        );
        assert!(
            dm.blocks() < 2048,
            "dst is not sparse: {} blocks",
            dm.blocks()
        );
    }

    #[test]
    fn copy_image_of_empty_and_hole_only_files() {
        let d = TestDir::new();
        for (name, len) in [("empty", 0), ("holes", 5 * MIB + 7)] {
            let src = d.join(name);
            sparse_file(&src, len, &[]);
            let dst = d.join(&format!("{name}.copy"));
            LinuxDisk.copy_image(&src, &dst).unwrap();
            let m = std::fs::metadata(&dst).unwrap();
            assert_eq!(m.len(), len);
            assert_eq!(m.blocks(), 0);
        }
    }

    #[test]
    fn copy_image_across_filesystems() {
        // /dev/shm is a tmpfs here, /tmp is not: FICLONE says EXDEV.
        if !Path::new("/dev/shm").is_dir()
            || fs_type(Path::new("/dev/shm")) == fs_type(&std::env::temp_dir())
        {
            eprintln!("no second filesystem; skipping the cross-filesystem half");
            return;
        }
        let a = TestDir::new();
        let b = TestDir::new_in("/dev/shm");
        let src = a.join("img");
        sparse_file(&src, 8 * MIB, &[(4 * MIB, b"data")]);
        let dst = b.join("copy");
        assert_eq!(LinuxDisk.copy_image(&src, &dst).unwrap(), CopyKind::Sparse);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let link = b.join("link");
        assert_eq!(
            LinuxDisk.link_or_copy(&src, &link).unwrap(),
            CopyKind::Sparse
        );
        assert_eq!(std::fs::read(&link).unwrap(), std::fs::read(&src).unwrap());
    }

    #[test]
    fn copy_image_refuses_bad_input_and_keeps_existing_dst() {
        let d = TestDir::new();
        let src = d.join("img");
        std::fs::write(&src, b"new").unwrap();
        let dst = d.join("dst");
        std::fs::write(&dst, b"someone else's").unwrap();
        let err = LinuxDisk.copy_image(&src, &dst).unwrap_err();
        assert!(matches!(err, DiskError::Io { op: "create", .. }), "{err}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"someone else's");

        let err = LinuxDisk
            .copy_image(&d.join("missing"), &d.join("x"))
            .unwrap_err();
        assert!(matches!(err, DiskError::Io { op: "open", .. }), "{err}");
        let err = LinuxDisk.copy_image(d.path(), &d.join("x")).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::Io {
                    op: "copy from",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!d.join("x").exists());
    }

    /// A copy that fails half-way (here: the file size limit, EFBIG) removes
    /// what it wrote. Runs in a child process so the rlimit touches nothing
    /// else.
    #[test]
    fn copy_image_failure_removes_partial_dst() {
        const CHILD: &str = "HEARTH_TEST_COPY_FSIZE_CHILD";
        if let Ok(dir) = std::env::var(CHILD) {
            let dir = PathBuf::from(dir);
            let dst = dir.join("dst");
            match LinuxDisk.copy_image(&dir.join("src"), &dst) {
                Ok(kind) => {
                    assert_eq!(
                        kind,
                        CopyKind::Reflink,
                        "only a reflink can dodge the limit"
                    );
                    println!("CHILD: reflinked, no failure to observe");
                }
                Err(e) => {
                    assert!(matches!(e, DiskError::Io { op: "copy to", .. }), "{e}");
                    assert!(!dst.exists(), "partial dst left behind");
                    println!("CHILD: failed as expected ({e}); dst removed");
                }
            }
            return;
        }
        let d = TestDir::new();
        sparse_file(
            &d.join("src"),
            8 * MIB,
            &[(0, &[1u8; 4096]), (6 * MIB, &[2u8; 4096])],
        );
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "host::disk::linux::tests::copy_image_failure_removes_partial_dst",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, d.path());
        // SAFETY: between fork and exec only async-signal-safe calls:
        // setrlimit and sigaction (through `signal`).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                rustix::process::setrlimit(
                    rustix::process::Resource::Fsize,
                    rustix::process::Rlimit {
                        current: Some(MIB),
                        maximum: None,
                    },
                )?;
                // EFBIG instead of death by SIGXFSZ.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("{stdout}");
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("CHILD: "),
            "child did not run the test: {stdout}"
        );
        assert!(!d.join("dst").exists());
    }

    #[test]
    fn link_or_copy_links_on_one_filesystem() {
        let d = TestDir::new();
        let src = d.join("img");
        std::fs::write(&src, b"image").unwrap();
        let dst = d.join("vm-origin");
        assert_eq!(
            LinuxDisk.link_or_copy(&src, &dst).unwrap(),
            CopyKind::Hardlink
        );
        assert_eq!(
            std::fs::metadata(&src).unwrap().ino(),
            std::fs::metadata(&dst).unwrap().ino()
        );
        let err = LinuxDisk.link_or_copy(&src, &dst).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::Io {
                    op: "hard-link",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn create_sparse_makes_a_hole_only_file() {
        let d = TestDir::new();
        let p = d.join("cow");
        LinuxDisk.create_sparse(&p, 1 << 30).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.len(), m.blocks()), (1 << 30, 0));
        assert!(LinuxDisk.create_sparse(&p, 1).is_err());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 30);
    }

    #[test]
    fn parses_backing_file_attribute() {
        let (r, s) = parse_backing_file(b"/var/lib/hearth/vms/a/origin (deleted)\n");
        assert_eq!(r, Path::new("/var/lib/hearth/vms/a/origin (deleted)"));
        assert_eq!(s, Path::new("/var/lib/hearth/vms/a/origin"));
        let (r, s) = parse_backing_file(b"/a b/c\n");
        assert_eq!(
            (r.as_path(), s.as_path()),
            (Path::new("/a b/c"), Path::new("/a b/c"))
        );
    }

    fn sysfs_ro(dev: &Path) -> String {
        let name = dev.file_name().unwrap();
        std::fs::read_to_string(Path::new(SYS_BLOCK).join(name).join("ro"))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn loop_attach_find_list_detach() {
        if !require_root() {
            return;
        }
        let d = TestDir::new();
        let img = d.join("image");
        sparse_file(&img, 8 * MIB, &[(0, b"boot")]);
        let t = Instant::now();
        let dev = LinuxDisk.attach_loop(&img, true).unwrap();
        let attach = t.elapsed();
        assert!(
            dev.to_str().unwrap().starts_with("/dev/loop"),
            "{}",
            dev.display()
        );
        assert_eq!(sysfs_ro(&dev), "1");
        assert_eq!(LinuxDisk.find_loops(&img).unwrap(), vec![dev.clone()]);
        assert!(
            LinuxDisk
                .list_loops()
                .unwrap()
                .contains(&(dev.clone(), img.clone()))
        );
        // The loop really serves the file.
        let mut buf = [0u8; 4];
        File::open(&dev)
            .unwrap()
            .read_exact_at(&mut buf, 0)
            .unwrap();
        assert_eq!(&buf, b"boot");

        let cow = d.join("cow");
        LinuxDisk.create_sparse(&cow, 4 * MIB).unwrap();
        let rw = LinuxDisk.attach_loop(&cow, false).unwrap();
        assert_ne!(rw, dev);
        assert_eq!(sysfs_ro(&rw), "0");
        assert_eq!(LinuxDisk.find_loops(&cow).unwrap(), vec![rw.clone()]);

        let t = Instant::now();
        LinuxDisk.detach_loop(&dev).unwrap();
        let detach = t.elapsed();
        eprintln!("attach_loop {attach:?}, detach_loop {detach:?}");
        LinuxDisk.detach_loop(&dev).unwrap();
        assert!(LinuxDisk.find_loops(&img).unwrap().is_empty());
        LinuxDisk.detach_loop(&rw).unwrap();
        assert!(LinuxDisk.find_loops(&cow).unwrap().is_empty());
    }

    #[test]
    fn loop_timings() {
        if !require_root() {
            return;
        }
        let d = TestDir::new();
        let img = d.join("image");
        sparse_file(&img, 64 * MIB, &[(0, b"x")]);
        let mut att = Vec::new();
        let mut det = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let dev = LinuxDisk.attach_loop(&img, true).unwrap();
            att.push(t.elapsed());
            let t = Instant::now();
            LinuxDisk.detach_loop(&dev).unwrap();
            det.push(t.elapsed());
        }
        att.sort();
        det.sort();
        eprintln!(
            "20 × attach/detach: attach median {:?} max {:?}; detach median {:?} max {:?}",
            att[10], att[19], det[10], det[19]
        );
    }

    #[test]
    fn find_loops_of_deleted_backing_file() {
        if !require_root() {
            return;
        }
        let d = TestDir::new();
        let img = d.join("origin");
        sparse_file(&img, MIB, &[]);
        let dev = LinuxDisk.attach_loop(&img, true).unwrap();
        std::fs::remove_file(&img).unwrap();
        let name = dev.file_name().unwrap();
        let raw =
            std::fs::read_to_string(Path::new(SYS_BLOCK).join(name).join("loop/backing_file"))
                .unwrap();
        assert!(raw.trim_end().ends_with(" (deleted)"), "{raw:?}");
        assert_eq!(LinuxDisk.find_loops(&img).unwrap(), vec![dev.clone()]);
        assert!(
            LinuxDisk
                .list_loops()
                .unwrap()
                .contains(&(dev.clone(), img.clone()))
        );
        LinuxDisk.detach_loop(&dev).unwrap();
        assert!(LinuxDisk.find_loops(&img).unwrap().is_empty());
    }

    #[test]
    fn attach_loop_refuses_a_path_the_kernel_reports_differently() {
        if !require_root() {
            return;
        }
        let d = TestDir::new();
        std::fs::create_dir(d.join("real")).unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
        let real = d.join("real/img");
        sparse_file(&real, MIB, &[]);
        let err = LinuxDisk
            .attach_loop(&d.join("link/img"), true)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::Io {
                    op: "attach loop to",
                    ..
                }
            ),
            "{err}"
        );
        eprintln!("{}", std::error::Error::source(&err).unwrap());
        assert!(
            LinuxDisk.find_loops(&real).unwrap().is_empty(),
            "undo detached it"
        );

        let err = LinuxDisk
            .attach_loop(&d.join("real/missing"), true)
            .unwrap_err();
        assert!(matches!(err, DiskError::Io { op: "open", .. }), "{err}");
    }

    /// An unbound loop device of our own, removed again on drop (a number
    /// no parallel test's attach will be handed, unlike `next_free`).
    struct SpareLoop {
        ctl: LoopControl,
        n: u32,
    }

    impl SpareLoop {
        fn new() -> Self {
            let ctl = LoopControl::open().unwrap();
            let base = 3000 + std::process::id() % 1000;
            let n = (base..base + 100)
                .find(|&n| ctl.add(n).is_ok())
                .expect("no spare loop number");
            Self { ctl, n }
        }

        fn path(&self) -> PathBuf {
            PathBuf::from(format!("/dev/loop{}", self.n))
        }
    }

    impl Drop for SpareLoop {
        fn drop(&mut self) {
            const LOOP_CTL_REMOVE: libc::c_ulong = 0x4C81;
            // SAFETY: LOOP_CTL_REMOVE takes the device number as a plain
            // integer argument and touches no memory of ours.
            unsafe {
                libc::ioctl(self.ctl.as_raw_fd(), LOOP_CTL_REMOVE, self.n as libc::c_int);
            }
        }
    }

    #[test]
    fn detach_of_unattached_or_absent_loop_is_ok() {
        if !require_root() {
            return;
        }
        // A device node that exists but is bound to nothing.
        let spare = SpareLoop::new();
        assert!(spare.path().exists());
        LinuxDisk.detach_loop(&spare.path()).unwrap();
        LinuxDisk.detach_loop(&spare.path()).unwrap();
        drop(spare);
        // No such device at all.
        LinuxDisk.detach_loop(Path::new("/dev/loop987654")).unwrap();
    }

    #[test]
    fn concurrent_attaches_get_distinct_loops() {
        if !require_root() {
            return;
        }
        let d = TestDir::new();
        let files: Vec<PathBuf> = (0..8)
            .map(|i| {
                let p = d.join(&format!("img{i}"));
                sparse_file(&p, MIB, &[]);
                p
            })
            .collect();
        let devs: Vec<PathBuf> = std::thread::scope(|s| {
            let hs: Vec<_> = files
                .iter()
                .map(|f| s.spawn(move || LinuxDisk.attach_loop(f, true)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        let mut uniq = devs.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), devs.len());
        for (f, dev) in files.iter().zip(&devs) {
            assert_eq!(LinuxDisk.find_loops(f).unwrap(), vec![dev.clone()]);
            LinuxDisk.detach_loop(dev).unwrap();
        }
    }

    #[test]
    fn dm_unavailable_is_a_clear_error() {
        if LinuxDisk.dm_available() {
            eprintln!("device-mapper is available here; see dm_snapshot_create_remove");
            return;
        }
        assert!(!Path::new(DM_CONTROL).exists() || DM::new().and_then(|d| d.version()).is_err());
        let err = LinuxDisk
            .dm_create_snapshot(
                "hearth-test-x",
                Path::new("/dev/loop0"),
                Path::new("/dev/loop1"),
            )
            .unwrap_err();
        let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        eprintln!("{msg}");
        assert!(matches!(err, DiskError::Dm { op: "create", .. }), "{msg}");
        assert!(msg.contains("not available"), "{msg}");
        assert!(LinuxDisk.list_dm("hearth-").unwrap().is_empty());
        LinuxDisk.dm_remove("hearth-test-x").unwrap();
    }

    #[test]
    fn dm_names_that_clash_with_dev_mapper_are_refused() {
        for name in ["control", "..", "a/b", ""] {
            let err = LinuxDisk.dm_remove(name).unwrap_err();
            assert!(
                matches!(
                    err,
                    DiskError::Dm {
                        op: "check name",
                        ..
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn dm_snapshot_create_remove() {
        if !require_root() {
            return;
        }
        if !LinuxDisk.dm_available() {
            eprintln!("device-mapper is not available here; see dm_unavailable_is_a_clear_error");
            return;
        }
        let mut d = TestDir::new();
        let name = format!("hearth-t{}", std::process::id());
        d.dm.push(name.clone());
        let img = d.join("image");
        sparse_file(&img, 16 * MIB, &[(0, b"origin data")]);
        let cow = d.join("cow");
        LinuxDisk.create_sparse(&cow, 16 * MIB).unwrap();
        let origin = LinuxDisk.attach_loop(&img, true).unwrap();
        let cow_dev = LinuxDisk.attach_loop(&cow, false).unwrap();

        let node = LinuxDisk
            .dm_create_snapshot(&name, &origin, &cow_dev)
            .unwrap();
        assert_eq!(node, Path::new("/dev/mapper").join(&name));
        assert!(LinuxDisk.list_dm("hearth-t").unwrap().contains(&name));
        let snap = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&node)
            .unwrap();
        let mut buf = [0u8; 11];
        snap.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"origin data");
        snap.write_all_at(b"vm wrote it", 0).unwrap();
        snap.sync_all().unwrap();
        drop(snap);
        let mut buf = [0u8; 11];
        File::open(&img)
            .unwrap()
            .read_exact_at(&mut buf, 0)
            .unwrap();
        assert_eq!(&buf, b"origin data", "the image is never modified");
        // Same name again: refused, and the first one is left alone.
        assert!(
            LinuxDisk
                .dm_create_snapshot(&name, &origin, &cow_dev)
                .is_err()
        );
        assert!(LinuxDisk.list_dm("hearth-t").unwrap().contains(&name));

        LinuxDisk.dm_remove(&name).unwrap();
        LinuxDisk.dm_remove(&name).unwrap();
        assert!(!LinuxDisk.list_dm("hearth-t").unwrap().contains(&name));
        assert!(std::fs::symlink_metadata(&node).is_err());
        LinuxDisk.detach_loop(&origin).unwrap();
        LinuxDisk.detach_loop(&cow_dev).unwrap();
    }
}
