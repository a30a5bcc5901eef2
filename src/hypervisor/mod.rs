//! The one seam between the orchestrator and the hypervisor, and its
//! libvirt backend (which calls only `crate::libvirt`, where every libvirt
//! call lives); tests wrap that implementation to inject faults the
//! real thing cannot produce. Methods block: call them off the async
//! runtime's threads.

pub mod libvirt;

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::time::Duration;

use crate::config::plugin::{CephPool, DirectoryPool};
use crate::guest_agent::GuestAgent;
use crate::libvirt::domain_xml::{DomainSpec, DomainType};
use crate::libvirt::events::LifecycleEvent;
use crate::libvirt::shares::ShareSupport;
use crate::libvirt::stats::MemorySample;
use crate::libvirt::LibvirtError;
use crate::nomad::driver_state::CreatedVolume;
use crate::storage::copy::CopyProgress;
use crate::storage::images::{ImageFile, ImageFormat};
use crate::storage::StorageError;

/// Facts about the host a start needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    pub cpus: u32,
    pub mhz_per_core: u32,
    /// The hypervisor offers KVM domains.
    pub kvm_offered: bool,
}

/// What a new volume holds. `sparse = false` allocates a raw volume's
/// whole file (qcow2: its metadata), as the disk's `sparse` asks.
#[derive(Debug, Clone, Copy)]
pub enum VolumeContent<'a> {
    /// Zeroes, `size` bytes.
    Empty {
        format: ImageFormat,
        size: u64,
        sparse: bool,
    },
    /// A copy of a host image, converted to `format`, grown to `capacity`.
    Copy {
        image: &'a ImageFile,
        image_format: ImageFormat,
        format: ImageFormat,
        capacity: Option<u64>,
        sparse: bool,
        /// The size checked before the start: an image bigger now (it was
        /// rewritten since) is refused, and no more is uploaded.
        cap: Option<u64>,
        /// Counts the bytes copied, for progress reports.
        progress: Option<&'a CopyProgress>,
    },
    /// A clone of the operator's volume `source` in the same pool (checked
    /// with [`Hypervisor::source_volume`]), in `format`, grown to
    /// `capacity`; the source is only read.
    Clone {
        source: &'a str,
        format: ImageFormat,
        capacity: Option<u64>,
        sparse: bool,
    },
    /// A qcow2 overlay whose backing file is the operator's volume `source`
    /// in the same pool; the source is never written.
    VolumeOverlay {
        source: &'a str,
        capacity: Option<u64>,
    },
    /// A qcow2 overlay on a shared parent made from the image.
    Overlay {
        image: &'a ImageFile,
        image_format: ImageFormat,
        capacity: Option<u64>,
        /// As for [`VolumeContent::Copy`], for the parent.
        cap: Option<u64>,
        /// Counts the bytes of the parent's upload (none when it exists).
        progress: Option<&'a CopyProgress>,
    },
    /// These bytes (the cloud-init seed).
    Bytes { data: &'a [u8], format: ImageFormat },
}

/// What a new RBD volume (a disk in a Ceph pool) holds. RBD images are
/// raw and always sparse.
#[derive(Debug, Clone, Copy)]
pub enum RbdContent<'a> {
    /// Zeroes, `size` bytes.
    Empty { size: u64 },
    /// The image converted to raw, written through librbd; the volume is
    /// `size` bytes (at least the image's virtual size, checked before).
    Image {
        image: &'a ImageFile,
        image_format: ImageFormat,
        size: u64,
    },
    /// A copy-on-write RBD clone of volume `parent` in the same pool (a
    /// base the start made just before, or an operator's volume checked
    /// with [`Hypervisor::rbd_source_volume`]), grown to `size`.
    Clone { parent: &'a str, size: u64 },
    /// A chained disk from an image: an RBD clone of the shared parent
    /// `parent` (named from the image's key, see
    /// [`crate::libvirt::storage::rbd::shared_parent_name`]), uploaded first
    /// when missing, from a private copy whose digest must match `parent`.
    Shared {
        image: &'a ImageFile,
        image_format: ImageFormat,
        parent: &'a str,
        size: u64,
    },
    /// A full copy of the operator's volume `source` (checked with
    /// [`Hypervisor::rbd_source_volume`]), grown to `size`.
    Copy { source: &'a str, size: u64 },
}

/// What [`Hypervisor::create_rbd_volume`] made; after
/// [`RbdMade::ParentUnfinished`], make the disk as [`RbdContent::Image`].
pub use crate::libvirt::storage::rbd::RbdMade;

/// A volume the driver made for a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedDisk {
    pub path: PathBuf,
    /// For an overlay: its backing file and that file's format, so the
    /// domain XML can spell out the whole chain.
    pub backing: Option<(PathBuf, ImageFormat)>,
}

/// What a checked `source.volume` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceVolumeFacts {
    pub format: ImageFormat,
    pub capacity: u64,
}

/// A domain's state in libvirt's raw codes (`VIR_DOMAIN_*` and the
/// matching reason), interpreted by `libvirt::lifecycle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainState {
    pub state: u32,
    pub reason: i32,
}

/// One reading of a domain's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainCounters {
    pub cpu_time_ns: u64,
    pub vcpus: u32,
    pub memory: MemorySample,
}

/// Errors from the hypervisor, classified by their source.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    DomainXml(#[from] crate::libvirt::domain_xml::DomainXmlError),
}

