//! StartTask: plan, create volumes and the seed, define and start the
//! domain; on any failure remove everything created so far.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::libvirt::conn::Connect;

use super::error::TaskError;
use super::plan::{self, GuestShare};
use crate::cloudinit::docs::{render, CloudInitInput};
use crate::cloudinit::iso::build_seed_iso;
use crate::cloudinit::password::random_salt;
use crate::config::plugin::{DirectoryPool, Settings};
use crate::config::task::{hostname_from_task_name, DiskConfig, TaskConfig};
use crate::libvirt::domain_xml::{
    render_domain_xml, DiskBus, DiskDevice, DiskSource, DiskSpec, DomainMetadata, DomainSpec,
    DomainType, InterfaceSpec, ShareDriver, ShareSpec,
};
use crate::libvirt::storage::{self as lv_storage, Pool};
use crate::libvirt::{domain, host};
use crate::net::{AllocatedPort, Attachment, Net};
use crate::nomad::driver_state::CreatedVolume;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::TaskConfig as NomadTaskConfig;
use crate::storage::images::ImageFormat;
use crate::storage::{images, volume};

/// Everything a start created, so a failure can undo it.
#[derive(Debug, Default)]
pub struct Created {
    pub volumes: Vec<CreatedVolume>,
    pub domain: Option<String>,
}

/// What the start produced.
pub struct Started {
    pub domain_name: String,
    pub hostname: String,
    pub hwaddrs: Vec<String>,
    pub volumes: Vec<CreatedVolume>,
    pub console_log: PathBuf,
}

/// Inputs resolved before touching libvirt.
pub struct StartPlan {
    pub domain_name: String,
    pub hostname: String,
    pub shares: Vec<GuestShare>,
    pub block_devices: Vec<PathBuf>,
    pub images: Vec<Option<PathBuf>>,
    pub user_data: Option<String>,
    pub console_log: PathBuf,
    /// MAC of each `network_interface`, in order.
    pub hwaddrs: Vec<String>,
}

