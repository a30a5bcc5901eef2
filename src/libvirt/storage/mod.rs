//! Storage through libvirt: directory pools ([`pool`]) and the volumes of
//! task disks and seeds ([`volume`]). Pure naming and image work lives in
//! [`crate::storage`].
//!
//! Everything here blocks; call it from `spawn_blocking` (or through
//! [`crate::libvirt::Libvirt::call`]).

use crate::libvirt::VirtError;
use std::fmt;
use std::path::PathBuf;

use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use crate::storage::StorageError;

pub mod pool;
pub mod rbd;
pub mod volume;

pub use pool::{ensure_directory_pool, lookup_pool, pool_fingerprint, refresh_pool};
pub use volume::{
    clone_volume, create_empty, create_empty_with, create_from_image, create_from_image_with,
    create_overlay, delete_created_volume, delete_volume, ensure_parent, ensure_parent_capped,
    existing_path, prune_pools, prune_unused_parents, source_volume, upload_bytes, SourceVolume,
};

/// A storage pool looked up on the connection, with its name.
#[derive(Clone)]
pub struct Pool {
    inner: StoragePool,
    name: String,
}

impl Pool {
    fn new(inner: StoragePool, name: &str) -> Self {
        Pool {
            inner,
            name: name.to_string(),
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes free in the pool (as of its last refresh).
    pub fn available(&self) -> Result<u64, StorageError> {
        self.inner
            .info()
            .map(|info| info.available)
            .map_err(|e| StorageError::pool(&self.name, "reading pool info", e))
    }

    /// The names of the volumes libvirt lists in the pool (as of its last
    /// refresh).
    pub fn volume_names(&self) -> Result<Vec<String>, StorageError> {
        self.inner
            .list_volumes()
            .map_err(|e| StorageError::pool(&self.name, "listing volumes", e))
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("name", &self.name).finish()
    }
}

/// A volume in a pool, with its names.
#[derive(Clone)]
pub struct Volume {
    inner: StorageVol,
    pool: String,
    name: String,
}

impl Volume {
    fn new(inner: StorageVol, pool: &str, name: &str) -> Self {
        Volume {
            inner,
            pool: pool.to_string(),
            name: name.to_string(),
        }
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Looks up volume `name` in `pool`.
    pub fn lookup(pool: &Pool, name: &str) -> Result<Volume, StorageError> {
        match pool.inner.lookup_storage_vol_by_name(name) {
            Ok(vol) => Ok(Volume::new(vol, &pool.name, name)),
            Err(error) if has_code(&error, virt::error::ErrorNumber::NoStorageVolume) => {
                Err(StorageError::VolumeNotFound {
                    pool: pool.name.clone(),
                    volume: name.to_string(),
                })
            }
            Err(error) => Err(StorageError::volume(
                &pool.name,
                name,
                "looking up the volume",
                error,
            )),
        }
    }

    /// The name of its pool.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The volume's file, for a domain's `<disk type='file'>`.
    pub fn path(&self) -> Result<PathBuf, StorageError> {
        self.inner
            .path()
            .map(PathBuf::from)
            .map_err(|e| StorageError::volume(&self.pool, &self.name, "reading the volume path", e))
    }

    /// The volume's capacity (its virtual size) in bytes.
    pub fn capacity(&self) -> Result<u64, StorageError> {
        self.inner
            .info()
            .map(|info| info.capacity)
            .map_err(|e| StorageError::volume(&self.pool, &self.name, "reading the volume size", e))
    }

    /// libvirt's XML description of the volume.
    pub fn xml(&self) -> Result<String, StorageError> {
        self.inner
            .xml_desc(0)
            .map_err(|e| StorageError::volume(&self.pool, &self.name, "reading the volume XML", e))
    }
}

impl fmt::Debug for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Volume")
            .field("pool", &self.pool)
            .field("name", &self.name)
            .finish()
    }
}

/// Whether a libvirt error has the given code.
fn has_code(error: &virt::error::Error, code: virt::error::ErrorNumber) -> bool {
    error.code() == virt::error::ErrorNumberEnum::Known(code)
}

impl StorageError {
    /// A libvirt failure about a pool.
    pub(crate) fn pool(pool: &str, action: impl Into<String>, error: impl Into<VirtError>) -> Self {
        StorageError::Pool {
            pool: pool.to_string(),
            action: action.into(),
            source: Box::new(error.into()),
        }
    }

    /// A libvirt failure about a volume.
    pub(crate) fn volume(
        pool: &str,
        volume: &str,
        action: impl Into<String>,
        error: impl Into<VirtError>,
    ) -> Self {
        StorageError::Volume {
            pool: pool.to_string(),
            volume: volume.to_string(),
            action: action.into(),
            source: Box::new(error.into()),
        }
    }
}
