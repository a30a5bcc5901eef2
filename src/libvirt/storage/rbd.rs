//! Ceph RBD storage pools: a libvirt secret holding the cephx key, an
//! `rbd` pool on the Ceph pool, and the volumes of task disks in it.
//!
//! libvirt's rbd backend (9.0) has no volume upload, so images are written
//! by qemu-img through librbd ([`crate::storage::qemu_img::write_to_rbd`]),
//! and domains cannot use `<disk type='volume'>` on an rbd pool: the disk
//! is a network disk the driver writes itself ([`RbdAccess`]).

use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::{has_code, Pool, Volume};
use crate::config::plugin::{CephHost, CephPool};
use crate::libvirt::xml::{self, XmlWriter};
use crate::storage::images::{ImageFile, ImageFormat};
use crate::storage::qemu_img::{self, RbdTarget};
use crate::storage::volume::{unique_suffix, TempFile};
use crate::storage::StorageError;

/// How long one monitor may take to accept a TCP connection before the
/// pool is reported unreachable (libvirt itself would wait 30 s per start).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a domain's RBD network disk needs: no key, only the secret's UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdAccess {
    pub ceph_pool: String,
    pub hosts: Vec<CephHost>,
    pub username: String,
    pub secret_uuid: String,
}

/// The usage name of the pool's libvirt secret: the pool's name, as the Go
/// driver names it (so a host moving from Go reuses its secret).
pub fn secret_usage(pool: &str) -> String {
    pool.to_string()
}

/// The XML of the pool's secret: persistent, private (libvirt never hands
/// the value out again), usage `ceph`.
pub(crate) fn secret_xml(uuid: Option<&str>, usage: &str) -> String {
    let mut w = XmlWriter::new();
    w.open("secret", &[("ephemeral", "no"), ("private", "yes")]);
    if let Some(uuid) = uuid {
        w.text("uuid", &[], uuid);
    }
    w.text(
        "description",
        &[],
        &format!("nomad-driver-virt: cephx key of storage pool {usage}"),
    );
    w.open("usage", &[("type", "ceph")]);
    w.text("name", &[], usage);
    w.close("usage");
    w.close("secret");
    w.finish(true)
}

/// The XML of the libvirt `rbd` pool for `pool`.
pub(crate) fn rbd_pool_xml(pool: &CephPool, secret_uuid: &str, uuid: Option<&str>) -> String {
    let mut w = XmlWriter::new();
    w.open("pool", &[("type", "rbd")]);
    w.text("name", &[], &pool.name);
    if let Some(uuid) = uuid {
        w.text("uuid", &[], uuid);
    }
    w.open("source", &[]);
    w.text("name", &[], &pool.pool);
    for host in &pool.hosts {
        write_host(&mut w, host);
    }
    w.open("auth", &[("type", "ceph"), ("username", &pool.username)]);
    w.empty("secret", &[("uuid", secret_uuid)]);
    w.close("auth");
    w.close("source");
    w.close("pool");
    w.finish(true)
}

/// `<host name=… port=…/>` (no port: librados picks the defaults).
pub(crate) fn write_host(w: &mut XmlWriter, host: &CephHost) {
    match host.port {
        Some(port) => w.empty("host", &[("name", &host.name), ("port", &port.to_string())]),
        None => w.empty("host", &[("name", &host.name)]),
    }
}

