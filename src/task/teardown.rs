//! Removing what a task put on the host. Every step tolerates the thing
//! being gone already, so teardown can be retried after a partial failure.

use crate::libvirt::conn::Connect;
use crate::libvirt::LibvirtError;
use crate::nomad::driver_state::CreatedVolume;
use crate::storage::StorageError;

/// Destroys (if running) and undefines a domain; missing is fine.
pub fn remove_domain(conn: &Connect, name: &str) {
    if let Err(error) = try_remove_domain(conn, name) {
        tracing::warn!(error = %error, domain = name, "could not remove domain");
    }
}

pub fn try_remove_domain(conn: &Connect, name: &str) -> Result<(), LibvirtError> {
    crate::libvirt::domain::remove_domain(conn, name)
}

/// Deletes a volume the driver created; a missing pool or volume is fine.
pub fn delete_volume(conn: &Connect, created: &CreatedVolume) -> Result<(), StorageError> {
    crate::libvirt::storage::delete_created_volume(conn, &created.pool, &created.name)
}
