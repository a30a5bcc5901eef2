//! The hypervisor module: one shared libvirt connection and what the driver
//! asks of libvirt. Every call blocks, so callers go through `Libvirt::call`,
//! which runs them on tokio's blocking pool.

pub mod agent;
pub mod conn;
pub mod domain_xml;
pub mod events;
pub mod host;
pub mod lifecycle;
pub mod stats;

pub use conn::{Libvirt, LibvirtError};
