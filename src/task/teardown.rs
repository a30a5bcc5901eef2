//! Removing what a task put on the host. Every step tolerates the thing
//! being gone already, so teardown can be retried after a partial failure.

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use crate::libvirt::LibvirtError;
use crate::nomad::driver_state::CreatedVolume;
use crate::storage::StorageError;

/// libvirt's "no such domain" error code.
fn is_missing_domain(error: &virt::error::Error) -> bool {
    error.code().to_raw() == sys::VIR_ERR_NO_DOMAIN
}

/// Looks a domain up; `Ok(None)` when it does not exist.
pub fn find_domain(conn: &Connect, name: &str) -> Result<Option<Domain>, LibvirtError> {
    match conn.lookup_domain_by_name(name) {
        Ok(domain) => Ok(Some(domain)),
        Err(error) if is_missing_domain(&error) => Ok(None),
        Err(error) => Err(LibvirtError::call(
            format!("looking up domain {name}"),
            error,
        )),
    }
}

/// Destroys (if running) and undefines a domain; missing is fine.
pub fn remove_domain(conn: &Connect, name: &str) {
    if let Err(error) = try_remove_domain(conn, name) {
        tracing::warn!(error = %error, domain = name, "could not remove domain");
    }
}

pub fn try_remove_domain(conn: &Connect, name: &str) -> Result<(), LibvirtError> {
    let Some(domain) = find_domain(conn, name)? else {
        return Ok(());
    };
    if domain.is_active().unwrap_or(false) {
        if let Err(error) = domain.destroy() {
            if !is_missing_domain(&error) && domain.is_active().unwrap_or(false) {
                return Err(LibvirtError::call(
                    format!("destroying domain {name}"),
                    error,
                ));
            }
        }
    }
    // NVRAM and metadata go with the domain; the test driver rejects the
    // NVRAM flag, so fall back to the flags it accepts.
    let full = sys::VIR_DOMAIN_UNDEFINE_NVRAM
        | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA;
    let basic = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
    match domain
        .undefine_flags(full)
        .or_else(|_| domain.undefine_flags(basic))
    {
        Ok(()) => Ok(()),
        Err(error) if is_missing_domain(&error) => Ok(()),
        Err(error) => {
            // A transient domain disappears when destroyed: nothing to undefine.
            if find_domain(conn, name)?.is_none() {
                Ok(())
            } else {
                Err(LibvirtError::call(
                    format!("undefining domain {name}"),
                    error,
                ))
            }
        }
    }
}

/// Deletes a volume the driver created; a missing pool or volume is fine.
pub fn delete_volume(conn: &Connect, created: &CreatedVolume) -> Result<(), StorageError> {
    crate::libvirt::storage::delete_created_volume(conn, &created.pool, &created.name)
}
