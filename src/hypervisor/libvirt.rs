//! The libvirt backend of [`Hypervisor`], on the plugin's shared connection: each method is
//! one call into this module's domain and storage functions.

use std::sync::mpsc::Sender;
use std::time::Duration;

use super::{
    CreatedDisk, DomainCounters, DomainState, HostFacts, Hypervisor, HypervisorError, RbdContent,
    RbdMade, SourceVolumeFacts, VolumeContent,
};
use crate::config::plugin::{CephPool, DirectoryPool};
use crate::libvirt::conn::Connect;
use crate::libvirt::domain_xml::{render_domain_xml, DomainSpec, DomainType};
use crate::libvirt::events::LifecycleEvent;
use crate::libvirt::shares::ShareSupport;
use crate::libvirt::{domain, host, shares, storage, Libvirt, LibvirtError};
use crate::nomad::driver_state::CreatedVolume;
use crate::storage::StorageError;

/// libvirt as the task orchestrator's hypervisor.
#[derive(Clone)]
pub struct LibvirtHypervisor {
    libvirt: Libvirt,
}

impl LibvirtHypervisor {
    pub fn new(libvirt: Libvirt) -> Self {
        Self { libvirt }
    }

    /// Names of every domain libvirt knows, running or not.
    pub fn domain_names(&self) -> Result<Vec<String>, HypervisorError> {
        self.with(|conn| Ok(domain::domain_names(conn)?))
    }

    /// Names of the volumes in a pool (after a refresh); empty when the
    /// pool does not exist.
    pub fn volume_names(&self, pool_name: &str) -> Result<Vec<String>, HypervisorError> {
        self.with(|conn| {
            let Some(pool) = storage::lookup_pool(conn, pool_name)? else {
                return Ok(Vec::new());
            };
            storage::refresh_pool(&pool)?;
            Ok(pool.volume_names()?)
        })
    }

    fn with<T>(
        &self,
        work: impl FnOnce(&Connect) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        let mut outcome = None;
        self.libvirt.call_blocking(|conn| {
            outcome = Some(work(conn));
            Ok(())
        })?;
        outcome
            .unwrap_or_else(|| Err(LibvirtError::Worker("libvirt call did not run".into()).into()))
    }
}

/// A prepared pool by name.
fn pool(conn: &Connect, name: &str) -> Result<storage::Pool, StorageError> {
    storage::lookup_pool(conn, name)?.ok_or_else(|| StorageError::PoolMissing {
        pool: name.to_string(),
    })
}

