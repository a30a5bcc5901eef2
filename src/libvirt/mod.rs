//! The hypervisor module: one shared libvirt connection and what the driver
//! asks of libvirt. Every call blocks, so callers go through `Libvirt::call`,
//! which runs them on tokio's blocking pool.

pub mod conn;
pub mod domain;
pub mod domain_xml;
pub mod error;
pub mod events;
#[allow(unsafe_code)]
pub(crate) mod ffi;
pub mod host;
pub mod lifecycle;
pub mod network;
pub mod stats;
pub mod storage;
pub mod xml;

pub use conn::{Libvirt, LibvirtError};
pub use error::VirtError;