/// Creates or updates the pool's secret (found by its usage name) and sets
/// its value through the API; returns its UUID. Idempotent.
pub fn ensure_secret(conn: &Connect, pool: &CephPool) -> Result<String, StorageError> {
    let usage = secret_usage(&pool.name);
    let fail = |action: &str, error: virt::error::Error| {
        StorageError::pool(
            &pool.name,
            format!("{action} (libvirt secret {usage:?})"),
            error,
        )
    };
    let key = pool
        .key
        .decoded()
        .ok_or_else(|| unavailable(pool, "the key is not base64"))?;
    let usage_type = virt::sys::VIR_SECRET_USAGE_TYPE_CEPH as i32;
    let secret = match conn.lookup_secret_by_usage(usage_type, &usage) {
        Ok(secret) => secret,
        Err(error) if has_code(&error, ErrorNumber::NoSecret) => {
            match conn.define_secret_xml(&secret_xml(None, &usage), 0) {
                Ok(secret) => secret,
                // Another process defined it meanwhile.
                Err(define_error) => conn
                    .lookup_secret_by_usage(usage_type, &usage)
                    .map_err(|_| fail("defining the secret", define_error))?,
            }
        }
        Err(error) => return Err(fail("looking up the secret", error)),
    };
    secret
        .set_value(&key, 0)
        .map_err(|e| fail("setting the secret's value", e))?;
    secret
        .uuid_string()
        .map_err(|e| fail("reading the secret's UUID", e))
}

/// Looks up the rbd pool, defining it (and its secret) when missing or
/// when the config changed, and starts it. An unreachable cluster or a
/// refused key is [`StorageError::CephUnavailable`], after at most a few
/// seconds when no monitor answers (libvirt alone would wait 30 s).
pub fn ensure_rbd_pool(
    conn: &Connect,
    config: &CephPool,
) -> Result<(Pool, RbdAccess), StorageError> {
    let name = &config.name;
    // First, and cheap (a TCP connect): a silent cluster fails within
    // seconds instead of libvirt's 30 s, and nothing is defined for it.
    probe_monitors(config)?;
    let (pool, secret_uuid) = define_secret_and_pool(conn, config)?;
    let active = pool
        .is_active()
        .map_err(|e| StorageError::pool(name, "checking whether the pool is active", e))?;
    if !active {
        if let Err(error) = pool.create(0) {
            if !pool.is_active().unwrap_or(false) {
                // libvirt's text ends in an unrelated strerror ("No such
                // file or directory"): logged, not shown as the cause.
                tracing::warn!(pool = %name, error = %error.message(), "libvirt could not start the rbd pool");
                return Err(unavailable(
                    config,
                    &format!(
                        "the monitors accept connections but libvirt could not connect to the \
                         cluster: the cephx user or key was refused, or the Ceph pool is missing \
                         or not open to the user; check storage_pools.ceph.{name}.authentication \
                         (username and secret) and storage_pools.ceph.{name}.pool"
                    ),
                ));
            }
        }
    } else if let Err(error) = super::pool::retry_busy(|| pool.refresh(0)) {
        // A refresh failure stops the pool in libvirt: the cluster went away
        // or the key was revoked.
        probe_monitors(config)?;
        return Err(unavailable(
            config,
            &format!("libvirt could not refresh the pool ({})", error.message()),
        ));
    }
    Ok((
        Pool::new(pool, name),
        RbdAccess {
            ceph_pool: config.pool.clone(),
            hosts: config.hosts.clone(),
            username: config.username.clone(),
            secret_uuid,
        },
    ))
}

