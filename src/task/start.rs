//! StartTask: check the request against the host, then create volumes, the
//! seed and the domain, boot it and wire its network. A [`Rollback`] guard
//! records each thing before it is created and removes everything if the
//! start does not reach its end.

use std::collections::HashMap;
use std::path::PathBuf;

use super::contract::{Mount, StartRequest};
use super::error::TaskError;
use super::journal::{Journal, RecordWriter};
use super::plan::{self, GuestShare};
use crate::cloudinit::docs::{render, CloudInitInput};
use crate::cloudinit::iso::build_seed_iso;
use crate::cloudinit::password::random_salt;
use crate::config::plugin::{DirectoryPool, Settings};
use crate::config::task::{
    self as task_config, hostname_from_task_name, DiskKind, DiskSource as ConfigDiskSource,
};
use crate::faults::crash_point;
use crate::hypervisor::{Hypervisor, VolumeContent};
use crate::libvirt::domain_xml::{
    DiskBus, DiskDevice, DiskSource, DiskSpec, DomainMetadata, DomainSpec, DomainType,
    InterfaceSpec, ShareDriver, ShareSpec,
};
use crate::libvirt::host;
use crate::net::iptables::task_tag;
use crate::net::{Attachment, DriverNetwork, Net, NetIntent, TeardownSpec, VmStartedBuildRequest};
use crate::nomad::driver_state::CreatedVolume;
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
    pub block_devices: Vec<PathBuf>,
    /// Each disk's image, opened once ([`images::open_image`]).
    pub images: Vec<Option<images::ImageFile>>,
    pub user_data: Option<String>,
    pub console_log: PathBuf,
    /// MAC of each `network_interface`, in order.
    pub hwaddrs: Vec<String>,
}

/// Undoes a start that did not finish: on drop, unless disarmed, removes
/// the domain, then the volumes (newest first), then forgets the journal
/// record if everything went. Everything is written to the journal before
/// it is created, so a failure half-way through a creation is covered too,
/// and so is a plugin killed mid-start (the next plugin finds the record).
/// Network setup cleans up after itself before it fails.
struct Rollback<'a> {
    hypervisor: &'a dyn Hypervisor,
    journal: &'a Journal,
    record: RecordWriter,
    armed: bool,
}