/// `(pool, volume)` of every `<disk type='volume'>` source in a domain
/// XML, in document order.
pub fn pool_volumes_in_domain_xml(xml: &str) -> Vec<CreatedVolume> {
    let Ok(domain) = crate::libvirt::xml::parse(xml) else {
        return Vec::new();
    };
    domain
        .child("devices")
        .map(|devices| {
            devices
                .children_named("disk")
                .filter(|disk| disk.attr("type") == Some("volume"))
                .filter_map(|disk| {
                    let source = disk.child("source")?;
                    Some(CreatedVolume {
                        pool: source.attr("pool")?.to_string(),
                        name: source.attr("volume")?.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Hypervisor for LibvirtHypervisor {
    fn guest_agent(&self, name: &str) -> Option<crate::guest_agent::GuestAgent> {
        Some(crate::guest_agent::GuestAgent::new(
            self.libvirt.clone(),
            name,
        ))
    }

    fn ping(&self) -> Result<(), HypervisorError> {
        self.with(|_| Ok(()))
    }

    fn host_facts(&self) -> Result<HostFacts, HypervisorError> {
        self.with(|conn| {
            let cpu = domain::host_cpu(conn)?;
            let info = host::host_info(conn)?;
            Ok(HostFacts {
                cpus: cpu.cpus,
                mhz_per_core: cpu.mhz,
                kvm_offered: info.kvm_offered,
            })
        })
    }

    fn share_support(
        &self,
        domain_type: DomainType,
        arch: &str,
        machine: &str,
    ) -> Result<ShareSupport, HypervisorError> {
        self.with(|conn| {
            Ok(shares::share_support(
                conn,
                arch,
                machine,
                domain_type.as_str(),
            )?)
        })
    }

    fn prepare_pool(&self, config: &DirectoryPool) -> Result<(), HypervisorError> {
        self.with(|conn| {
            storage::ensure_directory_pool(conn, &config.name, &config.path)?;
            Ok(())
        })
    }

    fn prepare_ceph_pool(
        &self,
        config: &CephPool,
    ) -> Result<storage::rbd::RbdAccess, HypervisorError> {
        self.with(|conn| Ok(storage::rbd::ensure_rbd_pool(conn, config)?.1))
    }

    fn rbd_source_volume(&self, config: &CephPool, name: &str) -> Result<u64, HypervisorError> {
        self.with(|conn| {
            let pool = pool(conn, &config.name)?;
            let capacity = storage::rbd::rbd_source_volume(&pool, name)?;
            // Whatever its name, an image a domain uses is that domain's disk.
            let spec = storage::rbd::rbd_disk_spec(config, name);
            if let Some(user) = domain::disk_uses(conn)?
                .into_iter()
                .find(|used| used.paths.contains(&spec))
            {
                return Err(StorageError::UnsafeSourceVolume {
                    pool: config.name.clone(),
                    volume: name.to_string(),
                    reason: format!(
                        "domain {:?} uses it as a disk; name a volume no domain uses",
                        user.domain
                    ),
                }
                .into());
            }
            Ok(capacity)
        })
    }

    fn create_rbd_volume(
        &self,
        config: &CephPool,
        name: &str,
        content: RbdContent<'_>,
    ) -> Result<RbdMade, HypervisorError> {
        self.with(|conn| {
            let pool = pool(conn, &config.name)?;
            match content {
                RbdContent::Empty { size } => {
                    storage::rbd::create_rbd_volume(&pool, name, size)?;
                }
                RbdContent::Image {
                    image,
                    image_format,
                    size,
                } => {
                    let volume = storage::rbd::create_rbd_volume(&pool, name, size)?;
                    storage::rbd::write_image(config, &volume, image, image_format)?;
                }
                RbdContent::Shared {
                    image,
                    image_format,
                    parent,
                    size,
                } => {
                    return Ok(storage::rbd::clone_shared_parent(
                        config,
                        &pool,
                        image,
                        image_format,
                        parent,
                        name,
                        size,
                    )?);
                }
                RbdContent::Copy { source, size } => {
                    storage::rbd::copy_rbd_volume(config, &pool, source, name, size)?;
                }
                RbdContent::Clone { parent, size } => {
                    let parent = storage::Volume::lookup(&pool, parent)?;
                    storage::rbd::clone_rbd_volume(&pool, &parent, name, size)?;
                }
            }
            Ok(RbdMade::AsAsked)
        })
    }

    fn pool_available(&self, pool_name: &str) -> Result<u64, HypervisorError> {
        self.with(|conn| {
            let pool = pool(conn, pool_name)?;
            storage::refresh_pool(&pool)?;
            Ok(pool.available()?)
        })
    }

    fn nwfilter_exists(&self, name: &str) -> Result<Option<bool>, HypervisorError> {
        self.with(|conn| Ok(crate::libvirt::network::nwfilter_exists(conn, name)?))
    }

    fn create_volume(
        &self,
        pool_name: &str,
        name: &str,
        content: VolumeContent<'_>,
    ) -> Result<CreatedDisk, HypervisorError> {
        // libvirt's test driver keeps no volume contents and has no stream
        // upload; its domains never read the seed, so an empty volume of the
        // same size stands in. Only `test:` URIs (benchmarks, demos) take this.
        let test_driver = self.libvirt.uri().starts_with("test:");
        self.with(|conn| {
            let pool = pool(conn, pool_name)?;
            let mut backing = None;
            let created = match content {
                VolumeContent::Empty {
                    format,
                    size,
                    sparse,
                } => storage::create_empty_with(&pool, name, format, size, sparse)?,
                VolumeContent::Copy {
                    image,
                    image_format,
                    format,
                    capacity,
                    sparse,
                    cap,
                    progress,
                } => storage::create_from_image_with(
                    conn,
                    &pool,
                    name,
                    image,
                    image_format,
                    format,
                    (capacity, cap),
                    sparse,
                    progress,
                )?,
                VolumeContent::Overlay {
                    image,
                    image_format,
                    capacity,
                    cap,
                    progress,
                } => {
                    let parent = storage::ensure_parent_capped(
                        conn,
                        &pool,
                        image,
                        image_format,
                        cap,
                        progress,
                    )?;
                    backing = Some((parent.path()?, image_format));
                    storage::create_overlay(&pool, name, &parent, image_format, capacity)?
                }
                VolumeContent::Clone {
                    source,
                    format,
                    capacity,
                    sparse,
                } => {
                    let source = storage::source_volume(&pool, source)?;
                    storage::clone_volume(&pool, name, &source, format, capacity, sparse)?
                }
                VolumeContent::VolumeOverlay { source, capacity } => {
                    let source = storage::source_volume(&pool, source)?;
                    backing = Some((source.volume.path()?, source.format));
                    storage::create_overlay(&pool, name, &source.volume, source.format, capacity)?
                }
                VolumeContent::Bytes { data, format } if test_driver => {
                    storage::create_empty(&pool, name, format, data.len() as u64)?
                }
                VolumeContent::Bytes { data, format } => {
                    storage::upload_bytes(conn, &pool, name, data, format)?
                }
            };
            Ok(CreatedDisk {
                path: created.path()?,
                backing,
            })
        })
    }

    fn source_volume(
        &self,
        pool_name: &str,
        name: &str,
    ) -> Result<SourceVolumeFacts, HypervisorError> {
        self.with(|conn| {
            let source = storage::source_volume(&pool(conn, pool_name)?, name)?;
            // Whatever its name, a volume a domain reads or writes is that
            // domain's disk: cloning it would hand its data to this job.
            let path = source.path.to_string_lossy();
            let key = (pool_name.to_string(), name.to_string());
            if let Some(user) = domain::disk_uses(conn)?.into_iter().find(|used| {
                used.paths.iter().any(|p| *p == path) || used.pool_volumes.contains(&key)
            }) {
                return Err(StorageError::UnsafeSourceVolume {
                    pool: pool_name.to_string(),
                    volume: name.to_string(),
                    reason: format!(
                        "domain {:?} uses it as a disk; name a volume no domain uses",
                        user.domain
                    ),
                }
                .into());
            }
            Ok(SourceVolumeFacts {
                format: source.format,
                capacity: source.capacity,
            })
        })
    }

    fn os_defaults(
        &self,
        arch: Option<&str>,
        machine: Option<&str>,
        virt_type: &str,
    ) -> Result<Result<host::OsDefaults, String>, HypervisorError> {
        self.with(|conn| Ok(host::os_defaults(conn, arch, machine, virt_type)?))
    }

    fn delete_volume(&self, created: &CreatedVolume) -> Result<(), HypervisorError> {
        self.with(|conn| {
            // RBD images go with their snapshots (a clone's parent has one).
            if let Ok(Some(pool)) = storage::lookup_pool(conn, &created.pool) {
                if storage::rbd::is_rbd_pool(&pool) {
                    storage::rbd::start_if_stopped(&pool);
                    let _ = storage::refresh_pool(&pool);
                    return Ok(storage::rbd::delete_rbd_volume(&pool, &created.name)?);
                }
            }
            Ok(storage::delete_created_volume(
                conn,
                &created.pool,
                &created.name,
            )?)
        })
    }

    fn prune_unused_parents(
        &self,
        pools: &[String],
        idle: Duration,
    ) -> Result<Vec<String>, HypervisorError> {
        self.with(|conn| Ok(storage::prune_pools(conn, pools, idle)))
    }

    fn domain_owner(&self, name: &str) -> Result<Option<String>, HypervisorError> {
        self.with(|conn| Ok(domain::domain_owner(conn, name)?))
    }

    fn define_domain(&self, spec: &DomainSpec) -> Result<(), HypervisorError> {
        let xml = render_domain_xml(spec)?;
        self.with(|conn| Ok(domain::define_domain(conn, &spec.name, &xml)?))
    }

    fn start_domain(&self, name: &str) -> Result<(), HypervisorError> {
        self.with(|conn| Ok(domain::start_domain(conn, name)?))
    }

    fn domain_state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError> {
        self.with(|conn| {
            Ok(
                domain::domain_status(conn, name)?.map(|status| DomainState {
                    state: status.state,
                    reason: status.reason,
                }),
            )
        })
    }

    fn request_shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        self.with(|conn| Ok(domain::shutdown_domain(conn, name)?))
    }

    fn power_off(&self, name: &str) -> Result<(), HypervisorError> {
        self.with(|conn| Ok(domain::destroy_domain(conn, name)?))
    }

    fn remove_domain(&self, name: &str) -> Result<(), HypervisorError> {
        self.with(|conn| Ok(domain::remove_domain(conn, name)?))
    }

    fn domain_pool_volumes(
        &self,
        name: &str,
    ) -> Result<Option<Vec<CreatedVolume>>, HypervisorError> {
        self.with(|conn| {
            Ok(domain::domain_xml(conn, name)?.map(|xml| pool_volumes_in_domain_xml(&xml)))
        })
    }

    fn counters(&self, name: &str) -> Result<Option<DomainCounters>, HypervisorError> {
        self.with(|conn| {
            Ok(
                domain::sample_domain(conn, name)?.map(|sample| DomainCounters {
                    cpu_time_ns: sample.cpu_time_ns,
                    vcpus: sample.vcpus,
                    memory: sample.memory,
                }),
            )
        })
    }

    fn subscribe_events(&self, sink: Sender<LifecycleEvent>) {
        self.libvirt.subscribe_events(sink);
    }

    fn connection_generation(&self) -> u64 {
        self.libvirt.generation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_volumes_come_from_volume_disks_only() {
        let xml = "<domain type='kvm'><devices>\
            <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>\
            <source pool='p1' volume='web-1_vda.img' index='2'/><target dev='vda'/></disk>\
            <disk type='file' device='disk'><source file='/x/y.img'/></disk>\
            <disk type=\"volume\" device=\"cdrom\"><source pool=\"p&amp;2\" volume=\"web-1_sda.img\"/></disk>\
            <disk type='block' device='disk'><source dev='/dev/vdb'/></disk>\
            <filesystem type='mount'><source dir='/a'/></filesystem>\
            </devices></domain>";
        assert_eq!(
            pool_volumes_in_domain_xml(xml),
            vec![
                CreatedVolume {
                    pool: "p1".into(),
                    name: "web-1_vda.img".into()
                },
                CreatedVolume {
                    pool: "p&2".into(),
                    name: "web-1_sda.img".into()
                },
            ]
        );
        assert!(pool_volumes_in_domain_xml("<domain/>").is_empty());
    }
}
