//! `hearth-testvmm`: a **test stand-in for Firecracker** that serves
//! Firecracker v1.16's HTTP API but runs no guest.
//!
//! Why it exists: hearth's daemon drives Firecracker over its API socket,
//! and its integration, crash and benchmark tests need a VMM process to
//! drive. The machines those tests run on cannot boot a stock guest (their
//! `/dev/kvm` is a PVM nested hypervisor, or absent) and Firecracker is in
//! no package registry there. So this binary takes Firecracker's place: same
//! command line, same socket behaviour (it refuses a path that exists and
//! leaves the socket file behind when it exits), same endpoints, bodies,
//! validation, status codes and fault messages, copied from Firecracker's
//! source (`src/firecracker/src/api_server/`, `src/vmm/src/vmm_config/`,
//! `src/vmm/src/rpc_interface.rs`). It touches the host the way Firecracker
//! does where the daemon can observe it: it opens the kernel, initrd,
//! drives, log and metrics files it is given, and attaches the taps it is
//! given with `TUNSETIFF`. It creates no VM; after InstanceStart it prints a
//! few console lines, and after SendCtrlAltDel it exits 0 as Firecracker
//! does when its guest reboots. Faults can be injected through the
//! environment ([`faults`]).
//!
//! With an `ip=` kernel argument and a network interface, the stand-in
//! also plays the guest's network stack on the interface's tap
//! ([`guestnet`]): ARP, ping, and TCP/UDP echo services tests drive
//! through hearth's NAT and port forwards.
//!
//! The crate also makes the kernel tests and demos boot: [`test_guest_elf`]
//! is a tiny x86-64 ELF that real Firecracker boots, so the same tests run
//! against either VMM.
//!
//! Layout: [`cli`] (process start) → [`server`] (HTTP) → [`api`] (request
//! parsing, responses) → [`vmm`] (the pre-boot and runtime rules), with
//! [`config`] (request bodies), [`fclog`] (logger, metrics), [`tap`] and
//! [`guestnet`].

pub mod api;
pub mod cli;
pub mod config;
pub mod faults;
pub mod fclog;
pub mod guest;
pub mod guestnet;
pub mod server;
pub mod tap;
pub mod vmm;

pub use guest::test_guest_elf;

/// The Firecracker release whose API this serves.
pub const FIRECRACKER_VERSION: &str = "1.16.1";

/// What `GET /` and `GET /version` report as the VMM version.
pub const VMM_VERSION: &str = "1.16.1-hearth-testvmm";
