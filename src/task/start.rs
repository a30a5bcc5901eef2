//! StartTask: check the request against the host, then create volumes, the
//! seed and the domain, boot it and wire its network. A [`Rollback`] guard
//! records each thing before it is created and removes everything if the
//! start does not reach its end.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use super::contract::{Mount, StartRequest};
use super::error::TaskError;
use super::journal::{Journal, RecordWriter};
use super::plan::{self, GuestShare};
use super::shares::Transport;
use crate::cloudinit::docs::{render, CloudInitInput};
use crate::cloudinit::iso::build_seed_iso;
use crate::cloudinit::password::random_salt;
use crate::config::names::GuestDeviceName;
use crate::config::plugin::{CephPool, Settings};
use crate::config::policy;
use crate::config::task::{
    self as task_config, hostname_from_task_name, DiskKind, DiskSource as ConfigDiskSource,
};
use crate::faults::crash_point;
use crate::hypervisor::{Hypervisor, RbdContent, RbdMade, VolumeContent};
use crate::libvirt::domain_xml::{
    DiskBus, DiskDevice, DiskSource, DiskSpec, DomainMetadata, DomainSpec, DomainType,
    InterfaceSpec, ShareDriver, ShareSpec,
};
use crate::libvirt::host;
use crate::libvirt::storage::rbd::RbdAccess;
use crate::net::iptables::task_tag;
use crate::net::{Attachment, DriverNetwork, Net, NetIntent, TeardownSpec, VmStartedBuildRequest};
use crate::nomad::driver_state::CreatedVolume;
use crate::storage::copy::CopyProgress;
use crate::storage::images::{self, ImageFormat};
use crate::storage::volume;

/// What the start produced.
#[derive(Debug)]
pub struct Booted {
    pub domain_name: String,
    pub volumes: Vec<CreatedVolume>,
    pub console_log: PathBuf,
    pub teardown: Option<TeardownSpec>,
    pub network: Option<DriverNetwork>,
    /// MACs of the macvtap interfaces: the host sees no lease for them, so
    /// their address comes from the guest agent.
    pub direct_macs: Vec<String>,
}

/// Inputs resolved before touching the hypervisor.
#[derive(Debug)]
pub struct StartPlan {
    pub domain_name: String,
    pub hostname: String,
    pub shares: Vec<GuestShare>,
    /// Block-device mounts no `disk` block names, attached as extra disks.
    pub block_devices: Vec<BlockMount>,
    /// Per disk: the Nomad volume it is on (`disk { volume = "/dev/vdb" }`).
    pub nomad_volumes: Vec<Option<BlockMount>>,
    /// Each disk's image, opened once ([`images::open_image`]).
    pub images: Vec<Option<images::ImageFile>>,
    pub user_data: Option<String>,
    pub console_log: PathBuf,
    /// MAC of each `network_interface`, in order.
    pub hwaddrs: Vec<String>,
}

/// A block device Nomad mounts into the task (a dynamic host volume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMount {
    pub host_path: PathBuf,
    /// The mount's destination (`/dev/vdb`); its last part names the guest
    /// device when it is a device name.
    pub task_path: String,
    pub read_only: bool,
}

impl BlockMount {
    /// The guest device name the destination asks for, when it is one.
    fn devname(&self) -> Option<GuestDeviceName> {
        self.task_path
            .strip_prefix("/dev/")
            .and_then(|name| GuestDeviceName::parse(name).ok())
    }
}

/// Undoes a start that did not finish: on drop, unless disarmed, removes
/// the domain, then the volumes (newest first), then forgets the journal
/// record if everything went. Everything is written to the journal before
/// it is created, so a failure half-way through a creation is covered too,
/// and so is a plugin killed mid-start (the next plugin finds the record).
/// Network setup cleans up after itself before it fails; the rollback then
/// also removes what the recorded network intent names (after the domain,
/// so no guest asks for a lease again), as the next plugin would: a lease
/// the guest got after its wait timed out, a reservation whose removal
/// failed.
struct Rollback<'a> {
    hypervisor: &'a dyn Hypervisor,
    net: &'a dyn Net,
    journal: &'a Journal,
    record: RecordWriter,
    armed: bool,
}

impl<'a> Rollback<'a> {
    fn new(
        hypervisor: &'a dyn Hypervisor,
        net: &'a dyn Net,
        journal: &'a Journal,
        record: RecordWriter,
    ) -> Self {
        Self {
            hypervisor,
            net,
            journal,
            record,
            armed: true,
        }
    }

    fn volume(&mut self, pool: &str, name: &str) -> Result<(), TaskError> {
        let volume = CreatedVolume {
            pool: pool.to_string(),
            name: name.to_string(),
        };
        Ok(self.record.update(|record| record.volumes.push(volume))?)
    }

    /// Takes back the last record of a volume the start turned out not to
    /// make (an earlier disk may have recorded the same one for itself).
    fn forget_volume(&mut self, pool: &str, name: &str) -> Result<(), TaskError> {
        Ok(self.record.update(|record| {
            let last = record
                .volumes
                .iter()
                .rposition(|volume| volume.pool == pool && volume.name == name);
            if let Some(last) = last {
                record.volumes.remove(last);
            }
        })?)
    }

    fn domain(&mut self) -> Result<(), TaskError> {
        Ok(self.record.update(|record| record.domain_defined = true)?)
    }

    fn net(&mut self, intent: NetIntent) -> Result<(), TaskError> {
        Ok(self.record.update(|record| record.net = Some(intent))?)
    }

