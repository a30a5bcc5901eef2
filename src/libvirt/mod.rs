//! The hypervisor module: the only code that talks to libvirt (the `virt`
//! crate). Everything else gets plain Rust types: names, paths, XML strings
//! and the structs defined here.
//!
//! - [`conn`]: the one shared connection ([`Libvirt`]), reopened when lost;
//!   `Libvirt::call` runs blocking work on tokio's blocking pool.
//! - [`domain`]: domains by name (define, start, ACPI shutdown, destroy,
//!   remove, status, usage samples, host CPU).
//! - [`domain_xml`]: the pure renderer of domain XML from a typed spec.
//! - [`events`] and [`lifecycle`]: domain lifecycle events and what they
//!   mean for a task; [`stats`]: usage arithmetic.
//! - [`host`]: versions and capabilities for the fingerprint.
//! - [`network`]: networks by bridge, DHCP leases and reservations.
//! - [`shares`]: what the host offers shared directories (virtiofs, the
//!   libvirt version, the user QEMU runs as).
//! - [`storage`]: directory pools and volumes ([`storage::Pool`],
//!   [`storage::Volume`]).
//! - [`xml`]: the one XML writer and reader (quick-xml).
//! - [`error`]: [`VirtError`], the libvirt error our errors keep as source.
//! - `ffi`: the raw calls `virt` lacks, the only `unsafe` in the crate.

pub mod agent;
pub mod conn;
pub mod dhcp;
pub mod domain;
pub mod domain_xml;
pub mod error;
pub mod events;
#[allow(unsafe_code)]
pub(crate) mod ffi;
pub mod host;
pub mod lifecycle;
pub mod network;
pub mod shares;
pub mod stats;
pub mod storage;
pub mod xml;

pub use conn::{Libvirt, LibvirtError};
pub use error::VirtError;