/// Finds or defines the pool's secret and the libvirt pool (redefined when
/// the config changed); returns the pool, not started, and the secret's
/// UUID.
fn define_secret_and_pool(
    conn: &Connect,
    config: &CephPool,
) -> Result<(StoragePool, String), StorageError> {
    let name = &config.name;
    // Starts run in parallel: two first starts on this pool would both find
    // no secret (or pool) and both define one, and the second definition
    // fails. Held only for these quick definitions, not while the pool
    // starts or refreshes (which waits on the cluster). Another plugin
    // process is covered by looking up again after a failed definition.
    let setup = named_lock(format!("setup:{name}"));
    let _setting_up = setup
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let secret_uuid = ensure_secret(conn, config)?;
    let pool = match conn.lookup_storage_pool_by_name(name) {
        Ok(pool) => {
            if !matches_config(&pool, config, &secret_uuid)? {
                // Redefine with the new hosts/pool/user: stop it first, as
                // libvirt keeps the running definition until then.
                if pool.is_active().unwrap_or(false) {
                    pool.destroy().map_err(|e| {
                        StorageError::pool(name, "stopping the pool to update it", e)
                    })?;
                }
                // Same UUID, or libvirt refuses the definition.
                let uuid = pool
                    .uuid_string()
                    .map_err(|e| StorageError::pool(name, "reading the pool UUID", e))?;
                tracing::info!(pool = %name, "updating the rbd pool to the plugin config");
                conn_define(conn, name, &rbd_pool_xml(config, &secret_uuid, Some(&uuid)))?
            } else {
                pool
            }
        }
        Err(error) if has_code(&error, ErrorNumber::NoStoragePool) => {
            match conn_define(conn, name, &rbd_pool_xml(config, &secret_uuid, None)) {
                Ok(pool) => {
                    if let Err(error) = pool.set_autostart(true) {
                        tracing::warn!(pool = %name, error = %error, "could not mark the storage pool autostart");
                    }
                    pool
                }
                // Another process defined it meanwhile.
                Err(define_error) => conn
                    .lookup_storage_pool_by_name(name)
                    .map_err(|_| define_error)?,
            }
        }
        Err(error) => return Err(StorageError::pool(name, "looking up the pool", error)),
    };
    Ok((pool, secret_uuid))
}

fn conn_define(conn: &Connect, name: &str, xml: &str) -> Result<StoragePool, StorageError> {
    conn.define_storage_pool_xml(xml, 0)
        .map_err(|e| StorageError::pool(name, "defining the rbd pool", e))
}