    /// The start succeeded: keep everything; returns the volumes made.
    fn disarm(mut self) -> Vec<CreatedVolume> {
        self.armed = false;
        self.record
            .snapshot()
            .map(|record| record.volumes)
            .unwrap_or_default()
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(record) = self.record.snapshot() else {
            return;
        };
        let mut complete = true;
        if record.domain_defined {
            if let Err(error) = self.hypervisor.remove_domain(&record.domain_name) {
                complete = false;
                tracing::warn!(error = %error, domain = %record.domain_name, "rollback could not remove the domain");
            }
        }
        if let Some(intent) = &record.net {
            if let Err(error) = self.net.remove_unfinished(intent) {
                complete = false;
                tracing::warn!(error = %error, "rollback could not remove the network setup");
            }
        }
        for created in record.volumes.iter().rev() {
            if let Err(error) = self.hypervisor.delete_volume(created) {
                complete = false;
                tracing::warn!(error = %error, volume = %created.name, "rollback could not delete a volume");
            }
        }
        if complete {
            self.journal.forget(&record.task_id);
        }
    }
}

/// Checks the parts of the request that need the file system but not the
/// hypervisor: images against the allow-list, user data, shares.
pub fn prepare(request: &StartRequest, settings: &Settings) -> Result<StartPlan, TaskError> {
    let config = &request.config;
    let domain_name = plan::domain_name(&request.task_name, &request.task_id);
    let hostname = config.hostname.as_ref().map_or_else(
        // Unique per task (like the domain name), so count > 1 does not clash.
        || hostname_from_task_name(&domain_name),
        |hostname| hostname.as_str().to_string(),
    );
    // The operator's allow_* settings, before anything else is looked at.
    let mut problems = crate::config::Problems::default();
    let routes = crate::net::routes::default_route_devices();
    policy::check_task(
        config,
        &settings.policy,
        &settings.default_pool,
        Some(&routes),
        &mut problems,
    );
    problems.into_result("task config", ())?;
    let alloc_dir = &request.alloc_dir;
    if alloc_dir.as_os_str().is_empty() || !alloc_dir.is_absolute() {
        return Err(TaskError::Invalid(format!(
            "alloc_dir {alloc_dir:?} is not an absolute path"
        )));
    }
    let task_dir = alloc_dir.join(&request.task_name);
    let disks = &config.disks;
    if disks.is_empty() {
        return Err(TaskError::Invalid(
            "disk: a VM needs at least one disk block, e.g. disk { source { image = \"debian-12.qcow2\" } }".into(),
        ));
    }
    let mut images_found = Vec::new();
    for (index, disk) in disks.iter().enumerate() {
        match disk.image() {
            Some(image) => {
                let file =
                    images::open_image(image, &settings.image_paths, alloc_dir, &task_dir)
                        .map_err(|error| error.in_field(format!("disk[{index}].source.image")))?;
                images_found.push(Some(file));
            }
            None => images_found.push(None),
        }
    }
    let user_data = match config.user_data.as_deref() {
        None => None,
        Some(text) if looks_inline(text) => Some(text.to_string()),
        Some(path) => {
            // Opened like an image (once, beneath the same roots) and read
            // from that descriptor.
            let file = images::open_image(path, &settings.image_paths, alloc_dir, &task_dir)
                .map_err(|error| error.in_field("user_data"))?;
            Some(read_bounded(
                file.file(),
                crate::config::task::MAX_USER_DATA_BYTES,
            )?)
        }
    };

    let mut shares = Vec::new();
    for (tag, host_dir, guest_path) in [
        ("alloc", alloc_dir.join("alloc"), "/alloc"),
        ("local", task_dir.join("local"), "/local"),
        ("secrets", task_dir.join("secrets"), "/secrets"),
    ] {
        if host_dir.is_dir() {
            shares.push(GuestShare {
                host_dir,
                tag: tag.to_string(),
                guest_path: guest_path.to_string(),
                read_only: true,
            });
        }
    }
    // Disks on Nomad volumes are matched to the volume_mount with the same
    // destination under /dev/, as in the Go driver; the rest of the mounts
    // are shared directories or extra block disks.
    let mut matched = vec![false; request.mounts.len()];
    let mut nomad_volumes = Vec::new();
    for (index, disk) in disks.iter().enumerate() {
        let Some(volume) = disk.nomad_volume() else {
            nomad_volumes.push(None);
            continue;
        };
        let field = format!("disk[{index}].volume");
        let Some(position) = request
            .mounts
            .iter()
            .position(|mount| mount.task_path == volume)
        else {
            return Err(TaskError::Invalid(format!(
                "{field}: no volume_mount of this task has destination {volume:?}; add \
                 volume_mount {{ volume = \"...\" destination = {volume:?} }} to the task \
                 (and the volume to its group)"
            )));
        };
        if matched[position] {
            return Err(TaskError::Invalid(format!(
                "{field}: another disk is already on the volume_mount {volume:?}; give each disk its own volume"
            )));
        }
        matched[position] = true;
        let mount = &request.mounts[position];
        if mount.read_only && disk.image().is_some() {
            return Err(TaskError::Invalid(format!(
                "disk[{index}].source.image: the volume_mount {volume:?} is read_only, so the \
                 image cannot be written to it; remove read_only from the volume_mount or the \
                 source block"
            )));
        }
        if mount.read_only && disk.kind == DiskKind::Lun {
            // SCSI passthrough lets the guest send any command to the
            // device; libvirt's <readonly/> is not enforced for it.
            return Err(TaskError::Invalid(format!(
                "disk[{index}].kind: \"lun\" passes the device through, which a read_only \
                 volume_mount {volume:?} cannot keep read-only; use kind = \"disk\" or remove \
                 read_only from the volume_mount"
            )));
        }
        if !is_block_device(&mount.host_path) {
            return Err(TaskError::Invalid(format!(
                "{field}: the volume mounted at {volume:?} is not a block device; a disk needs a \
                 block-device volume (e.g. a dynamic host volume made by the mkblock plugin), \
                 or drop the disk block to share the directory"
            )));
        }
        nomad_volumes.push(Some(BlockMount {
            host_path: mount.host_path.clone(),
            task_path: mount.task_path.clone(),
            read_only: mount.read_only,
        }));
    }
    let mut block_devices = Vec::new();
    for (index, mount) in request.mounts.iter().enumerate() {
        if matched[index] {
            continue;
        }
        let Mount {
            host_path,
            task_path,
            read_only,
        } = mount;
        if host_path.starts_with("/dev/") {
            block_devices.push(BlockMount {
                host_path: host_path.clone(),
                task_path: task_path.clone(),
                read_only: *read_only,
            });
        } else {
            if !task_path.starts_with('/') {
                return Err(TaskError::Invalid(format!(
                    "volume_mount {index}: destination {task_path:?} must be an absolute guest path"
                )));
            }
            shares.push(GuestShare {
                host_dir: host_path.clone(),
                tag: format!("vol{index}"),
                guest_path: task_path.clone(),
                read_only: *read_only,
            });
        }
    }
    let console_log = task_dir.join("virt-console.log");
    let interfaces = config.network_interfaces.len();
    let hwaddrs = (0..interfaces)
        .map(|index| crate::net::mac_for(&request.task_id, index))
        .collect();
    Ok(StartPlan {
        domain_name,
        hostname,
        shares,
        block_devices,
        nomad_volumes,
        images: images_found,
        user_data,
        console_log,
        hwaddrs,
    })
}

