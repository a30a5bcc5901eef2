//! The libvirt error every error of this crate that came from libvirt keeps
//! as its source.

/// A failed libvirt call: libvirt's own message, with its error code for
/// classification. Displays only libvirt's message; the error wrapping it
/// says what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.message())]
pub struct VirtError(virt::error::Error);

impl VirtError {
    /// libvirt's message.
    pub fn message(&self) -> &str {
        self.0.message()
    }

    /// libvirt's raw error code (`virErrorNumber`).
    pub fn code(&self) -> u32 {
        self.0.code().to_raw()
    }

    /// Whether the call failed because the object (domain, network, pool,
    /// volume) does not exist.
    pub fn is_missing(&self) -> bool {
        matches!(
            self.code(),
            virt::sys::VIR_ERR_NO_DOMAIN
                | virt::sys::VIR_ERR_NO_NETWORK
                | virt::sys::VIR_ERR_NO_STORAGE_POOL
                | virt::sys::VIR_ERR_NO_STORAGE_VOL
        )
    }

    /// Whether the connection's driver does not offer the call at all
    /// (e.g. DHCP leases on libvirt's test driver).
    pub fn is_unsupported(&self) -> bool {
        self.code() == virt::sys::VIR_ERR_NO_SUPPORT
    }
}

impl From<virt::error::Error> for VirtError {
    fn from(error: virt::error::Error) -> Self {
        VirtError(error)
    }
}