/// Whether libvirt's definition of `pool` is the config's (type, Ceph
/// pool, hosts, user, secret). Another type is an error.
fn matches_config(
    pool: &StoragePool,
    config: &CephPool,
    secret_uuid: &str,
) -> Result<bool, StorageError> {
    let name = &config.name;
    let text = pool
        .xml_desc(virt::sys::VIR_STORAGE_XML_INACTIVE)
        .map_err(|e| StorageError::pool(name, "reading the pool XML", e))?;
    let root = xml::parse(&text).map_err(|source| StorageError::PoolXml {
        pool: name.clone(),
        source: Box::new(source),
    })?;
    let pool_type = root.attr("type").unwrap_or_default();
    if pool_type != "rbd" {
        return Err(StorageError::CephPoolType {
            pool: name.clone(),
            pool_type: pool_type.to_string(),
        });
    }
    // Compare with what we would define, parsed the same way.
    let wanted = xml::parse(&rbd_pool_xml(config, secret_uuid, None)).map_err(|source| {
        StorageError::PoolXml {
            pool: name.clone(),
            source: Box::new(source),
        }
    })?;
    let summary = |root: &xml::Element| {
        let source = root.child("source");
        let hosts: Vec<(String, String)> = source
            .map(|s| {
                s.children_named("host")
                    .map(|h| {
                        (
                            h.attr("name").unwrap_or_default().to_string(),
                            h.attr("port").unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let auth = source.and_then(|s| s.child("auth"));
        (
            root.text_at(&["source", "name"]),
            hosts,
            auth.and_then(|a| a.attr("username")).map(str::to_string),
            auth.and_then(|a| a.child("secret"))
                .and_then(|s| s.attr("uuid"))
                .map(str::to_string),
        )
    };
    Ok(summary(&root) == summary(&wanted))
}

/// Fails fast with a clear message when none of the monitors accepts a TCP
/// connection within [`PROBE_TIMEOUT`].
pub fn probe_monitors(config: &CephPool) -> Result<(), StorageError> {
    let mut tried = Vec::new();
    for host in &config.hosts {
        // Without a port librados tries msgr2 (3300) then v1 (6789).
        let ports: &[u16] = match host.port {
            Some(port) => &[port][..],
            None => &[3300, 6789],
        };
        for port in ports {
            let addrs = match (host.name.as_str(), *port).to_socket_addrs() {
                Ok(addrs) => addrs.collect::<Vec<_>>(),
                Err(error) => {
                    tried.push(format!("{}: {error}", host.name));
                    continue;
                }
            };
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
                    Ok(_) => return Ok(()),
                    Err(error) => tried.push(format!("{addr}: {error}")),
                }
            }
        }
    }
    Err(unavailable(
        config,
        &format!(
            "no Ceph monitor answers ({}); check storage_pools.ceph.{}.hosts and that the \
             cluster is up and reachable from this host",
            tried.join("; "),
            config.name
        ),
    ))
}

fn unavailable(config: &CephPool, problem: &str) -> StorageError {
    StorageError::CephUnavailable {
        pool: config.name.clone(),
        ceph_pool: config.pool.clone(),
        hosts: hosts_text(&config.hosts),
        username: config.username.clone(),
        problem: problem.to_string(),
    }
}

/// `a:3300, b` for messages.
pub fn hosts_text(hosts: &[CephHost]) -> String {
    hosts
        .iter()
        .map(|host| match (host.port, host.name.contains(':')) {
            (Some(port), true) => format!("[{}]:{port}", host.name),
            (Some(port), false) => format!("{}:{port}", host.name),
            (None, _) => host.name.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The XML of a raw RBD volume (RBD images are always sparse).
pub(crate) fn rbd_volume_xml(name: &str, capacity: u64) -> String {
    let mut w = XmlWriter::new();
    w.open("volume", &[]);
    w.text("name", &[], name);
    w.text("capacity", &[("unit", "bytes")], &capacity.to_string());
    w.open("target", &[]);
    w.empty("format", &[("type", "raw")]);
    w.close("target");
    w.close("volume");
    w.finish(true)
}

/// Creates an empty raw RBD image of `capacity` bytes.
pub fn create_rbd_volume(pool: &Pool, name: &str, capacity: u64) -> Result<Volume, StorageError> {
    crate::storage::volume::check_volume_name(name)?;
    match StorageVol::create_xml(&pool.inner, &rbd_volume_xml(name, capacity), 0) {
        Ok(vol) => Ok(Volume::new(vol, &pool.name, name)),
        Err(error) if pool.inner.lookup_storage_vol_by_name(name).is_ok() => {
            tracing::debug!(error = %error.message(), "rbd volume exists");
            Err(StorageError::VolumeExists {
                pool: pool.name.clone(),
                volume: name.to_string(),
            })
        }
        Err(error) => Err(StorageError::volume(
            &pool.name,
            name,
            "creating the RBD image",
            error,
        )),
    }
}

/// Writes `image` into the new (all zero) RBD volume `volume`, sparsely.
pub fn write_image(
    config: &CephPool,
    volume: &Volume,
    image: &ImageFile,
    format: ImageFormat,
) -> Result<(), StorageError> {
    let capacity = volume.capacity()?;
    let key_file = key_file(config)?;
    let hosts = config
        .hosts
        .iter()
        .map(|host| (host.name.as_str(), host.port.unwrap_or(0)))
        .collect();
    qemu_img::write_to_rbd(
        image,
        format,
        &RbdTarget {
            ceph_pool: &config.pool,
            image: volume.name(),
            username: &config.username,
            hosts,
            key_file: &key_file.path,
        },
        capacity,
    )
}

/// A COW clone of `parent` (libvirt snapshots and protects the parent,
/// then `rbd clone`s it), grown to `capacity` when that is larger.
pub fn clone_rbd_volume(
    pool: &Pool,
    parent: &Volume,
    name: &str,
    capacity: u64,
) -> Result<Volume, StorageError> {
    crate::storage::volume::check_volume_name(name)?;
    let parent_capacity = parent.capacity()?;
    let xml = rbd_volume_xml(name, parent_capacity);
    let vol = StorageVol::create_xml_from(&pool.inner, &xml, &parent.inner, 0)
        .map_err(|e| StorageError::volume(&pool.name, name, "cloning the RBD image", e))?;
    if capacity > parent_capacity {
        vol.resize(capacity, 0)
            .map_err(|e| StorageError::volume(&pool.name, name, "growing the RBD image", e))?;
    }
    Ok(Volume::new(vol, &pool.name, name))
}

/// Checks an operator's RBD image a job names as `source.volume` (only
/// read: copied, or cloned when chained): a plain name that is not one of
/// the driver's own and present in the pool (the caller checks that no
/// domain uses it: [`rbd_disk_spec`]). Returns its capacity.
pub fn rbd_source_volume(pool: &Pool, name: &str) -> Result<u64, StorageError> {
    crate::storage::volume::check_volume_name(name)?;
    if crate::storage::volume::is_driver_volume_name(name) {
        return Err(StorageError::DriverOwnedVolume {
            pool: pool.name.clone(),
            volume: name.to_string(),
        });
    }
    if !crate::config::plugin::is_ceph_name(name) {
        return Err(StorageError::UnsafeSourceVolume {
            pool: pool.name.clone(),
            volume: name.to_string(),
            reason: "an RBD image name here may use letters, digits, '-', '_' and '.'".into(),
        });
    }
    let _ = super::pool::retry_busy(|| pool.inner.refresh(0));
    let volume = Volume::lookup(pool, name)?;
    volume.capacity()
}

/// How a domain's disk names RBD image `name` of `config`'s Ceph pool in
/// [`crate::libvirt::domain::DiskUse::paths`].
pub fn rbd_disk_spec(config: &CephPool, name: &str) -> String {
    format!("rbd:{}/{name}", config.pool)
}

/// A full, independent copy of RBD image `source` (Go flattens a clone;
/// qemu-img copies through librbd, skipping zeroes), `capacity` bytes.
pub fn copy_rbd_volume(
    config: &CephPool,
    pool: &Pool,
    source: &str,
    name: &str,
    capacity: u64,
) -> Result<Volume, StorageError> {
    let source_volume = Volume::lookup(pool, source)?;
    let capacity = capacity.max(source_volume.capacity()?);
    let volume = create_rbd_volume(pool, name, capacity)?;
    let key_file = key_file(config)?;
    let target = |image| RbdTarget {
        ceph_pool: &config.pool,
        image,
        username: &config.username,
        hosts: config
            .hosts
            .iter()
            .map(|host| (host.name.as_str(), host.port.unwrap_or(0)))
            .collect(),
        key_file: &key_file.path,
    };
    qemu_img::copy_rbd_to_rbd(&target(source), &target(name))?;
    Ok(volume)
}

/// The shared parent of chained disks from an image whose bytes have key
/// `key` (see [`crate::storage::parent_key`]), read as `image_format`: the
/// raw conversion, in RBD.
pub fn shared_parent_name(image_format: ImageFormat, key: &str) -> String {
    format!(
        "{}rbd-{}-{key}.img",
        crate::storage::PARENT_PREFIX,
        image_format.as_str()
    )
}

/// The volume whose presence says the parent's upload finished (other
/// hosts sharing the cluster see a parent while it is being written).
fn done_marker(parent: &str) -> String {
    format!("{parent}.done")
}

/// Whether `name` is a shared parent (not its marker).
fn is_shared_parent(name: &str) -> bool {
    name.starts_with(&format!("{}rbd-", crate::storage::PARENT_PREFIX)) && !name.ends_with(".done")
}

/// How long a start waits for another host to finish uploading a parent
/// before it copies the image into its own volume instead.
const PARENT_WAIT: Duration = Duration::from_secs(60);
/// Overrides [`PARENT_WAIT`] in seconds (tests).
pub const PARENT_WAIT_ENV: &str = "NOMAD_DRIVER_VIRT_CEPH_PARENT_WAIT";

/// The wait for another host's parent in force.
fn parent_wait() -> Duration {
    std::env::var(PARENT_WAIT_ENV)
        .ok()
        .and_then(|text| text.parse::<f64>().ok())
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .unwrap_or(PARENT_WAIT)
}

/// What creating an RBD volume made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RbdMade {
    /// The content asked for (for a chained disk: an RBD clone of the
    /// shared parent, found finished or uploaded now).
    AsAsked,
    /// A chained disk whose shared parent stayed unfinished past the wait
    /// (another host still uploading it): nothing was made. The disk is to
    /// be a copy of the image instead, and the parent is not this disk's
    /// to delete.
    ParentUnfinished,
}

/// One lock per parent in this process: uploading, cloning and deleting a
/// parent do not overlap.
fn parent_lock(pool: &str, parent: &str) -> std::sync::Arc<std::sync::Mutex<()>> {
    named_lock(format!("parent:{pool}/{parent}"))
}

/// A process-wide lock for `key`, made on first use.
fn named_lock(key: String) -> std::sync::Arc<std::sync::Mutex<()>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    locks.entry(key).or_default().clone()
}

fn find(pool: &Pool, name: &str) -> Result<Option<Volume>, StorageError> {
    match Volume::lookup(pool, name) {
        Ok(volume) => Ok(Some(volume)),
        Err(StorageError::VolumeNotFound { .. }) => Ok(None),
        Err(error) => Err(error),
    }
}

/// A chained disk from an image: an RBD clone of the shared parent
/// `parent` holding the image's raw conversion, uploaded first when no
/// finished one exists. The upload is from a private copy of the image
/// whose digest must be the one in the parent's name, else nothing is
/// made. A parent another host is
/// still writing is waited for; after [`PARENT_WAIT`] nothing is made and
/// [`RbdMade::ParentUnfinished`] says so (the caller copies the image).
#[allow(clippy::too_many_arguments)]
pub fn clone_shared_parent(
    config: &CephPool,
    pool: &Pool,
    image: &ImageFile,
    image_format: ImageFormat,
    parent: &str,
    name: &str,
    size: u64,
) -> Result<RbdMade, StorageError> {
    let lock = parent_lock(&pool.name, parent);
    let _held = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let marker = done_marker(parent);
    let refresh = || {
        let _ = super::pool::retry_busy(|| pool.inner.refresh(0));
    };
    refresh();
    let mut existing = find(pool, parent)?;
    let waited = std::time::Instant::now();
    let wait = parent_wait();
    while existing.is_some() && find(pool, &marker)?.is_none() && waited.elapsed() < wait {
        std::thread::sleep(Duration::from_secs(2));
        refresh();
        existing = find(pool, parent)?;
    }
    match (existing, find(pool, &marker)?) {
        (Some(parent), Some(_)) => {
            clone_rbd_volume(pool, &parent, name, size)?;
            Ok(RbdMade::AsAsked)
        }
        (Some(_), None) => {
            tracing::warn!(
                pool = %pool.name,
                parent,
                "a shared parent stays unfinished (another host's upload, or one whose host \
                 died); the disk gets a copy of the image instead. If no host is uploading it, \
                 remove it with `rbd rm <ceph pool>/{parent}`"
            );
            Ok(RbdMade::ParentUnfinished)
        }
        (None, _) => {
            // Uploaded from a private copy, hashed again: the parent then
            // holds exactly the bytes its name is the digest of, whatever
            // a tenant writes into the original meanwhile (the identity
            // check below cannot see writes that leave ctime alone).
            let private = image.private_copy()?;
            let (key_now, _) = crate::storage::parent_key::key_of_file(private.file())
                .map_err(|error| image.io("read the image", error))?;
            if shared_parent_name(image_format, &key_now) != parent {
                return Err(StorageError::UnsafeImage {
                    path: image.shown_path(),
                    reason: "it changed while the task started; do not change the image while \
                             the task starts"
                        .into(),
                });
            }
            let image = &private;
            let virtual_size = crate::storage::images::image_virtual_size(image, image_format)?;
            if virtual_size > size {
                return Err(StorageError::GrewAfterCheck {
                    path: image.shown_path(),
                    found: format!("its virtual size is {virtual_size} bytes, more"),
                    cap: size,
                });
            }
            // A marker whose parent is gone (a teardown that died between
            // the two deletes) would publish the parent while it is being
            // written: it goes first.
            delete_one(pool, &marker)?;
            let made = create_rbd_volume(pool, parent, virtual_size)?;
            // The parent's lock is held here: delete without taking it again
            // (it is not reentrant).
            let discard = |why: &str| {
                if let Err(error) = delete_one(pool, parent) {
                    tracing::warn!(pool = %pool.name, parent, why, error = %error, "could not delete an unfinished shared parent");
                }
            };
            if let Err(error) = write_image(config, &made, image, image_format) {
                discard("upload failed");
                return Err(error);
            }
            match create_rbd_volume(pool, &marker, 512) {
                Ok(_) | Err(StorageError::VolumeExists { .. }) => {}
                Err(error) => {
                    discard("marker failed");
                    return Err(error);
                }
            }
            clone_rbd_volume(pool, &made, name, size)?;
            Ok(RbdMade::AsAsked)
        }
    }
}

/// Deletes a volume in an rbd pool with its snapshots (a clone's parent
/// has libvirt's); a missing volume is fine. A shared parent that still
/// has clones (other tasks', maybe on other hosts) is kept: libvirt cannot
/// unprotect its snapshot, and that is the answer, not an error; the last
/// task to go deletes it, then its marker.
pub fn delete_rbd_volume(pool: &Pool, name: &str) -> Result<(), StorageError> {
    if is_shared_parent(name) {
        let lock = parent_lock(&pool.name, name);
        let _held = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        return match delete_one(pool, name) {
            Ok(()) => delete_one(pool, &done_marker(name)),
            Err(StorageError::Volume { source, .. })
                if source.to_string().contains("unprotect") =>
            {
                tracing::debug!(pool = %pool.name, parent = name, "shared parent still has clones; kept");
                Ok(())
            }
            Err(error) => Err(error),
        };
    }
    delete_one(pool, name)
}

fn delete_one(pool: &Pool, name: &str) -> Result<(), StorageError> {
    let vol = match pool.inner.lookup_storage_vol_by_name(name) {
        Ok(vol) => vol,
        Err(error) if has_code(&error, ErrorNumber::NoStorageVolume) => return Ok(()),
        Err(error) => {
            return Err(StorageError::volume(
                &pool.name,
                name,
                "looking up the volume",
                error,
            ))
        }
    };
    let flags = virt::sys::VIR_STORAGE_VOL_DELETE_WITH_SNAPSHOTS;
    match vol.delete(flags) {
        Ok(()) => Ok(()),
        Err(error) if has_code(&error, ErrorNumber::NoStorageVolume) => Ok(()),
        Err(error) => Err(StorageError::volume(
            &pool.name,
            name,
            "deleting the RBD image",
            error,
        )),
    }
}

/// Starts an rbd pool libvirt has stopped (after a reboot whose autostart
/// found no cluster, or a failed refresh), so a teardown can reach its
/// images without waiting for a start to prepare the pool. Best effort:
/// the delete that follows reports what is wrong.
pub fn start_if_stopped(pool: &Pool) {
    if pool.inner.is_active().unwrap_or(true) {
        return;
    }
    if let Err(error) = pool.inner.create(0) {
        tracing::debug!(pool = %pool.name, error = %error.message(), "could not start the rbd pool for a teardown");
    }
}

/// Whether libvirt's pool `name` is an rbd pool.
pub fn is_rbd_pool(pool: &Pool) -> bool {
    pool.inner
        .xml_desc(0)
        .ok()
        .and_then(|text| xml::parse(&text).ok())
        .is_some_and(|root| root.attr("type") == Some("rbd"))
}

/// The key, base64, in a new 0600 file under /run (a tmpfs: it never
/// reaches a disk) or the temp dir, removed when dropped.
fn key_file(config: &CephPool) -> Result<TempFile, StorageError> {
    use std::io::Write as _;
    let dir = if std::path::Path::new("/run").is_dir() && nix_root() {
        PathBuf::from("/run")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("nomad-virt-cephx-{}.key", unique_suffix()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|error| StorageError::Io {
            action: "create the temporary cephx key file",
            path: path.clone(),
            error,
        })?;
    let temp = TempFile { path: path.clone() };
    file.write_all(config.key.expose().trim().as_bytes())
        .map_err(|error| StorageError::Io {
            action: "write the temporary cephx key file",
            path,
            error,
        })?;
    Ok(temp)
}

/// Whether we run as root (only root may write /run).
fn nix_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::plugin::CephKey;

    fn config() -> CephPool {
        CephPool {
            name: "ndvtest-ceph<&".into(),
            pool: "rbd".into(),
            hosts: vec![
                CephHost {
                    name: "127.0.0.1".into(),
                    port: Some(6789),
                },
                CephHost {
                    name: "fd00::1".into(),
                    port: None,
                },
            ],
            username: "nomad".into(),
            key: CephKey::new("AQD8bvtpvFsSHxAAetpPOmzr4VBwu1zk7YQB+w=="),
        }
    }

    #[test]
    fn pool_and_secret_xml_are_escaped_and_keyless() {
        let xml = rbd_pool_xml(&config(), "0b0c5f7e-1111-2222-3333-444455556666", None);
        assert!(xml.contains("<name>ndvtest-ceph&lt;&amp;</name>"), "{xml}");
        assert!(
            xml.contains("<host name=\"127.0.0.1\" port=\"6789\"/>")
                || xml.contains("<host name='127.0.0.1' port='6789'/>"),
            "{xml}"
        );
        let root = xml::parse(&xml).unwrap();
        assert_eq!(root.attr("type"), Some("rbd"));
        assert_eq!(root.text_at(&["source", "name"]).as_deref(), Some("rbd"));
        let auth = root.child("source").and_then(|s| s.child("auth")).unwrap();
        assert_eq!(auth.attr("type"), Some("ceph"));
        assert_eq!(auth.attr("username"), Some("nomad"));
        assert!(!xml.contains("AQD8"), "{xml}");

        let secret = secret_xml(None, "ndvtest-ceph<&");
        let root = xml::parse(&secret).unwrap();
        assert_eq!(root.attr("private"), Some("yes"));
        assert_eq!(root.attr("ephemeral"), Some("no"));
        assert_eq!(
            root.text_at(&["usage", "name"]).as_deref(),
            Some("ndvtest-ceph<&")
        );
        assert!(!secret.contains("AQD8"), "{secret}");
    }

    #[test]
    fn unreachable_monitors_fail_fast_and_clearly() {
        // A port nothing listens on (bound, then closed).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut pool = config();
        pool.hosts = vec![CephHost {
            name: "127.0.0.1".into(),
            port: Some(port),
        }];
        let started = std::time::Instant::now();
        let error = probe_monitors(&pool).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(error.contains("no Ceph monitor answers"), "{error}");
        assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
        assert!(error.contains("storage_pools.ceph."), "{error}");
        assert!(!error.contains("AQD8"), "{error}");
    }

    #[test]
    fn hosts_are_shown_with_ports() {
        assert_eq!(
            hosts_text(&config().hosts),
            "127.0.0.1:6789, fd00::1".to_string()
        );
    }
}