/// Whether `path` is a block device (following symlinks: Nomad may hand
/// a link to the device).
fn is_block_device(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_block_device())
}

/// Reads a `user_data` file of at most `limit` bytes, refusing a larger one
/// before reading it whole.
fn read_bounded(file: &std::fs::File, limit: usize) -> Result<String, TaskError> {
    use std::io::Read as _;
    let invalid = |problem: String| TaskError::Invalid(format!("user_data: {problem}"));
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| invalid(format!("cannot read the file: {error}")))?;
    if bytes.len() > limit {
        return Err(invalid(format!(
            "the file is larger than {limit} bytes; keep user data small and fetch the rest in the guest"
        )));
    }
    String::from_utf8(bytes).map_err(|_| invalid("the file is not UTF-8 text".into()))
}

/// The size a disk can grow to, and the field it comes from: its `size`,
/// or its image's virtual size (read as `image`'s format, the one the copy
/// uses) or its source volume's capacity when that is larger.
fn disk_size(
    disk: &task_config::DiskSpec,
    image: Option<(&images::ImageFile, ImageFormat)>,
    source_capacity: Option<u64>,
    field: &str,
) -> Result<Option<(u64, String)>, TaskError> {
    let explicit = disk.size.map(|size| (size.0, format!("{field}.size")));
    let Some((image, format)) = image else {
        return Ok(match (source_capacity, explicit) {
            (Some(capacity), explicit)
                if explicit.as_ref().is_none_or(|(size, _)| *size < capacity) =>
            {
                Some((
                    capacity,
                    format!("{field}.source.volume (the volume's capacity)"),
                ))
            }
            (_, explicit) => explicit,
        });
    };
    let image_field = format!("{field}.source.image");
    let virtual_size =
        images::image_virtual_size(image, format).map_err(|e| e.in_field(image_field.clone()))?;
    Ok(Some(match explicit {
        Some((size, size_field)) if size >= virtual_size => (size, size_field),
        _ => (
            virtual_size,
            format!("{image_field} (the image's virtual size)"),
        ),
    }))
}

/// Inline cloud-config or script rather than a file name.
fn looks_inline(text: &str) -> bool {
    text.trim_start().starts_with('#') || text.contains('\n')
}

/// The bus of the cloud-init seed cdrom: IDE on i440fx (`pc`), SATA on
/// q35 (which has no IDE), SCSI elsewhere (e.g. aarch64 `virt`), as the Go
/// driver uses for all.
fn seed_bus(machine: &str) -> task_config::DiskBus {
    if machine.contains("q35") {
        task_config::DiskBus::Sata
    } else if machine == "pc" || machine.contains("i440fx") || machine.starts_with("pc-") {
        task_config::DiskBus::Ide
    } else {
        task_config::DiskBus::Scsi
    }
}

/// The format of a disk's source image: `source.format` when the job says
/// it, else read from the image's header.
fn source_image_format(
    disk: &task_config::DiskSpec,
    image: &images::ImageFile,
    field: &str,
) -> Result<ImageFormat, TaskError> {
    match &disk.source {
        Some(ConfigDiskSource::Image {
            format: Some(declared),
            ..
        }) => declared.as_str().parse().map_err(TaskError::Invalid),
        _ => Ok(images::detect_format(image)
            .map_err(|e| e.in_field(format!("{field}.source.image")))?),
    }
}

/// A configured pool, prepared for this start.
#[derive(Debug, Clone)]
enum PoolRef {
    Directory(String),
    Ceph(Box<(CephPool, RbdAccess)>),
}

impl PoolRef {
    fn name(&self) -> &str {
        match self {
            PoolRef::Directory(name) => name,
            PoolRef::Ceph(ceph) => &ceph.0.name,
        }
    }

    fn name_of(pool: &PoolRef) -> String {
        pool.name().to_string()
    }
}

/// RBD images are raw and sparse: what a disk in a Ceph pool may not ask
/// for otherwise (as the Go driver refuses them).
fn check_rbd_disk(disk: &task_config::DiskSpec, field: &str, pool: &str) -> Result<(), TaskError> {
    if let Some(format) = disk.format.filter(|format| format.as_str() != "raw") {
        if !disk.chained {
            return Err(TaskError::Invalid(format!(
                "{field}.format: {:?} is not possible in Ceph pool {pool:?}: RBD volumes are \
                 raw; set format = \"raw\" or remove it",
                format.as_str()
            )));
        }
    }
    if disk.sparse == Some(false) {
        return Err(TaskError::Invalid(format!(
            "{field}.sparse: RBD volumes in Ceph pool {pool:?} are always sparse; remove sparse = false"
        )));
    }
    Ok(())
}

