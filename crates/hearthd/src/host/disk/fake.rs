//! A hand-written fake of [`DiskHost`]: an in-memory model of the kernel's
//! loop and device-mapper tables that records every call and can be told to
//! fail at any operation.
//!
//! Files are real: copies, links and sparse files are made in the (temp)
//! directories the test gives, so later steps — and the test — see them.
//! Kernel objects are modelled, with the kernel's rules where lifecycle code
//! could get them wrong: attaching needs an existing file; a loop keeps its
//! backing path after the file is deleted (as `find_loops` on the real
//! kernel does); loop numbers are reused lowest-first; a snapshot needs its
//! origin and a writable cow loop to be attached; detaching a loop a dm
//! device still holds reports busy and leaves it to the kernel's autoclear,
//! which frees it when the dm device goes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{CopyKind, DiskError, DiskHost};

#[derive(Debug)]
struct FakeLoop {
    backing: PathBuf,
    read_only: bool,
    /// Detach was asked while a dm device held the loop.
    autoclear: bool,
}

#[derive(Debug)]
struct Model {
    dm_available: bool,
    copy_kind: CopyKind,
    loops: BTreeMap<u32, FakeLoop>,
    dm: BTreeMap<String, (PathBuf, PathBuf)>,
    busy: BTreeSet<String>,
    calls: Vec<String>,
    fail_at: Option<String>,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            dm_available: true,
            copy_kind: CopyKind::Sparse,
            loops: BTreeMap::new(),
            dm: BTreeMap::new(),
            busy: BTreeSet::new(),
            calls: Vec::new(),
            fail_at: None,
        }
    }
}

impl Model {
    /// Records a call; fails it if told to.
    fn call(&mut self, op: &'static str, args: String) -> Result<(), io::Error> {
        self.calls.push(if args.is_empty() {
            op.to_owned()
        } else {
            format!("{op} {args}")
        });
        if self.fail_at.as_deref() == Some(op) {
            return Err(io::Error::other(format!("fake: injected failure at {op}")));
        }
        Ok(())
    }

    fn loop_num(dev: &Path) -> Option<u32> {
        dev.to_str()?.strip_prefix("/dev/loop")?.parse().ok()
    }

    fn held_by_dm(&self, dev: &Path) -> bool {
        self.dm.values().any(|(o, c)| o == dev || c == dev)
    }
}

/// A fake disk host. Clones share one model.
#[derive(Debug, Clone, Default)]
pub struct FakeDisk {
    inner: Arc<Mutex<Model>>,
}

impl FakeDisk {
    /// No loops, no dm devices, device-mapper available, copies reported
    /// as [`CopyKind::Sparse`].
    pub fn new() -> Self {
        Self::default()
    }

    fn m(&self) -> MutexGuard<'_, Model> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, as `op args…` (paths displayed, `ro`/`rw` for
    /// loops), except `dm_available`.
    pub fn calls(&self) -> Vec<String> {
        self.m().calls.clone()
    }

    /// Makes every call of `op` (a [`DiskHost`] method name, e.g.
    /// `"attach_loop"`) fail from now on; `None` stops failing.
    pub fn fail_at(&self, op: Option<&str>) {
        self.m().fail_at = op.map(str::to_owned);
    }

    /// Whether device-mapper exists on this fake host.
    pub fn set_dm_available(&self, on: bool) {
        self.m().dm_available = on;
    }

    /// Which kind `copy_image` reports (the file is copied either way).
    pub fn set_copy_kind(&self, kind: CopyKind) {
        self.m().copy_kind = kind;
    }

    /// Makes a loop device (`/dev/loopN`) or dm name stay busy: detach or
    /// remove reports [`DiskError::Busy`] and leaves it in place.
    pub fn set_busy(&self, target: &str, on: bool) {
        let mut m = self.m();
        if on {
            m.busy.insert(target.to_owned());
        } else {
            m.busy.remove(target);
        }
    }

    /// Attached loops: `(device, backing file, read-only)`.
    pub fn loops(&self) -> Vec<(PathBuf, PathBuf, bool)> {
        self.m()
            .loops
            .iter()
            .map(|(n, l)| (loop_path(*n), l.backing.clone(), l.read_only))
            .collect()
    }

    /// dm devices: `(name, origin, cow)`.
    pub fn dm_devices(&self) -> Vec<(String, PathBuf, PathBuf)> {
        self.m()
            .dm
            .iter()
            .map(|(n, (o, c))| (n.clone(), o.clone(), c.clone()))
            .collect()
    }

