//! For tests of the real host implementations: run a closure inside a
//! fresh network namespace named `hearth-u-…`, deleted afterwards even if
//! the closure panics. Fails loudly when not root, unless
//! `HEARTH_SKIP_PRIVILEGED=1` opts out (then the closure does not run and
//! `None` is returned).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsFd;
use std::process::Command;

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs `f` on a thread that has entered a new namespace `hearth-u-<tag>-<pid>`
/// (with `lo` up). Returns `None` if privileged tests were skipped by opt-out.
pub fn in_netns<T: Send + 'static>(tag: &str, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    if !rustix::process::geteuid().is_root() {
        if std::env::var("HEARTH_SKIP_PRIVILEGED").as_deref() == Ok("1") {
            eprintln!("SKIPPED: privileged test, not root, HEARTH_SKIP_PRIVILEGED=1");
            return None;
        }
        panic!(
            "this test needs root (network namespaces); run as root or set HEARTH_SKIP_PRIVILEGED=1"
        );
    }
    let name = format!("hearth-u-{tag}-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    let out = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip netns add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ns = Ns(name.clone());
    let out = Command::new("ip")
        .args(["-n", &name, "link", "set", "lo", "up"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let path = format!("/run/netns/{name}");
    let handle = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        f()
    });
    let result = handle.join();
    drop(ns);
    match result {
        Ok(v) => Some(v),
        Err(p) => std::panic::resume_unwind(p),
    }
}