impl<'a> Rollback<'a> {
    fn new(hypervisor: &'a dyn Hypervisor, journal: &'a Journal, record: RecordWriter) -> Self {
        Self {
            hypervisor,
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
    let mut block_devices = Vec::new();
    for (index, mount) in request.mounts.iter().enumerate() {
        let Mount {
            host_path,
            task_path,
            read_only,
        } = mount;
        if host_path.starts_with("/dev/") {
            block_devices.push(host_path.clone());
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
        images: images_found,
        user_data,
        console_log,
        hwaddrs,
    })
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

/// Inline cloud-config or script rather than a file name.
fn looks_inline(text: &str) -> bool {
    text.trim_start().starts_with('#') || text.contains('\n')
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
    let mut rollback = Rollback::new(hypervisor, journal, record);
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

    let arch = config.os.arch.clone().unwrap_or_else(|| "x86_64".into());
    let machine = config.os.machine.clone().unwrap_or_else(|| "pc".into());
    let seed_bus = if machine.contains("q35") {
        task_config::DiskBus::Sata
    } else {
        task_config::DiskBus::Ide
    };
    let disks = &config.disks;
    let (device_names, seed_device) =
        plan::device_names(disks, seed_bus).map_err(TaskError::Invalid)?;

    let net_config = config.network_interfaces.clone();
    let attachments = net.attachments(&net_config, &resources.ports, &start_plan.hwaddrs)?;

    // Each pool is prepared once per start, not per disk.
    let mut prepared: HashMap<String, ()> = HashMap::new();
    let mut pool_for = |name: &str, field: &str| -> Result<DirectoryPool, TaskError> {
        let config = settings
            .pools
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                TaskError::Invalid(format!(
                    "{field}: {name:?} is not a configured storage pool; configured: {}",
                    settings
                        .pools
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?
            .clone();
        if prepared.insert(config.name.clone(), ()).is_none() {
            hypervisor.prepare_pool(&config)?;
        }
        Ok(config)
    };

    progress("Preparing disks");
    let mut disk_specs = Vec::new();
    for (index, disk) in disks.iter().enumerate() {
        let field = format!("disk[{index}]");
        let pool_name = disk.pool.as_ref().map_or_else(
            || settings.default_pool.clone(),
            |pool| pool.as_str().to_string(),
        );
        let pool = pool_for(&pool_name, &format!("{field}.pool"))?;
        let device = device_names[index].clone();
        let target_format = disk
            .format
            .map_or("qcow2", task_config::DiskFormat::as_str)
            .to_string();
        let format: ImageFormat = target_format.parse().map_err(TaskError::Invalid)?;
        let capacity = disk.size.map(|size| size.0);
        let existing = match &disk.source {
            Some(ConfigDiskSource::Volume { name, .. }) => Some(name.as_str()),
            _ => None,
        };
        let path = if let Some(image) = &start_plan.images[index] {
            let image_format = images::detect_format(image)
                .map_err(|e| e.in_field(format!("{field}.source.image")))?;
            let name = volume::disk_volume_name(&start_plan.domain_name, &device, format);
            let content = if disk.chained {
                VolumeContent::Overlay {
                    image,
                    image_format,
                    capacity,
                }
            } else {
                VolumeContent::Copy {
                    image,
                    image_format,
                    format,
                    capacity,
                }
            };
            rollback.volume(&pool.name, &name)?;
            let path = hypervisor.create_volume(&pool.name, &name, content)?;
            crash_point("start:disk");
            path
        } else if let Some(existing) = existing {
            // An existing volume belongs to the operator: used, never deleted.
            hypervisor
                .existing_volume_path(&pool.name, existing)
                .map_err(|e| TaskError::from(e).in_field(&format!("{field}.source.volume")))?
        } else {
            let name = volume::disk_volume_name(&start_plan.domain_name, &device, format);
            let size = capacity.ok_or_else(|| {
                TaskError::Invalid(format!("{field}.size: is required for an empty disk"))
            })?;
            rollback.volume(&pool.name, &name)?;
            let path = hypervisor.create_volume(
                &pool.name,
                &name,
                VolumeContent::Empty { format, size },
            )?;
            crash_point("start:disk");
            path
        };
        let cdrom = disk.kind == DiskKind::Cdrom;
        disk_specs.push(DiskSpec {
            source: DiskSource::File(path),
            format: target_format,
            target_dev: device,
            bus: bus(disk.bus()),
            device: if cdrom {
                DiskDevice::Cdrom
            } else {
                DiskDevice::Disk
            },
            read_only: disk.read_only || cdrom,
            // The primary disk boots first; without one, the first disk does.
            boot_order: disk.primary.then_some(1),
        });
    }
    for (index, block) in start_plan.block_devices.iter().enumerate() {
        let letter = u8::try_from(index)
            .ok()
            .and_then(|i| b'p'.checked_add(i))
            .filter(u8::is_ascii_lowercase)
            .ok_or_else(|| TaskError::Invalid("volume_mount: too many block devices".into()))?;
        disk_specs.push(DiskSpec {
            source: DiskSource::Block(block.clone()),
            format: "raw".into(),
            target_dev: format!("vd{}", char::from(letter)),
            bus: DiskBus::Virtio,
            device: DiskDevice::Disk,
            read_only: false,
            boot_order: None,
        });
    }

    progress("Building cloud-init seed");
    let seed = render(
        &CloudInitInput {
            instance_id: start_plan.domain_name.clone(),
            hostname: start_plan.hostname.clone(),
            user_data: start_plan.user_data.clone(),
            default_user_password: config.default_user_password.clone(),
            ssh_authorized_key: config.default_user_authorized_ssh_key.clone(),
            cmds: config.cmds.clone(),
            bootcmds: plan::mount_commands(&start_plan.shares),
            timezone: config
                .timezone
                .as_ref()
                .map(|zone| zone.as_str().to_string()),
            env: request.env.clone(),
        },
        random_salt()?,
    )?;
    let iso = build_seed_iso(&seed)?;
    let seed_pool = pool_for(&settings.default_pool, "storage_pools.default")?;
    let seed_name = volume::seed_volume_name(&start_plan.domain_name);
    rollback.volume(&seed_pool.name, &seed_name)?;
    let seed_path = hypervisor.create_volume(
        &seed_pool.name,
        &seed_name,
        VolumeContent::Bytes {
            data: &iso,
            format: ImageFormat::Raw,
        },
    )?;
    crash_point("start:seed");
    disk_specs.push(DiskSpec {
        source: DiskSource::File(seed_path),
        format: "raw".into(),
        target_dev: seed_device,
        bus: bus(seed_bus),
        device: DiskDevice::Cdrom,
        read_only: true,
        boot_order: None,
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
        arch,
        machine,
        disks: disk_specs,
        shares: start_plan
            .shares
            .iter()
            .map(|share| ShareSpec {
                source_dir: share.host_dir.clone(),
                tag: share.tag.clone(),
                read_only: share.read_only,
                driver: ShareDriver::NineP,
            })
            .collect(),
        interfaces: attachments
            .iter()
            .map(|attachment| match attachment {
                Attachment::Network { network, mac, .. } => InterfaceSpec::Network {
                    network: network.clone(),
                    mac: mac.clone(),
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