    /// Puts a loop in the model as if attached by someone else (an orphan
    /// from an earlier daemon, say); returns its device.
    pub fn add_orphan_loop(&self, backing: &Path, read_only: bool) -> PathBuf {
        let mut m = self.m();
        let n = free_loop(&m);
        m.loops.insert(
            n,
            FakeLoop {
                backing: backing.to_path_buf(),
                read_only,
                autoclear: false,
            },
        );
        loop_path(n)
    }

    /// Puts a dm device in the model as if made by someone else.
    pub fn add_orphan_dm(&self, name: &str, origin: &Path, cow: &Path) {
        self.m()
            .dm
            .insert(name.to_owned(), (origin.to_path_buf(), cow.to_path_buf()));
    }
}

fn loop_path(n: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{n}"))
}

/// The lowest unused loop number, as LOOP_CTL_GET_FREE hands them out.
fn free_loop(m: &Model) -> u32 {
    (0..).find(|n| !m.loops.contains_key(n)).unwrap_or(u32::MAX)
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> DiskError {
    DiskError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn dm_err(op: &'static str, name: &str, msg: String) -> DiskError {
    DiskError::Dm {
        op,
        name: name.to_owned(),
        source: msg.into(),
    }
}

/// Copies `src` to a new `dst`, removing `dst` on failure.
fn copy_file(src: &Path, dst: &Path) -> Result<(), DiskError> {
    let mut from = std::fs::File::open(src).map_err(|e| io_err("open", src, e))?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| io_err("create", dst, e))?;
    if let Err(e) = io::copy(&mut from, &mut to) {
        let _ = std::fs::remove_file(dst);
        return Err(io_err("copy to", dst, e));
    }
    Ok(())
}

impl DiskHost for FakeDisk {
    fn dm_available(&self) -> bool {
        self.m().dm_available
    }

    fn copy_image(&self, src: &Path, dst: &Path) -> Result<CopyKind, DiskError> {
        let kind = {
            let mut m = self.m();
            m.call("copy_image", format!("{} {}", src.display(), dst.display()))
                .map_err(|e| io_err("copy to", dst, e))?;
            m.copy_kind
        };
        copy_file(src, dst)?;
        Ok(kind)
    }

    fn link_or_copy(&self, src: &Path, dst: &Path) -> Result<CopyKind, DiskError> {
        self.m()
            .call(
                "link_or_copy",
                format!("{} {}", src.display(), dst.display()),
            )
            .map_err(|e| io_err("hard-link", dst, e))?;
        match std::fs::hard_link(src, dst) {
            Ok(()) => Ok(CopyKind::Hardlink),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                copy_file(src, dst)?;
                Ok(self.m().copy_kind)
            }
            Err(e) => Err(io_err("hard-link", dst, e)),
        }
    }

    fn create_sparse(&self, path: &Path, size: u64) -> Result<(), DiskError> {
        self.m()
            .call("create_sparse", format!("{} {size}", path.display()))
            .map_err(|e| io_err("create", path, e))?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| io_err("create", path, e))?;
        if let Err(e) = f.set_len(size) {
            let _ = std::fs::remove_file(path);
            return Err(io_err("set length of", path, e));
        }
        Ok(())
    }

    fn attach_loop(&self, file: &Path, read_only: bool) -> Result<PathBuf, DiskError> {
        let mut m = self.m();
        let mode = if read_only { "ro" } else { "rw" };
        m.call("attach_loop", format!("{} {mode}", file.display()))
            .map_err(|e| DiskError::Loop {
                op: "attach",
                target: file.display().to_string(),
                source: e,
            })?;
        if !file.is_absolute() {
            return Err(io_err(
                "attach loop to",
                file,
                io::Error::new(ErrorKind::InvalidInput, "path is not absolute"),
            ));
        }
        if !file.is_file() {
            return Err(io_err("open", file, io::Error::from(ErrorKind::NotFound)));
        }
        let n = free_loop(&m);
        m.loops.insert(
            n,
            FakeLoop {
                backing: file.to_path_buf(),
                read_only,
                autoclear: false,
            },
        );
        Ok(loop_path(n))
    }

    fn find_loops(&self, file: &Path) -> Result<Vec<PathBuf>, DiskError> {
        let mut m = self.m();
        m.call("find_loops", file.display().to_string())
            .map_err(|e| io_err("list", Path::new("/sys/block"), e))?;
        Ok(m.loops
            .iter()
            .filter(|(_, l)| l.backing == file)
            .map(|(n, _)| loop_path(*n))
            .collect())
    }

    fn list_loops(&self) -> Result<Vec<(PathBuf, PathBuf)>, DiskError> {
        let mut m = self.m();
        m.call("list_loops", String::new())
            .map_err(|e| io_err("list", Path::new("/sys/block"), e))?;
        Ok(m.loops
            .iter()
            .map(|(n, l)| (loop_path(*n), l.backing.clone()))
            .collect())
    }

    fn detach_loop(&self, dev: &Path) -> Result<(), DiskError> {
        let mut m = self.m();
        m.call("detach_loop", dev.display().to_string())
            .map_err(|e| DiskError::Loop {
                op: "detach",
                target: dev.display().to_string(),
                source: e,
            })?;
        let Some(n) = Model::loop_num(dev) else {
            return Ok(());
        };
        if !m.loops.contains_key(&n) {
            return Ok(());
        }
        let busy = DiskError::Busy {
            what: "loop",
            target: dev.display().to_string(),
            tries: 10,
        };
        if m.busy.contains(&dev.display().to_string()) {
            return Err(busy);
        }
        if m.held_by_dm(dev) {
            if let Some(l) = m.loops.get_mut(&n) {
                l.autoclear = true;
            }
            return Err(busy);
        }
        m.loops.remove(&n);
        Ok(())
    }

    fn dm_create_snapshot(
        &self,
        name: &str,
        origin: &Path,
        cow: &Path,
    ) -> Result<PathBuf, DiskError> {
        let mut m = self.m();
        m.call(
            "dm_create_snapshot",
            format!("{name} {} {}", origin.display(), cow.display()),
        )
        .map_err(|e| dm_err("create", name, e.to_string()))?;
        if !m.dm_available {
            return Err(dm_err(
                "create",
                name,
                "device-mapper is not available on this host".into(),
            ));
        }
        if name.is_empty() || name.len() > 127 || name.contains('/') || !name.is_ascii() {
            return Err(dm_err("check name", name, "invalid dm name".into()));
        }
        if m.dm.contains_key(name) {
            return Err(dm_err("create", name, "device exists (EBUSY)".into()));
        }
        let attached = |dev: &Path| {
            Model::loop_num(dev)
                .and_then(|n| m.loops.get(&n))
                .filter(|l| !l.autoclear)
        };
        if attached(origin).is_none() {
            return Err(io_err(
                "stat",
                origin,
                io::Error::from_raw_os_error(libc::ENXIO),
            ));
        }
        match attached(cow) {
            None => {
                return Err(io_err(
                    "stat",
                    cow,
                    io::Error::from_raw_os_error(libc::ENXIO),
                ));
            }
            Some(l) if l.read_only => {
                return Err(dm_err(
                    "load snapshot table for",
                    name,
                    format!("cow device {} is read-only (EACCES)", cow.display()),
                ));
            }
            Some(_) => {}
        }
        m.dm.insert(name.to_owned(), (origin.to_path_buf(), cow.to_path_buf()));
        Ok(Path::new("/dev/mapper").join(name))
    }

    fn dm_remove(&self, name: &str) -> Result<(), DiskError> {
        let mut m = self.m();
        m.call("dm_remove", name.to_owned())
            .map_err(|e| dm_err("remove", name, e.to_string()))?;
        if m.busy.contains(name) {
            return Err(DiskError::Busy {
                what: "dm",
                target: name.to_owned(),
                tries: 5,
            });
        }
        if m.dm.remove(name).is_some() {
            // The kernel frees loops whose detach was deferred (autoclear)
            // once their last holder is gone.
            let released: Vec<u32> = m
                .loops
                .iter()
                .filter(|(n, l)| l.autoclear && !m.held_by_dm(&loop_path(**n)))
                .map(|(n, _)| *n)
                .collect();
            for n in released {
                m.loops.remove(&n);
            }
        }
        Ok(())
    }

    fn list_dm(&self, prefix: &str) -> Result<Vec<String>, DiskError> {
        let mut m = self.m();
        m.call("list_dm", prefix.to_owned())
            .map_err(|e| dm_err("list", prefix, e.to_string()))?;
        if !m.dm_available {
            return Ok(Vec::new());
        }
        Ok(m.dm
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .unwrap()
    }

    #[test]
    fn copies_real_files_and_records_calls() {
        let d = tmp();
        let disk = FakeDisk::new();
        let src = d.path().join("img");
        std::fs::write(&src, b"image").unwrap();
        let dst = d.path().join("copy");
        assert_eq!(disk.copy_image(&src, &dst).unwrap(), CopyKind::Sparse);
        assert_eq!(std::fs::read(&dst).unwrap(), b"image");
        assert!(disk.copy_image(&src, &dst).is_err(), "dst exists");
        let link = d.path().join("link");
        assert_eq!(disk.link_or_copy(&src, &link).unwrap(), CopyKind::Hardlink);
        disk.create_sparse(&d.path().join("cow"), 4096).unwrap();
        assert_eq!(std::fs::metadata(d.path().join("cow")).unwrap().len(), 4096);
        assert_eq!(disk.calls().len(), 4);
        assert!(disk.calls()[0].starts_with("copy_image "));
    }

    #[test]
    fn fail_at_any_op() {
        let d = tmp();
        let disk = FakeDisk::new();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        disk.fail_at(Some("attach_loop"));
        assert!(matches!(
            disk.attach_loop(&f, true),
            Err(DiskError::Loop { .. })
        ));
        assert!(disk.loops().is_empty());
        disk.fail_at(Some("copy_image"));
        let dst = d.path().join("dst");
        assert!(disk.copy_image(&f, &dst).is_err());
        assert!(!dst.exists(), "a failed copy leaves nothing");
        disk.fail_at(None);
        assert!(disk.attach_loop(&f, true).is_ok());
    }

    #[test]
    fn loops_and_snapshot_follow_kernel_rules() {
        let d = tmp();
        let disk = FakeDisk::new();
        let img = d.path().join("img");
        let cow = d.path().join("cow");
        std::fs::write(&img, b"x").unwrap();
        disk.create_sparse(&cow, 4096).unwrap();
        assert!(disk.attach_loop(&d.path().join("missing"), true).is_err());
        let lo = disk.attach_loop(&img, true).unwrap();
        let lc = disk.attach_loop(&cow, false).unwrap();
        assert_eq!(lo, Path::new("/dev/loop0"));
        assert_eq!(disk.find_loops(&img).unwrap(), vec![lo.clone()]);
        // A read-only cow is refused.
        assert!(disk.dm_create_snapshot("hearth-a", &lc, &lo).is_err());
        let node = disk.dm_create_snapshot("hearth-a", &lo, &lc).unwrap();
        assert_eq!(node, Path::new("/dev/mapper/hearth-a"));
        assert!(disk.dm_create_snapshot("hearth-a", &lo, &lc).is_err());
        assert_eq!(disk.list_dm("hearth-").unwrap(), vec!["hearth-a"]);
        // Held by dm: busy, then freed by the kernel when dm goes.
        assert!(matches!(disk.detach_loop(&lo), Err(DiskError::Busy { .. })));
        disk.dm_remove("hearth-a").unwrap();
        disk.dm_remove("hearth-a").unwrap();
        assert_eq!(disk.find_loops(&img).unwrap(), Vec::<PathBuf>::new());
        disk.detach_loop(&lc).unwrap();
        disk.detach_loop(&lc).unwrap();
        assert!(disk.loops().is_empty());
        // Numbers are reused lowest-first.
        assert_eq!(disk.attach_loop(&img, true).unwrap(), lo);
    }

    #[test]
    fn busy_and_unavailable() {
        let d = tmp();
        let disk = FakeDisk::new();
        let img = d.path().join("img");
        std::fs::write(&img, b"x").unwrap();
        let lo = disk.attach_loop(&img, false).unwrap();
        disk.set_busy(&lo.display().to_string(), true);
        assert!(matches!(disk.detach_loop(&lo), Err(DiskError::Busy { .. })));
        disk.set_busy(&lo.display().to_string(), false);
        disk.detach_loop(&lo).unwrap();

        disk.set_dm_available(false);
        assert!(!disk.dm_available());
        let lo = disk.attach_loop(&img, false).unwrap();
        assert!(matches!(
            disk.dm_create_snapshot("hearth-b", &lo, &lo),
            Err(DiskError::Dm { .. })
        ));
        assert!(disk.list_dm("").unwrap().is_empty());
        disk.dm_remove("hearth-b").unwrap();
    }
}