/// Checks the parts of the request that need the file system but not
/// libvirt: images against the allow-list, user data, shares.
pub fn prepare(
    task: &NomadTaskConfig,
    config: &TaskConfig,
    settings: &Settings,
) -> Result<StartPlan, TaskError> {
    let domain_name = plan::domain_name(&task.name, &task.id);
    let hostname = config
        .hostname
        .clone()
        // Unique per task (like the domain name), so count > 1 does not clash.
        .unwrap_or_else(|| hostname_from_task_name(&domain_name));
    let alloc_dir = PathBuf::from(&task.alloc_dir);
    if task.alloc_dir.is_empty() || !alloc_dir.is_absolute() {
        return Err(TaskError::Invalid(format!(
            "alloc_dir {:?} is not an absolute path",
            task.alloc_dir
        )));
    }
    let task_dir = alloc_dir.join(&task.name);
    let disks = config.disk.as_deref().unwrap_or_default();
    if disks.is_empty() {
        return Err(TaskError::Invalid(
            "disk: a VM needs at least one disk block, e.g. disk { source { image = \"debian-12.qcow2\" } }".into(),
        ));
    }
    let mut images_found = Vec::new();
    for (index, disk) in disks.iter().enumerate() {
        match disk
            .source
            .as_ref()
            .and_then(|source| source.image.as_deref())
        {
            Some(image) => {
                let path =
                    images::resolve_image(image, &settings.image_paths, &alloc_dir, &task_dir)
                        .map_err(|error| error.in_field(format!("disk[{index}].source.image")))?;
                images_found.push(Some(path));
            }
            None => images_found.push(None),
        }
    }
    let user_data = match config.user_data.as_deref() {
        None => None,
        Some(text) if looks_inline(text) => Some(text.to_string()),
        Some(path) => {
            let resolved =
                images::resolve_image(path, &settings.image_paths, &alloc_dir, &task_dir)
                    .map_err(|error| error.in_field("user_data"))?;
            Some(std::fs::read_to_string(&resolved).map_err(|error| {
                TaskError::Invalid(format!(
                    "user_data: cannot read {}: {error}",
                    resolved.display()
                ))
            })?)
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
    for (index, mount) in task.mounts.iter().enumerate() {
        if mount.host_path.starts_with("/dev/") {
            block_devices.push(PathBuf::from(&mount.host_path));
        } else {
            if !mount.task_path.starts_with('/') {
                return Err(TaskError::Invalid(format!(
                    "volume_mount {index}: destination {:?} must be an absolute guest path",
                    mount.task_path
                )));
            }
            shares.push(GuestShare {
                host_dir: PathBuf::from(&mount.host_path),
                tag: format!("vol{index}"),
                guest_path: mount.task_path.clone(),
                read_only: mount.readonly,
            });
        }
    }
    let console_log = task_dir.join("virt-console.log");
    let interfaces = config.network_interface.as_ref().map_or(0, Vec::len);
    let hwaddrs = (0..interfaces)
        .map(|index| crate::net::mac_for(&task.id, index))
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

/// The group ports Nomad allocated, as the network module wants them.
pub fn allocated_ports(task: &NomadTaskConfig) -> Vec<AllocatedPort> {
    task.resources
        .as_ref()
        .map(|resources| {
            resources
                .ports
                .iter()
                .map(|port| AllocatedPort {
                    label: port.label.clone(),
                    value: u16::try_from(port.value).unwrap_or(0),
                    to: u16::try_from(port.to).unwrap_or(0),
                    host_ip: port.host_ip.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Inline cloud-config or script rather than a file name.
fn looks_inline(text: &str) -> bool {
    text.trim_start().starts_with('#') || text.contains('\n')
}

fn bus(name: &str) -> DiskBus {
    match name {
        "sata" => DiskBus::Sata,
        "scsi" => DiskBus::Scsi,
        "ide" => DiskBus::Ide,
        "usb" => DiskBus::Usb,
        _ => DiskBus::Virtio,
    }
}

/// Creates volumes, the seed and the domain, and starts it. Runs on a
/// blocking thread. `created` is filled as things are made, so the caller can
/// roll back whatever exists if this fails.
#[allow(clippy::too_many_arguments)]
pub fn create_and_boot(
    conn: &Connect,
    task: &NomadTaskConfig,
    config: &TaskConfig,
    settings: &Settings,
    start_plan: &StartPlan,
    created: &Arc<Mutex<Created>>,
    net: &dyn Net,
    progress: &dyn Fn(&str),
) -> Result<Started, TaskError> {
    let record_volume = |pool: &str, name: &str| {
        if let Ok(mut created) = created.lock() {
            created.volumes.push(CreatedVolume {
                pool: pool.to_string(),
                name: name.to_string(),
            });
        }
    };
    let node = domain::host_cpu(conn)?;
    let info = host::host_info(conn)?;
    let resources = task.resources.as_ref();
    let allocated = resources.and_then(|r| r.allocated_resources.as_ref());
    let memory = allocated.and_then(|a| a.memory.as_ref());
    let vm = plan::vm_resources(
        memory.map_or(0, |m| m.memory_mb),
        memory.map_or(0, |m| m.memory_max_mb),
        allocated
            .and_then(|a| a.cpu.as_ref())
            .map_or(0, |c| c.cpu_shares),
        resources
            .and_then(|r| r.linux_resources.as_ref())
            .map_or("", |l| l.cpuset_cpus.as_str()),
        u64::from(node.mhz),
        node.cpus,
    )
    .map_err(TaskError::Invalid)?;
    let domain_type = match host::choose_accelerator(
        settings.accelerator,
        info.kvm_offered,
        host::kvm_device_usable(),
    ) {
        "kvm" => DomainType::Kvm,
        _ => DomainType::Qemu,
    };

    let os = config.os.clone().unwrap_or_default();
    let arch = os.arch.unwrap_or_else(|| "x86_64".into());
    let machine = os.machine.unwrap_or_else(|| "pc".into());
    let seed_bus = if machine.contains("q35") {
        "sata"
    } else {
        "ide"
    };
    let disks: &[DiskConfig] = config.disk.as_deref().unwrap_or_default();
    let (device_names, seed_device) =
        plan::device_names(disks, seed_bus).map_err(TaskError::Invalid)?;

    let net_config = config.network_interface.clone().unwrap_or_default();
    let attachments = net.attachments(&net_config, &allocated_ports(task), &start_plan.hwaddrs)?;

    // Each pool is looked up (and refreshed) once per start, not per disk.
    let mut pools: HashMap<String, Pool> = HashMap::new();
    let mut pool_for = |config: &DirectoryPool| -> Result<Pool, TaskError> {
        if let Some(found) = pools.get(&config.name) {
            return Ok(found.clone());
        }
        let found = lv_storage::ensure_directory_pool(conn, &config.name, &config.path)?;
        pools.insert(config.name.clone(), found.clone());
        Ok(found)
    };

    progress("Preparing disks");
    let mut disk_specs = Vec::new();
    for (index, disk) in disks.iter().enumerate() {
        let pool_name = disk
            .pool
            .clone()
            .unwrap_or_else(|| settings.default_pool.clone());
        let pool_config = settings.pools.iter().find(|p| p.name == pool_name).ok_or_else(|| {
            TaskError::Invalid(format!(
                "disk[{index}].pool: {pool_name:?} is not a configured storage pool; configured: {}",
                settings.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let storage_pool = pool_for(pool_config)?;
        let device = device_names[index].clone();
        let target_format = disk.format.clone().unwrap_or_else(|| "qcow2".into());
        let format: ImageFormat = target_format.parse().map_err(TaskError::Invalid)?;
        let capacity = disk.size.map(|size| size.0);
        let field = format!("disk[{index}]");
        let path = if let Some(image) = &start_plan.images[index] {
            let source_format = images::detect_format(image)
                .map_err(|e| e.in_field(format!("{field}.source.image")))?;
            let name = volume::disk_volume_name(&start_plan.domain_name, &device, format);
            let created_volume = if disk.chained == Some(true) {
                let parent = lv_storage::ensure_parent(conn, &storage_pool, image, source_format)?;
                record_volume(&pool_name, &name);
                lv_storage::create_overlay(&storage_pool, &name, &parent, source_format, capacity)?
            } else {
                record_volume(&pool_name, &name);
                lv_storage::create_from_image(
                    conn,
                    &storage_pool,
                    &name,
                    image,
                    source_format,
                    format,
                    capacity,
                )?
            };
            created_volume.path()?
        } else if let Some(existing) = disk.source.as_ref().and_then(|s| s.volume.as_deref()) {
            // An existing volume belongs to the operator: used, never deleted.
            lv_storage::existing_path(&storage_pool, existing)
                .map_err(|e| e.in_field(format!("{field}.source.volume")))?
        } else {
            let name = volume::disk_volume_name(&start_plan.domain_name, &device, format);
            let size = capacity.ok_or_else(|| {
                TaskError::Invalid(format!("{field}.size: is required for an empty disk"))
            })?;
            record_volume(&pool_name, &name);
            let created_volume = lv_storage::create_empty(&storage_pool, &name, format, size)?;
            created_volume.path()?
        };
        let cdrom = disk.kind.as_deref() == Some("cdrom");
        disk_specs.push(DiskSpec {
            source: DiskSource::File(path),
            format: if disk
                .source
                .as_ref()
                .and_then(|s| s.volume.as_ref())
                .is_some()
            {
                disk.format.clone().unwrap_or_else(|| "qcow2".into())
            } else {
                target_format
            },
            target_dev: device,
            bus: bus(&plan::default_bus(disk)),
            device: if cdrom {
                DiskDevice::Cdrom
            } else {
                DiskDevice::Disk
            },
            read_only: disk.read_only == Some(true) || cdrom,
            // The primary disk boots first; without one, the first disk does.
            boot_order: (disk.primary == Some(true)).then_some(1),
        });
    }
    for (index, block) in start_plan.block_devices.iter().enumerate() {
        disk_specs.push(DiskSpec {
            source: DiskSource::Block(block.clone()),
            format: "raw".into(),
            target_dev: format!("vd{}", char::from(b'p' + index as u8)),
            bus: DiskBus::Virtio,
            device: DiskDevice::Disk,
            read_only: false,
            boot_order: None,
        });
    }

    progress("Building cloud-init seed");
    let env: BTreeMap<String, String> = task
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let seed = render(
        &CloudInitInput {
            instance_id: start_plan.domain_name.clone(),
            hostname: start_plan.hostname.clone(),
            user_data: start_plan.user_data.clone(),
            default_user_password: config.default_user_password.clone(),
            ssh_authorized_key: config.default_user_authorized_ssh_key.clone(),
            cmds: config.cmds.clone().unwrap_or_default(),
            bootcmds: plan::mount_commands(&start_plan.shares),
            timezone: config.timezone.clone(),
            env,
        },
        random_salt()?,
    )?;
    let iso = build_seed_iso(&seed)?;
    let default_pool = settings
        .pools
        .iter()
        .find(|p| p.name == settings.default_pool)
        .ok_or_else(|| {
            TaskError::Invalid(format!(
                "storage_pools.default {:?} is not configured",
                settings.default_pool
            ))
        })?;
    let seed_pool = pool_for(default_pool)?;
    let seed_name = volume::seed_volume_name(&start_plan.domain_name);
    record_volume(&default_pool.name, &seed_name);
    let seed_volume =
        lv_storage::upload_bytes(conn, &seed_pool, &seed_name, &iso, ImageFormat::Raw)?;
    disk_specs.push(DiskSpec {
        source: DiskSource::File(seed_volume.path()?),
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
            task_id: task.id.clone(),
            alloc_id: task.alloc_id.clone(),
            task_name: task.name.clone(),
            plugin_version: crate::driver::PLUGIN_VERSION.into(),
        },
    };
    let xml = render_domain_xml(&spec)?;
    domain::define_domain(conn, &start_plan.domain_name, &xml)?;
    if let Ok(mut created) = created.lock() {
        created.domain = Some(start_plan.domain_name.clone());
    }
    domain::start_domain(conn, &start_plan.domain_name)?;
    let volumes = created
        .lock()
        .map(|c| c.volumes.clone())
        .unwrap_or_default();
    Ok(Started {
        domain_name: start_plan.domain_name.clone(),
        hostname: start_plan.hostname.clone(),
        hwaddrs: start_plan.hwaddrs.clone(),
        volumes,
        console_log: start_plan.console_log.clone(),
    })
}

/// Removes what a failed start created. Best effort: every step is tried.
pub fn roll_back(conn: &Connect, created: &Created) {
    if let Some(name) = &created.domain {
        super::teardown::remove_domain(conn, name);
    }
    for created_volume in created.volumes.iter().rev() {
        if let Err(error) = super::teardown::delete_volume(conn, created_volume) {
            tracing::warn!(error = %error, volume = %created_volume.name, "rollback could not delete a volume");
        }
    }
}