/// Creates the RBD volume(s) of a disk in a Ceph pool, each recorded
/// before it is made, and returns the disk's network source. A chained
/// disk is an RBD copy-on-write clone of a base volume holding the image
/// (both the task's: removed with it).
#[allow(clippy::too_many_arguments)]
fn create_rbd_disk(
    hypervisor: &dyn Hypervisor,
    rollback: &mut Rollback<'_>,
    (config, access): (&CephPool, &RbdAccess),
    disk: &task_config::DiskSpec,
    field: &str,
    name: &str,
    image: Option<(&images::ImageFile, ImageFormat)>,
    cap: Option<u64>,
) -> Result<DiskSource, TaskError> {
    check_rbd_disk(disk, field, &config.name)?;
    let pool = &config.name;
    let image_field = format!("{field}.source.image");
    match image {
        Some((image, image_format)) => {
            // The checked size (the image's virtual size or more).
            let size = cap
                .or(disk.size.map(|size| size.0))
                .ok_or_else(|| TaskError::Invalid(format!("{field}.size: is required")))?;
            // A chained disk clones the shared parent; any other disk (or
            // a chained one whose parent another host is still uploading)
            // gets a copy of the image.
            let copy_image = if disk.chained {
                // Go's way: one parent per image (by its bytes' key) in
                // the pool, each chained disk an RBD clone of it. Both are
                // recorded: teardown deletes the clone, then the parent
                // unless other clones still use it.
                let (key, _) =
                    crate::storage::parent_key::key_of_file(image.file()).map_err(|error| {
                        TaskError::from(image.io("read the image", error)).in_field(&image_field)
                    })?;
                let parent = crate::libvirt::storage::rbd::shared_parent_name(image_format, &key);
                rollback.volume(pool, &parent)?;
                rollback.volume(pool, name)?;
                let made = hypervisor
                    .create_rbd_volume(
                        config,
                        name,
                        RbdContent::Shared {
                            image,
                            image_format,
                            parent: &parent,
                            size,
                        },
                    )
                    .map_err(|e| TaskError::from(e).in_field(&image_field))?;
                if made == RbdMade::ParentUnfinished {
                    // Another host's parent, still being uploaded: never
                    // this task's to delete, even if the copy below fails.
                    rollback.forget_volume(pool, &parent)?;
                }
                made == RbdMade::ParentUnfinished
            } else {
                rollback.volume(pool, name)?;
                true
            };
            if copy_image {
                hypervisor
                    .create_rbd_volume(
                        config,
                        name,
                        RbdContent::Image {
                            image,
                            image_format,
                            size,
                        },
                    )
                    .map_err(|e| TaskError::from(e).in_field(&image_field))?;
            }
        }
        None => match &disk.source {
            // The operator's RBD image is only read: copied, or (chained)
            // the parent of an RBD clone (libvirt leaves a protected
            // snapshot `libvirt-<n>` on it, as with the Go driver).
            Some(ConfigDiskSource::Volume { name: source, .. }) => {
                let size = cap.or(disk.size.map(|size| size.0)).unwrap_or(0);
                let source = source.as_str();
                let content = match disk.chained {
                    true => RbdContent::Clone {
                        parent: source,
                        size,
                    },
                    false => RbdContent::Copy { source, size },
                };
                rollback.volume(pool, name)?;
                hypervisor
                    .create_rbd_volume(config, name, content)
                    .map_err(|e| TaskError::from(e).in_field(&format!("{field}.source.volume")))?;
            }
            _ => {
                let size = disk.size.map(|size| size.0).ok_or_else(|| {
                    TaskError::Invalid(format!("{field}.size: is required for an empty disk"))
                })?;
                rollback.volume(pool, name)?;
                hypervisor.create_rbd_volume(config, name, RbdContent::Empty { size })?;
            }
        },
    }
    Ok(DiskSource::Rbd {
        access: access.clone(),
        image: name.to_string(),
    })
}

fn bus(bus: task_config::DiskBus) -> DiskBus {
    match bus {
        task_config::DiskBus::Sata => DiskBus::Sata,
        task_config::DiskBus::Scsi => DiskBus::Scsi,
        task_config::DiskBus::Ide => DiskBus::Ide,
        task_config::DiskBus::Usb => DiskBus::Usb,
        task_config::DiskBus::Virtio => DiskBus::Virtio,
    }
}

/// How often a disk still being prepared reports its bytes done, as
/// Nomad's docker driver reports image pulls.
const DISK_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// Overrides [`DISK_PROGRESS_INTERVAL`] in seconds (tests, which copy
/// small images fast).
pub(crate) const DISK_PROGRESS_INTERVAL_ENV: &str = "NOMAD_DRIVER_VIRT_DISK_PROGRESS_INTERVAL";

/// The disk progress interval in force.
fn disk_progress_interval() -> Duration {
    std::env::var(DISK_PROGRESS_INTERVAL_ENV)
        .ok()
        .and_then(|text| text.parse::<f64>().ok())
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .filter(|interval| !interval.is_zero())
        .unwrap_or(DISK_PROGRESS_INTERVAL)
}

/// Runs `work` (a disk's preparation, which counts its bytes in
/// `counter`) and, every `interval` until it returns, reports
/// `"{label}: <done> of <total>"` through `progress`. A preparation
/// shorter than `interval` reports nothing.
pub(crate) fn with_progress_reports<T>(
    label: &str,
    counter: &CopyProgress,
    interval: Duration,
    progress: &(dyn Fn(&str) + Sync),
    work: impl FnOnce() -> T,
) -> T {
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let reporter = std::thread::Builder::new()
            .name("disk-progress".into())
            .spawn_scoped(scope, move || {
                while let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(interval) {
                    progress(&progress_message(label, counter.get()));
                }
            });
        if let Err(error) = reporter {
            tracing::debug!(%error, "no thread for disk progress reports; preparing without");
        }
        let result = work();
        drop(done);
        result
    })
}

/// `"Preparing disk[0] vda: 512 MiB of 2.0 GiB (25%)"`.
fn progress_message(label: &str, (done, total): (u64, u64)) -> String {
    if total == 0 {
        return format!("{label}: working (size not known yet)");
    }
    let percent = done.min(total) as f64 * 100.0 / total as f64;
    format!(
        "{label}: {} of {} ({percent:.0}%)",
        human_bytes(done.min(total)),
        human_bytes(total)
    )
}

