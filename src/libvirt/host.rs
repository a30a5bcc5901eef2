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

/// The guest architecture and machine a domain gets when the job's `os`
/// block leaves them out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsDefaults {
    pub arch: String,
    pub machine: String,
}

/// Fills in what the job left out of `os` from the host, as the Go driver
/// does: the architecture is the host CPU's (capabilities `<host><cpu>
/// <arch>`), the machine is libvirt's default for that architecture and
/// accelerator (domain capabilities `<machine>`), else the first machine
/// the capabilities list for the architecture, else the usual one for the
/// architecture family. The inner error is a problem the job fixes by
/// setting the field it names.
pub fn os_defaults(
    connection: &Connect,
    arch: Option<&str>,
    machine: Option<&str>,
    virt_type: &str,
) -> Result<Result<OsDefaults, String>, LibvirtError> {
    let capabilities = connection
        .capabilities()
        .map_err(|e| LibvirtError::host("reading host capabilities", e))?;
    let Some(arch) = arch
        .map(str::to_string)
        .or_else(|| host_arch(&capabilities))
    else {
        return Ok(Err(
            "os.arch: the host capabilities name no CPU architecture; set it, e.g. \"x86_64\""
                .into(),
        ));
    };
    // An arch the host offers no guests of would fail in libvirt's define
    // with a less helpful message. (Capabilities listing no guest arch at
    // all decide nothing.)
    let offered = guest_arches(&capabilities);
    if !offered.is_empty() && !offered.contains(&arch) {
        return Ok(Err(format!(
            "os.arch: this host runs no {arch:?} guests; use one of {}",
            offered.join(", ")
        )));
    }
    if let Some(machine) = machine {
        return Ok(Ok(OsDefaults {
            arch,
            machine: machine.to_string(),
        }));
    }
    let from_domain_caps = connection
        .domain_capabilities(None, Some(&arch), None, Some(virt_type), 0)
        .ok()
        .and_then(|xml| default_machine(&xml));
    let machine = from_domain_caps
        .or_else(|| first_machine(&capabilities, &arch))
        .or_else(|| family_machine(&arch).map(str::to_string));
    Ok(match machine {
        Some(machine) => Ok(OsDefaults { arch, machine }),
        None => Err(format!(
            "os.machine: libvirt names no machine type for architecture {arch:?}; set it, e.g. \"virt\""
        )),
    })
}

/// The guest architectures a capabilities document lists, each once.
fn guest_arches(capabilities_xml: &str) -> Vec<String> {
    let Ok(root) = super::xml::parse(capabilities_xml) else {
        return Vec::new();
    };
    let mut arches: Vec<String> = root
        .children_named("guest")
        .flat_map(|guest| guest.children_named("arch"))
        .filter_map(|arch| arch.attr("name").map(str::to_string))
        .collect();
    arches.sort();
    arches.dedup();
    arches
}

/// The host CPU architecture in a capabilities document.
pub fn host_arch(capabilities_xml: &str) -> Option<String> {
    let root = super::xml::parse(capabilities_xml).ok()?;
    root.text_at(&["host", "cpu", "arch"])
        .map(|arch| arch.trim().to_string())
        .filter(|arch| !arch.is_empty())
}

/// The machine a domain capabilities document names (libvirt's default
/// for the architecture it was asked about).
pub fn default_machine(domain_capabilities_xml: &str) -> Option<String> {
    let root = super::xml::parse(domain_capabilities_xml).ok()?;
    root.text_at(&["machine"])
        .map(|machine| machine.trim().to_string())
        .filter(|machine| !machine.is_empty())
}

/// The first machine the capabilities list for guests of `arch`.
fn first_machine(capabilities_xml: &str, arch: &str) -> Option<String> {
    let root = super::xml::parse(capabilities_xml).ok()?;
    let machine = root
        .children_named("guest")
        .flat_map(|guest| guest.children_named("arch"))
        .filter(|candidate| candidate.attr("name") == Some(arch))
        .flat_map(|candidate| candidate.children_named("machine"))
        .map(|machine| machine.text.trim().to_string())
        .find(|machine| !machine.is_empty());
    machine
}

fn family_machine(arch: &str) -> Option<&'static str> {
    match arch {
        "x86_64" | "i686" => Some("pc"),
        "aarch64" | "armv7l" | "riscv64" => Some("virt"),
        _ => None,
    }
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
    fn os_defaults_come_from_the_capabilities() {
        let caps = "<capabilities><host><cpu><arch>aarch64</arch></cpu></host>\
            <guest><arch name='x86_64'><machine>pc-i440fx-7.2</machine></arch></guest>\
            <guest><arch name='aarch64'><machine maxCpus='512'>virt-7.2</machine>\
            <machine canonical='virt-7.2'>virt</machine></arch></guest></capabilities>";
        assert_eq!(host_arch(caps).as_deref(), Some("aarch64"));
        assert_eq!(first_machine(caps, "aarch64").as_deref(), Some("virt-7.2"));
        assert_eq!(
            first_machine(caps, "x86_64").as_deref(),
            Some("pc-i440fx-7.2")
        );
        assert_eq!(first_machine(caps, "s390x"), None);
        assert_eq!(host_arch("<capabilities><host/></capabilities>"), None);
        assert_eq!(
            default_machine(
                "<domainCapabilities><path>/usr/bin/qemu-system-x86_64</path>\
                 <domain>qemu</domain><machine>pc-q35-8.2</machine><arch>x86_64</arch>\
                 </domainCapabilities>"
            )
            .as_deref(),
            Some("pc-q35-8.2")
        );
        assert_eq!(family_machine("x86_64"), Some("pc"));
        assert_eq!(family_machine("s390x"), None);
    }

    /// The test driver's host is i686 and has no domain capabilities.
    #[test]
    fn os_defaults_on_the_test_driver() {
        let conn = Connect::open(Some("test:///default")).expect("test driver");
        let defaults = os_defaults(&conn, None, None, "qemu")
            .expect("libvirt")
            .expect("defaults");
        assert_eq!(defaults.arch, "i686");
        assert_eq!(defaults.machine, "pc");
        let given = os_defaults(&conn, Some("i686"), Some("q35"), "qemu")
            .expect("libvirt")
            .expect("given");
        assert_eq!(given.arch, "i686");
        assert_eq!(given.machine, "q35");
        // An arch the host runs no guests of is refused, machine or not,
        // naming os.arch and what the host offers.
        for machine in [None, Some("s390-ccw-virtio")] {
            let refused = os_defaults(&conn, Some("s390x"), machine, "qemu")
                .expect("libvirt")
                .unwrap_err();
            assert!(
                refused.starts_with("os.arch:") && refused.contains("i686"),
                "{refused}"
            );
        }
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
