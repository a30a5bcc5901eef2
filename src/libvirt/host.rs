//! Facts about the libvirt host for fingerprinting.

use virt::connect::Connect;

use super::LibvirtError;
use crate::config::plugin::AcceleratorChoice;

/// What the fingerprint reports about libvirt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// libvirt library version, encoded as major*1_000_000 + minor*1000 + release.
    pub lib_version: u32,
    /// Hypervisor driver name, e.g. "QEMU" or "TEST".
    pub driver: String,
    /// Hypervisor version in the same encoding.
    pub driver_version: u32,
    /// Whether libvirt offers KVM domains on this host.
    pub kvm_offered: bool,
}

/// libvirt's integer version as "major.minor.release".
pub fn readable_version(version: u32) -> String {
    format!(
        "{}.{}.{}",
        version / 1_000_000,
        (version / 1000) % 1000,
        version % 1000
    )
}

/// Reads versions and capabilities over the connection.
pub fn host_info(connection: &Connect) -> Result<HostInfo, LibvirtError> {
    let lib_version = connection
        .lib_version()
        .map_err(|e| LibvirtError::host("reading the libvirt version", e))?;
    let driver = connection
        .driver_type()
        .map_err(|e| LibvirtError::host("reading the hypervisor driver", e))?;
    let driver_version = connection.hyp_version().unwrap_or(0);
    let capabilities = connection
        .capabilities()
        .map_err(|e| LibvirtError::host("reading host capabilities", e))?;
    Ok(HostInfo {
        lib_version,
        driver,
        driver_version,
        kvm_offered: offers_kvm(&capabilities),
    })
}

/// Whether a capabilities document lists a `kvm` domain type.
/// A document that does not parse offers nothing.
pub fn offers_kvm(capabilities_xml: &str) -> bool {
    let Ok(root) = super::xml::parse(capabilities_xml) else {
        return false;
    };
    let offered = root
        .children_named("guest")
        .flat_map(|guest| guest.children_named("arch"))
        .flat_map(|arch| arch.children_named("domain"))
        .any(|domain| domain.attr("type") == Some("kvm"));
    offered
}

/// The accelerator domains will use, given the plugin's choice.
pub fn choose_accelerator(
    choice: AcceleratorChoice,
    kvm_offered: bool,
    kvm_device_usable: bool,
) -> &'static str {
    match choice {
        AcceleratorChoice::Kvm => "kvm",
        AcceleratorChoice::Tcg => "tcg",
        AcceleratorChoice::Auto if kvm_offered && kvm_device_usable => "kvm",
        AcceleratorChoice::Auto => "tcg",
    }
}

/// Whether /dev/kvm can be opened read-write by this process.
pub fn kvm_device_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_like_libvirt() {
        assert_eq!(readable_version(9_000_000), "9.0.0");
        assert_eq!(readable_version(10_002_003), "10.2.3");
    }

    #[test]
    fn accelerator_choice() {
        assert_eq!(
            choose_accelerator(AcceleratorChoice::Auto, true, true),
            "kvm"
        );
        assert_eq!(
            choose_accelerator(AcceleratorChoice::Auto, true, false),
            "tcg"
        );
        assert_eq!(
            choose_accelerator(AcceleratorChoice::Auto, false, true),
            "tcg"
        );
        assert_eq!(
            choose_accelerator(AcceleratorChoice::Tcg, true, true),
            "tcg"
        );
        assert_eq!(
            choose_accelerator(AcceleratorChoice::Kvm, false, false),
            "kvm"
        );
    }

    #[test]
    fn kvm_in_capabilities() {
        assert!(offers_kvm(
            "<capabilities><host/><guest><arch name='x86_64'><domain type='qemu'/>\
             <domain type=\"kvm\"/></arch></guest></capabilities>"
        ));
        assert!(!offers_kvm(
            "<capabilities><guest><arch name='x86_64'><domain type='qemu'/></arch></guest>\
             </capabilities>"
        ));
        assert!(!offers_kvm("<capabilities><domain type='kvm'/>"));
    }
}