/// Whole MiB below 1 GiB, GiB with one decimal above.
fn human_bytes(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    if bytes < GIB {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    }
}

/// Creates volumes, the seed and the domain, boots it and wires its
/// network. Blocks (lease wait included): run it on a blocking thread. On
/// any failure everything this call created is removed before it returns.
#[allow(clippy::too_many_arguments)]
pub fn boot(
    hypervisor: &dyn Hypervisor,
    net: &dyn Net,
    journal: &Journal,
    request: &StartRequest,
    settings: &Settings,
    start_plan: &StartPlan,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Booted, TaskError> {
    let config = &request.config;
    let record = journal.begin(&request.task_id, &start_plan.domain_name)?;
    crash_point("start:recorded");
    let mut rollback = Rollback::new(hypervisor, net, journal, record);
    let facts = hypervisor.host_facts()?;
    let resources = &request.resources;
    let vm = plan::vm_resources(
        resources.memory_mb,
        resources.memory_max_mb,
        resources.cpu_shares,
        &resources.cpuset_cpus,
        u64::from(facts.mhz_per_core),
        facts.cpus,
    )
    .map_err(TaskError::Invalid)?;
    let domain_type = match host::choose_accelerator(
        settings.accelerator,
        facts.kvm_offered,
        host::kvm_device_usable(),
    ) {
        "kvm" => DomainType::Kvm,
        _ => DomainType::Qemu,
    };

    let os = hypervisor
        .os_defaults(
            config.os.arch.as_deref(),
            config.os.machine.as_deref(),
            domain_type.as_str(),
        )?
        .map_err(TaskError::Invalid)?;
    let seed_bus = seed_bus(&os.machine);
    // Before anything is created: a share QEMU cannot open fails here.
    let shares = super::shares::plan(
        hypervisor,
        &start_plan.shares,
        config.shared_dirs_driver,
        settings,
        (domain_type, &os.arch, &os.machine),
    )?;
    // Disks on Nomad volumes are named after their mount's destination
    // unless they set devname, as in Go; extra block mounts likewise.
    let mut disks = config.disks.clone();
    for (disk, volume) in disks.iter_mut().zip(&start_plan.nomad_volumes) {
        if disk.devname.is_none() {
            disk.devname = volume.as_ref().and_then(BlockMount::devname);
        }
    }
    let mut named = disks.clone();
    named.extend(
        start_plan
            .block_devices
            .iter()
            .map(|block| task_config::DiskSpec {
                devname: block.devname(),
                ..Default::default()
            }),
    );
    let (mut device_names, seed_device) =
        plan::device_names(&named, seed_bus).map_err(TaskError::Invalid)?;
    let block_names = device_names.split_off(disks.len());
    let net_config = config.network_interfaces.clone();
    let attachments = net.attachments(&net_config, &resources.ports, &start_plan.hwaddrs)?;
    for (index, attachment) in attachments.iter().enumerate() {
        if let Attachment::Network {
            network, bridge, ..
        } = attachment
        {
            policy::check_network(bridge, network, &settings.policy).map_err(|message| {
                TaskError::Invalid(format!("network_interface[{index}].bridge.name: {message}"))
            })?;
        }
    }
    // Guests on a shared bridge get clean-traffic: without the filter
    // libvirt would refuse the domain late, or (without nwfilter) the
    // guest could spoof; refuse now, saying how to fix it.
    let on_network = attachments
        .iter()
        .position(|attachment| matches!(attachment, Attachment::Network { .. }));
    if let (true, Some(index)) = (settings.policy.clean_traffic, on_network) {
        if hypervisor.nwfilter_exists(crate::net::CLEAN_TRAFFIC_FILTER)? == Some(false) {
            return Err(TaskError::Invalid(format!(
                "network_interface[{index}].bridge: the plugin setting clean_traffic is on but \
                 libvirt has no network filter {:?} for this guest; {}",
                crate::net::CLEAN_TRAFFIC_FILTER,
                crate::net::CLEAN_TRAFFIC_FIX
            )));
        }
    }

    // Each pool is prepared once per start, not per disk.
    let mut prepared: HashMap<String, PoolRef> = HashMap::new();
    let mut pool_for = |name: &str, field: &str| -> Result<PoolRef, TaskError> {
        if let Some(pool) = prepared.get(name) {
            return Ok(pool.clone());
        }
        let pool = if let Some(config) = settings.pools.iter().find(|p| p.name == name) {
            hypervisor.prepare_pool(config)?;
            PoolRef::Directory(config.name.clone())
        } else if let Some(config) = settings.ceph_pool(name) {
            let access = hypervisor
                .prepare_ceph_pool(config)
                .map_err(|e| TaskError::from(e).in_field(field))?;
            PoolRef::Ceph(Box::new((config.clone(), access)))
        } else {
            return Err(TaskError::Invalid(format!(
                "{field}: {name:?} is not a configured storage pool; configured: {}",
                settings.pool_names().join(", ")
            )));
        };
        prepared.insert(name.to_string(), pool.clone());
        Ok(pool)
    };

    let pool_of = |disk: &task_config::DiskSpec| {
        disk.pool.as_ref().map_or_else(
            || settings.default_pool.clone(),
            |pool| pool.as_str().to_string(),
        )
    };
    // Source volumes are checked before anything is created: they exist,
    // are the operator's (not another task's), and have no backing file.
    let mut source_capacities: Vec<Option<u64>> = vec![None; disks.len()];
    for (index, disk) in disks.iter().enumerate() {
        let Some(ConfigDiskSource::Volume { name, format }) = &disk.source else {
            continue;
        };
        let field = format!("disk[{index}]");
        let pool = pool_for(&pool_of(disk), &format!("{field}.pool"))?;
        let ceph = match &pool {
            PoolRef::Ceph(ceph) => Some(ceph.0.clone()),
            PoolRef::Directory(_) => None,
        };
        let pool = PoolRef::name_of(&pool);
        // A volume another start recorded is that task's, whatever its name.
        if let Some(task) = journal.task_using_volume(&pool, name.as_str()) {
            return Err(TaskError::Invalid(format!(
                "{field}.source.volume: volume {:?} in pool {:?} is a disk of task {task:?}; \
                 name a volume the operator made",
                name.as_str(),
                pool
            )));
        }
        let facts = match &ceph {
            // RBD images are raw.
            Some(ceph) => hypervisor
                .rbd_source_volume(ceph, name.as_str())
                .map(|capacity| crate::hypervisor::SourceVolumeFacts {
                    format: ImageFormat::Raw,
                    capacity,
                }),
            None => hypervisor.source_volume(&pool, name.as_str()),
        };
        let facts =
            facts.map_err(|e| TaskError::from(e).in_field(&format!("{field}.source.volume")))?;
        // Go: "size of disk must be equal to or greater than source".
        if let Some(size) = disk.size.filter(|size| size.0 < facts.capacity) {
            return Err(TaskError::Invalid(format!(
                "{field}.size: {size} is smaller than volume {:?} ({} bytes); a disk cannot \
                 shrink its source: remove size or set it to at least {} bytes",
                name.as_str(),
                facts.capacity,
                facts.capacity
            )));
        }
        if let Some(declared) = format {
            if declared.as_str() != facts.format.as_str() {
                return Err(TaskError::Invalid(format!(
                    "{field}.source.format: is {declared:?} but volume {:?} holds a {} image; \
                     remove source.format or set it to {:?}",
                    name.as_str(),
                    facts.format.as_str(),
                    facts.format.as_str()
                )));
            }
        }
        source_capacities[index] = Some(facts.capacity);
    }

    // The seed is built now (nothing is created yet) so that its size
    // counts against the default pool with the disks.
    progress("Building cloud-init seed");
    let seed = render(
        &CloudInitInput {
            instance_id: start_plan.domain_name.clone(),
            hostname: start_plan.hostname.clone(),
            user_data: start_plan.user_data.clone(),
            default_user_password: config.default_user_password.clone(),
            ssh_authorized_key: config.default_user_authorized_ssh_key.clone(),
            ssh_password_auth: config.ssh_password_auth,
            cmds: config.cmds.clone(),
            bootcmds: super::shares::mount_commands(&shares),
            timezone: config
                .timezone
                .as_ref()
                .map(|zone| zone.as_str().to_string()),
            env: request.env.clone(),
        },
        random_salt()?,
    )?;
    let iso = build_seed_iso(&seed)?;

    // Every disk's size against the operator's maximum, and the disks of
    // each pool together (the seed with the default pool's) against its
    // free space, before any volume is created. An image's format is read
    // once, here, and the copy uses the same; the checked size caps the
    // copy (a sibling may rewrite the image in between).
    let mut image_formats: Vec<Option<ImageFormat>> = vec![None; disks.len()];
    let mut caps: Vec<Option<u64>> = vec![None; disks.len()];
    let mut per_pool: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for (index, disk) in disks.iter().enumerate() {
        let field = format!("disk[{index}]");
        let image = match &start_plan.images[index] {
            Some(image) => {
                let format = source_image_format(disk, image, &field)?;
                image_formats[index] = Some(format);
                Some((image, format))
            }
            None => None,
        };
        let Some((size, size_field)) = disk_size(disk, image, source_capacities[index], &field)?
        else {
            continue;
        };
        policy::check_disk_size(size, None, &settings.policy)
            .map_err(|message| TaskError::Invalid(format!("{size_field}: {message}")))?;
        caps[index] = Some(size);
        // A Nomad volume is the disk: its size is the device's, checked
        // against the image when it is written, and it uses no pool.
        if start_plan.nomad_volumes[index].is_some() {
            continue;
        }
        let pool = pool_for(&pool_of(disk), &format!("{field}.pool"))?;
        if let PoolRef::Ceph(ceph) = &pool {
            check_rbd_disk(disk, &field, &ceph.0.name)?;
        }
        per_pool
            .entry(pool.name().to_string())
            .or_default()
            .push((size_field, size));
    }
    let seed_pool = pool_for(&settings.default_pool, "storage_pools.default")?;
    let seed_pool = PoolRef::name_of(&seed_pool);
    per_pool.entry(seed_pool.clone()).or_default();
    for (pool, disks) in &per_pool {
        let available = hypervisor.pool_available(pool)?;
        let seed = if *pool == seed_pool {
            iso.len() as u64
        } else {
            0
        };
        policy::check_pool_free(disks, seed, pool, available).map_err(TaskError::Invalid)?;
    }

    progress("Preparing disks");
    let mut disk_specs = Vec::new();
    for (index, disk) in disks.iter().enumerate() {
        let field = format!("disk[{index}]");
        let device = device_names[index].clone();
        let guest_device = match disk.kind {
            DiskKind::Cdrom => DiskDevice::Cdrom,
            DiskKind::Lun => DiskDevice::Lun,
            DiskKind::Disk => DiskDevice::Disk,
        };
        if let Some(volume) = &start_plan.nomad_volumes[index] {
            // The volume is the disk: written from the image when there is
            // one (prepare refused that for a read_only mount).
            if let (Some(image), Some(image_format)) =
                (&start_plan.images[index], image_formats[index])
            {
                progress("Writing image to volume");
                crate::storage::qemu_img::write_to_device(image, image_format, &volume.host_path)
                    .map_err(|e| e.in_field(format!("{field}.source.image")))?;
            }
            disk_specs.push(DiskSpec {
                source: DiskSource::Block(volume.host_path.clone()),
                format: "raw".into(),
                target_dev: device,
                bus: bus(disk.bus()),
                device: guest_device,
                read_only: volume.read_only || disk.read_only || disk.kind == DiskKind::Cdrom,
                boot_order: disk.primary.then_some(1),
                backing: None,
            });
            continue;
        }
        let pool = pool_for(&pool_of(disk), &format!("{field}.pool"))?;
        if let PoolRef::Ceph(ceph) = &pool {
            let (config, access) = &**ceph;
            progress("Writing image to Ceph");
            let image = start_plan.images[index].as_ref().zip(image_formats[index]);
            let source = create_rbd_disk(
                hypervisor,
                &mut rollback,
                (config, access),
                disk,
                &field,
                &volume::disk_volume_name(&start_plan.domain_name, &device, ImageFormat::Raw),
                image,
                caps[index],
            )?;
            crash_point("start:disk");
            disk_specs.push(DiskSpec {
                source,
                format: "raw".into(),
                target_dev: device,
                bus: bus(disk.bus()),
                device: guest_device,
                read_only: disk.read_only || disk.kind == DiskKind::Cdrom,
                boot_order: disk.primary.then_some(1),
                backing: None,
            });
            continue;
        }
        let pool = PoolRef::name_of(&pool);
        let disk_format = disk.format.unwrap_or_default();
        let format: ImageFormat = disk_format.as_str().parse().map_err(TaskError::Invalid)?;
        let sparse = disk.sparse(disk_format);
        let capacity = disk.size.map(|size| size.0);
        let name = volume::disk_volume_name(&start_plan.domain_name, &device, format);
        let counter = CopyProgress::new();
        let content = if let (Some(image), Some(image_format)) =
            (&start_plan.images[index], image_formats[index])
        {
            let cap = caps[index];
            if disk.chained {
                VolumeContent::Overlay {
                    image,
                    image_format,
                    capacity,
                    cap,
                    progress: Some(&counter),
                }
            } else {
                VolumeContent::Copy {
                    image,
                    image_format,
                    format,
                    capacity,
                    sparse,
                    cap,
                    progress: Some(&counter),
                }
            }
        } else if let Some(ConfigDiskSource::Volume { name: source, .. }) = &disk.source {
            // The operator's volume is only read: cloned, or the read-only
            // backing file of an overlay, as in Go.
            if disk.chained {
                VolumeContent::VolumeOverlay {
                    source: source.as_str(),
                    capacity,
                }
            } else {
                VolumeContent::Clone {
                    source: source.as_str(),
                    format,
                    capacity,
                    sparse,
                }
            }
        } else {
            let size = capacity.ok_or_else(|| {
                TaskError::Invalid(format!("{field}.size: is required for an empty disk"))
            })?;
            VolumeContent::Empty {
                format,
                size,
                sparse,
            }
        };
        rollback.volume(&pool, &name)?;
        let from_image = start_plan.images[index].is_some();
        let label = format!("Preparing {field} {device}");
        let created =
            with_progress_reports(&label, &counter, disk_progress_interval(), progress, || {
                hypervisor.create_volume(&pool, &name, content)
            })
            .map_err(|e| match from_image {
                true => TaskError::from(e).in_field(&format!("{field}.source.image")),
                false => TaskError::from(e),
            })?;
        crash_point("start:disk");
        disk_specs.push(DiskSpec {
            source: DiskSource::File(created.path),
            format: format.as_str().to_string(),
            target_dev: device,
            bus: bus(disk.bus()),
            device: guest_device,
            read_only: disk.read_only || disk.kind == DiskKind::Cdrom,
            // The primary disk boots first; without one, the first disk does.
            boot_order: disk.primary.then_some(1),
            backing: created
                .backing
                .map(|(path, format)| (path, format.as_str().to_string())),
        });
    }
    for (block, target_dev) in start_plan.block_devices.iter().zip(block_names) {
        disk_specs.push(DiskSpec {
            source: DiskSource::Block(block.host_path.clone()),
            format: "raw".into(),
            target_dev,
            bus: DiskBus::Virtio,
            device: DiskDevice::Disk,
            read_only: block.read_only,
            boot_order: None,
            backing: None,
        });
    }

    let seed_name = volume::seed_volume_name(&start_plan.domain_name);
    rollback.volume(&seed_pool, &seed_name)?;
    let seed_path = hypervisor.create_volume(
        &seed_pool,
        &seed_name,
        VolumeContent::Bytes {
            data: &iso,
            format: ImageFormat::Raw,
        },
    )?;
    crash_point("start:seed");
    disk_specs.push(DiskSpec {
        source: DiskSource::File(seed_path.path),
        format: "raw".into(),
        target_dev: seed_device,
        bus: bus(seed_bus),
        device: DiskDevice::Cdrom,
        read_only: true,
        boot_order: None,
        backing: None,
    });

    progress("Starting VM");
    let spec = DomainSpec {
        name: start_plan.domain_name.clone(),
        domain_type,
        memory_kib: vm.memory_kib,
        current_memory_kib: vm.current_memory_kib,
        vcpus: vm.vcpus,
        cpuset: vm.cpuset.clone(),
        cpu_shares: vm.cpu_shares,
        arch: os.arch,
        machine: os.machine,
        disks: disk_specs,
        shares: shares
            .iter()
            .map(|planned| ShareSpec {
                source_dir: planned.share.host_dir.clone(),
                tag: planned.share.tag.clone(),
                read_only: planned.host_read_only,
                driver: match planned.transport {
                    Transport::NineP => ShareDriver::NineP,
                    Transport::Virtiofs => ShareDriver::Virtiofs,
                },
            })
            .collect(),
        interfaces: attachments
            .iter()
            .map(|attachment| match attachment {
                Attachment::Network {
                    network,
                    mac,
                    dhcp_servers,
                    ..
                } => InterfaceSpec::Network {
                    network: network.clone(),
                    mac: mac.clone(),
                    filter: settings
                        .policy
                        .clean_traffic
                        .then(|| crate::net::clean_traffic_filter(dhcp_servers)),
                },
                Attachment::Direct { device, mode, mac } => InterfaceSpec::Direct {
                    device: device.clone(),
                    mode: mode.clone(),
                    mac: mac.clone(),
                },
            })
            .collect(),
        console_log: Some(start_plan.console_log.clone()),
        metadata: DomainMetadata {
            task_id: request.task_id.clone(),
            alloc_id: request.alloc_id.clone(),
            task_name: request.task_name.clone(),
            plugin_version: crate::meta::PLUGIN_VERSION.into(),
        },
        guest_agent: request.config.guest_agent,
    };
    rollback.domain()?;
    hypervisor.define_domain(&spec)?;
    crash_point("start:defined");
    hypervisor.start_domain(&spec.name)?;
    crash_point("start:booted");

    // The guest is booting: find its address, reserve it, map ports.
    let (teardown, network) = if net_config.is_empty() {
        (None, None)
    } else {
        rollback.net(NetIntent {
            task_tag: task_tag(&request.task_id),
            interfaces: attachments
                .iter()
                .filter_map(|attachment| match attachment {
                    Attachment::Network { bridge, mac, .. } => Some((bridge.clone(), mac.clone())),
                    Attachment::Direct { .. } => None,
                })
                .collect(),
        })?;
        let built = net.vm_started_build(
            &VmStartedBuildRequest {
                vm_name: start_plan.domain_name.clone(),
                hostname: start_plan.hostname.clone(),
                task_tag: task_tag(&request.task_id),
                net_config,
                resources: resources.ports.clone(),
                hwaddrs: start_plan.hwaddrs.clone(),
                dhcp_timeout: settings.dhcp_timeout,
            },
            progress,
        )?;
        crash_point("start:network");
        (Some(built.teardown_spec), built.driver_network)
    };
    Ok(Booted {
        domain_name: start_plan.domain_name.clone(),
        volumes: rollback.disarm(),
        console_log: start_plan.console_log.clone(),
        teardown,
        network,
        direct_macs: attachments
            .iter()
            .filter_map(|attachment| match attachment {
                Attachment::Direct { mac, .. } => Some(mac.clone()),
                Attachment::Network { .. } => None,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_messages_read_like_docker_pulls() {
        let label = "Preparing disk[0] vda";
        assert_eq!(
            progress_message(label, (512 << 20, 2 << 30)),
            "Preparing disk[0] vda: 512 MiB of 2.0 GiB (25%)"
        );
        assert_eq!(
            progress_message(label, (0, 0)),
            "Preparing disk[0] vda: working (size not known yet)"
        );
        assert_eq!(
            progress_message(label, (5 << 20, 3 << 20)),
            "Preparing disk[0] vda: 3 MiB of 3 MiB (100%)"
        );
    }

    /// A real sparse copy (tmpfs to the temp dir: no reflink, so bytes
    /// move) of 256 MiB with 64 MiB of data, reported every millisecond:
    /// the reports carry the copier's own counts, some of them partial.
    #[test]
    fn a_long_copy_reports_bytes_done_of_total_while_it_runs() {
        use std::os::unix::fs::FileExt;
        const MIB: u64 = 1 << 20;
        let shm = tempfile::Builder::new()
            .prefix("ndvtest")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::Builder::new().prefix("ndvtest").tempdir())
            .unwrap();
        let dir = tempfile::Builder::new()
            .prefix("ndvtest")
            .tempdir()
            .unwrap();
        let source_path = shm.path().join("big.img");
        let source = std::fs::File::create(&source_path).unwrap();
        source.set_len(256 * MIB).unwrap();
        let data = vec![0x5a_u8; 16 * MIB as usize];
        for at in (0..256).step_by(64) {
            source.write_all_at(&data, at * MIB).unwrap();
            source.write_all_at(&data, (at + 32) * MIB).unwrap();
        }
        let source = std::fs::File::open(&source_path).unwrap();
        let dest = std::fs::File::create(dir.path().join("disk.img")).unwrap();
        let counter = CopyProgress::new();
        let messages = std::sync::Mutex::new(Vec::new());
        let report = |message: &str| messages.lock().unwrap().push(message.to_string());
        let method = with_progress_reports(
            "Preparing disk[1] vdb",
            &counter,
            Duration::from_millis(1),
            &report,
            || crate::storage::copy::copy_into(&source, &dest, 256 * MIB, Some(&counter)),
        )
        .unwrap();
        assert_eq!(counter.get(), (256 * MIB, 256 * MIB));
        let messages = messages.into_inner().unwrap();
        let partial: Vec<_> = messages
            .iter()
            .filter(|m| m.ends_with("%)") && m.contains(" of 256 MiB") && !m.contains("(100%)"))
            .collect();
        assert!(
            !partial.is_empty(),
            "no report with bytes done < total ({method:?}): {messages:?}"
        );
        assert!(
            partial
                .iter()
                .all(|m| m.starts_with("Preparing disk[1] vdb: ")),
            "{partial:?}"
        );

        // Work quicker than the interval reports nothing.
        let quiet = std::sync::Mutex::new(0);
        let count = |_: &str| *quiet.lock().unwrap() += 1;
        with_progress_reports("x", &counter, Duration::from_secs(60), &count, || ());
        assert_eq!(*quiet.lock().unwrap(), 0);
    }

    /// The seed cdrom's bus follows the machine libvirt chose.
    #[test]
    fn seed_bus_follows_the_machine() {
        use task_config::DiskBus as Bus;
        for (machine, expected) in [
            ("pc", Bus::Ide),
            ("pc-i440fx-7.2", Bus::Ide),
            ("q35", Bus::Sata),
            ("pc-q35-8.2", Bus::Sata),
            ("virt", Bus::Scsi),
            ("virt-7.2", Bus::Scsi),
        ] {
            assert_eq!(seed_bus(machine), expected, "{machine}");
        }
    }

    #[test]
    fn block_mount_devnames_come_from_the_destination() {
        let mount = |task_path: &str| BlockMount {
            host_path: "/dev/loop0".into(),
            task_path: task_path.into(),
            read_only: false,
        };
        assert_eq!(
            mount("/dev/vdb").devname().map(|n| n.as_str().to_string()),
            Some("vdb".to_string())
        );
        assert_eq!(mount("/data").devname(), None);
        assert_eq!(mount("/dev/../vdb").devname(), None);
    }
}
