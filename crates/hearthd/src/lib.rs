//! hearthd: the daemon that owns every Firecracker microVM on one host.
//!
//! The modules follow `DESIGN.md` ("Shape"): `api` parses HTTP and calls one
//! `lifecycle` method; `lifecycle` runs each operation as a journal of steps
//! under a per-VM lock, writing each step's output to the `store` before
//! the next step; `host` and `vmm` are narrow traits over the kernel and
//! Firecracker, so the lifecycle runs against in-memory fakes in unit tests
//! and against the real kernel in integration tests.

pub mod api;
pub mod capability;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod failpoint;
pub mod host;
pub mod lifecycle;
pub mod metrics;
pub mod poller;
pub mod store;
pub mod sweep;
pub mod vmm;
