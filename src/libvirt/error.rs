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

    /// Whether libvirt refused the call's arguments (e.g. a machine type
    /// QEMU lacks): the input's fault, which no retry fixes.
    pub fn is_invalid_argument(&self) -> bool {
        self.code() == virt::sys::VIR_ERR_INVALID_ARG
    }
}

impl From<virt::error::Error> for VirtError {
    fn from(error: virt::error::Error) -> Self {
        VirtError(error)
    }
}

/// `error` followed by each of its sources, joined by ": " — the full text
/// for a log line or a message whose reader cannot walk the chain.
pub fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
impl VirtError {
    /// A real "not supported" error: DHCP leases on the test driver.
    pub(crate) fn sample_unsupported() -> VirtError {
        let conn = virt::connect::Connect::open(Some("test:///default")).expect("test driver");
        let net = conn.lookup_network_by_name("default").expect("network");
        let error = super::ffi::network_dhcp_leases(&net, None).expect_err("no leases");
        VirtError(error)
    }

    /// A real "no such network" error.
    pub(crate) fn sample_missing_network() -> VirtError {
        let conn = virt::connect::Connect::open(Some("test:///default")).expect("test driver");
        let error = conn
            .lookup_network_by_name("ndv-no-such")
            .expect_err("missing");
        VirtError(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_and_chain() {
        let unsupported = VirtError::sample_unsupported();
        assert!(unsupported.is_unsupported() && !unsupported.is_missing());
        let missing = VirtError::sample_missing_network();
        assert!(missing.is_missing() && !missing.is_unsupported());
        assert_eq!(missing.to_string(), missing.message());
        let io = std::io::Error::other("outer");
        assert_eq!(with_sources(&io), "outer");
    }
}