/// What the orchestrator asks of a hypervisor.
pub trait Hypervisor: Send + Sync + 'static {
    /// Cheap liveness check (health between full fingerprints).
    fn ping(&self) -> Result<(), HypervisorError>;
    fn host_facts(&self) -> Result<HostFacts, HypervisorError>;
    /// What shared directories can use for domains of this type, arch and
    /// machine (virtiofs or not, the libvirt version, QEMU's uid/gid).
    fn share_support(
        &self,
        domain_type: DomainType,
        arch: &str,
        machine: &str,
    ) -> Result<ShareSupport, HypervisorError>;

    /// Makes sure the pool exists and is started.
    fn prepare_pool(&self, pool: &DirectoryPool) -> Result<(), HypervisorError>;
    /// Makes sure the Ceph pool's secret and libvirt `rbd` pool exist and
    /// the pool is started; returns what a domain's network disk needs. An
    /// unreachable cluster or refused key is a clear error (within seconds
    /// when no monitor answers).
    fn prepare_ceph_pool(
        &self,
        pool: &CephPool,
    ) -> Result<crate::libvirt::storage::rbd::RbdAccess, HypervisorError>;
    /// Checks an RBD image a job names as `source.volume` in a prepared Ceph
    /// pool (see [`crate::libvirt::storage::rbd::rbd_source_volume`]);
    /// returns its capacity.
    fn rbd_source_volume(&self, pool: &CephPool, name: &str) -> Result<u64, HypervisorError>;
    /// Creates RBD volume `name` in the prepared Ceph pool.
    fn create_rbd_volume(
        &self,
        pool: &CephPool,
        name: &str,
        content: RbdContent<'_>,
    ) -> Result<RbdMade, HypervisorError>;
    /// Bytes free in a prepared pool (libvirt's pool info, after a refresh).
    fn pool_available(&self, pool: &str) -> Result<u64, HypervisorError>;
    /// Whether libvirt has network filter `name`; `None` on libvirt's test
    /// driver only (see [`crate::libvirt::network::nwfilter_exists`]).
    fn nwfilter_exists(&self, name: &str) -> Result<Option<bool>, HypervisorError>;
    /// Creates `name` in `pool` and returns its path (and backing file).
    fn create_volume(
        &self,
        pool: &str,
        name: &str,
        content: VolumeContent<'_>,
    ) -> Result<CreatedDisk, HypervisorError>;
    /// Checks a volume the operator made that a job names as
    /// `source.volume` (never attached, written nor deleted by us): it
    /// exists, is a regular file, is not named like one of the driver's
    /// own nor used as a disk by any domain, and has no backing file.
    fn source_volume(&self, pool: &str, name: &str) -> Result<SourceVolumeFacts, HypervisorError>;
    /// The `os` a domain gets: what the job set, the rest from the host's
    /// capabilities for `virt_type` (`kvm`/`qemu`). The inner error names
    /// the job field to set.
    fn os_defaults(
        &self,
        arch: Option<&str>,
        machine: Option<&str>,
        virt_type: &str,
    ) -> Result<Result<crate::libvirt::host::OsDefaults, String>, HypervisorError>;
    /// Deletes a volume; a missing pool or volume is fine.
    fn delete_volume(&self, volume: &CreatedVolume) -> Result<(), HypervisorError>;
    /// Deletes chained-disk parents no volume has used for `idle`.
    fn prune_unused_parents(
        &self,
        pools: &[String],
        idle: Duration,
    ) -> Result<Vec<String>, HypervisorError>;

    fn define_domain(&self, spec: &DomainSpec) -> Result<(), HypervisorError>;
    fn start_domain(&self, name: &str) -> Result<(), HypervisorError>;
    /// The task id in the metadata the driver writes into every domain it
    /// defines; `None` when no such domain exists or it carries none.
    fn domain_owner(&self, name: &str) -> Result<Option<String>, HypervisorError>;
    /// `None` when no such domain exists.
    fn domain_state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError>;
    /// Asks the guest to power off (ACPI power button).
    fn request_shutdown(&self, name: &str) -> Result<(), HypervisorError>;
    /// Powers the domain off now; a missing or stopped domain is fine.
    fn power_off(&self, name: &str) -> Result<(), HypervisorError>;
    /// Powers off and undefines; a missing domain is fine.
    fn remove_domain(&self, name: &str) -> Result<(), HypervisorError>;
    /// The storage-pool volumes the domain's disks use (`<disk
    /// type='volume'>`), in document order; `None` when no such domain
    /// exists. Used to adopt Go-driver domains, whose handles list none.
    fn domain_pool_volumes(
        &self,
        name: &str,
    ) -> Result<Option<Vec<CreatedVolume>>, HypervisorError>;
    /// `None` when no such domain exists.
    fn counters(&self, name: &str) -> Result<Option<DomainCounters>, HypervisorError>;

    /// The QEMU guest agent of a domain; `None` when this hypervisor has
    /// no way to reach guest agents. Reaching it may still fail (no channel,
    /// agent not running): each call says so.
    fn guest_agent(&self, name: &str) -> Option<GuestAgent>;

    /// Sends lifecycle events of every domain to `sink`, across reconnects.
    fn subscribe_events(&self, sink: Sender<LifecycleEvent>);
    /// Bumped on every new connection: events may have been missed.
    fn connection_generation(&self) -> u64;
}
