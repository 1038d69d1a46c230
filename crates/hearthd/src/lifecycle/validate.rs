//! Create-request validation: everything is checked before anything is
//! written (DESIGN.md, invariant 7), and each problem names its field.

use std::path::Path;

use hearth_api::{CreateVmRequest, VmSpec, validate_name};

use super::LifecycleError;
use crate::capability::Capability;

/// Firecracker's vCPU limit.
pub const MAX_VCPUS: u8 = 32;
/// The smallest memory hearth accepts, in MiB.
pub const MIN_MEMORY_MIB: u32 = 128;
/// The largest, in MiB (1 TiB): a typo guard, not a host check.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// Firecracker's kernel command line capacity on x86-64.
pub const MAX_KERNEL_ARGS: usize = 2048;

fn invalid(field: &'static str, reason: impl Into<String>) -> LifecycleError {
    LifecycleError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn readable_file(field: &'static str, path: &Path) -> Result<(), LifecycleError> {
    if !path.is_absolute() {
        return Err(invalid(
            field,
            format!("{} is not an absolute path", path.display()),
        ));
    }
    let meta =
        std::fs::metadata(path).map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(invalid(
            field,
            format!("{} is not a regular file", path.display()),
        ));
    }
    std::fs::File::open(path)
        .map_err(|e| invalid(field, format!("{} is not readable: {e}", path.display())))?;
    Ok(())
}

/// Checks a create request; returns the spec to store and its parsed
/// capabilities (for the cross-VM conflict check, which needs the store).
pub fn create_request(
    req: &CreateVmRequest,
) -> Result<(VmSpec, Vec<Box<dyn Capability>>), LifecycleError> {
    validate_name(&req.name).map_err(|r| invalid("name", r))?;
    if let Some(secs) = req.ttl_secs {
        crate::poller::ttl_duration(secs).map_err(|r| invalid("ttl_secs", r))?;
    }
    let s = &req.spec;
    if s.vcpus == 0 || s.vcpus > MAX_VCPUS || (s.vcpus > 1 && !s.vcpus.is_multiple_of(2)) {
        return Err(invalid(
            "vcpus",
            format!(
                "{} is not allowed: use 1 or an even number up to {MAX_VCPUS}",
                s.vcpus
            ),
        ));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&s.memory_mib) {
        return Err(invalid(
            "memory_mib",
            format!(
                "{} MiB is out of range ({MIN_MEMORY_MIB} to {MAX_MEMORY_MIB})",
                s.memory_mib
            ),
        ));
    }
    readable_file("kernel", &s.kernel)?;
    readable_file("rootfs", &s.rootfs)?;
    if let Some(initrd) = &s.initrd {
        readable_file("initrd", initrd)?;
    }
    if s.kernel_args.len() > MAX_KERNEL_ARGS {
        return Err(invalid(
            "kernel_args",
            format!(
                "{} bytes is longer than {MAX_KERNEL_ARGS}",
                s.kernel_args.len()
            ),
        ));
    }
    if s.kernel_args.chars().any(|c| c.is_control()) {
        return Err(invalid("kernel_args", "control characters are not allowed"));
    }
    if s.kernel_args
        .split_whitespace()
        .any(|a| a.starts_with("ip="))
    {
        return Err(invalid(
            "kernel_args",
            "ip= is set by hearth from the VM's tap address",
        ));
    }
    let caps = crate::capability::parse_all(&s.capabilities)
        .map_err(|reason| invalid("capabilities", reason))?;
    Ok((s.clone(), caps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(dir: &Path) -> CreateVmRequest {
        let k = dir.join("vmlinux");
        let r = dir.join("rootfs.ext4");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&r, b"r").unwrap();
        CreateVmRequest {
            name: "vm".into(),
            spec: VmSpec {
                vcpus: 1,
                memory_mib: 128,
                kernel: k,
                rootfs: r,
                initrd: None,
                kernel_args: hearth_api::DEFAULT_KERNEL_ARGS.into(),
                capabilities: vec![],
            },
            ttl_secs: None,
        }
    }

    fn field_of(r: Result<(VmSpec, Vec<Box<dyn Capability>>), LifecycleError>) -> &'static str {
        match r {
            Err(LifecycleError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let d = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .unwrap();
        let good = req(d.path());
        assert!(create_request(&good).is_ok());
        for (vcpus, ok) in [
            (0, false),
            (1, true),
            (2, true),
            (3, false),
            (32, true),
            (33, false),
            (34, false),
        ] {
            let mut r = good.clone();
            r.spec.vcpus = vcpus;
            assert_eq!(create_request(&r).is_ok(), ok, "vcpus {vcpus}");
        }
        let mut r = good.clone();
        r.spec.memory_mib = 1;
        assert_eq!(field_of(create_request(&r)), "memory_mib");
        let mut r = good.clone();
        r.name = "Bad_Name".into();
        assert_eq!(field_of(create_request(&r)), "name");
        let mut r = good.clone();
        r.spec.kernel = d.path().join("missing");
        assert_eq!(field_of(create_request(&r)), "kernel");
        let mut r = good.clone();
        r.spec.rootfs = d.path().to_owned();
        assert_eq!(field_of(create_request(&r)), "rootfs");
        let mut r = good.clone();
        r.spec.rootfs = "relative.ext4".into();
        assert_eq!(field_of(create_request(&r)), "rootfs");
        let mut r = good.clone();
        r.spec.initrd = Some(d.path().join("nope"));
        assert_eq!(field_of(create_request(&r)), "initrd");
        let mut r = good.clone();
        r.spec.kernel_args = "a\nb".into();
        assert_eq!(field_of(create_request(&r)), "kernel_args");
        let mut r = good.clone();
        r.spec.kernel_args = "x".repeat(MAX_KERNEL_ARGS + 1);
        assert_eq!(field_of(create_request(&r)), "kernel_args");
        let mut r = good.clone();
        r.spec.capabilities = vec!["bogus".into()];
        assert_eq!(field_of(create_request(&r)), "capabilities");
        let mut r = good.clone();
        r.spec.kernel_args = "console=ttyS0 ip=1.2.3.4".into();
        assert_eq!(field_of(create_request(&r)), "kernel_args");
        for (ttl, ok) in [(0, false), (1, true), (u64::MAX, false)] {
            let mut r = good.clone();
            r.ttl_secs = Some(ttl);
            match create_request(&r) {
                Ok(_) => assert!(ok, "ttl {ttl}"),
                Err(e) => {
                    assert!(!ok, "ttl {ttl}: {e}");
                    assert_eq!(field_of(Err(e)), "ttl_secs");
                }
            }
        }
        let mut r = good;
        r.spec.capabilities = vec!["nat".into(), "port-forward=8080:80".into()];
        assert_eq!(create_request(&r).unwrap().1.len(), 2);
    }
}
