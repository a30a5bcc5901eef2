//! What the host offers for shared directories: whether QEMU can serve
//! virtiofs (domain capabilities), the libvirt version (read-only virtiofs
//! needs 11.0.0) and the uid/gid QEMU runs as (libvirt's DAC base label),
//! which decides whether QEMU itself can open a 9p share.

use std::path::Path;

use virt::connect::Connect;

use super::LibvirtError;

/// libvirt enforces `<readonly/>` on virtiofs from this version on.
pub const VIRTIOFS_READONLY_VERSION: u32 = 11_000_000;

/// The user and group QEMU processes run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuIdentity {
    pub uid: u32,
    pub gid: u32,
}

/// What a start needs to choose between virtiofs and 9p.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareSupport {
    /// QEMU has the vhost-user-fs device (libvirt reports driver type
    /// `virtiofs` in the domain capabilities) and, on a local libvirt,
    /// a virtiofsd is installed where libvirt looks for it.
    pub virtiofs: bool,
    /// libvirt's version (the daemon's on a remote connection).
    pub libvirt_version: u32,
    /// `None` when libvirt reports no DAC label (the test driver, or DAC
    /// disabled): nothing to check against then.
    pub qemu_identity: Option<QemuIdentity>,
    /// libvirt runs on this machine (a URI without a host), so its share
    /// dirs and QEMU's user can be checked here; on a remote libvirt
    /// neither this machine's dirs nor its /etc/passwd say anything.
    pub local: bool,
}

impl ShareSupport {
    /// Whether libvirt can make a virtiofs share read-only.
    pub fn virtiofs_readonly(&self) -> bool {
        self.libvirt_version >= VIRTIOFS_READONLY_VERSION
    }
}

/// Asks libvirt for the share facts of domains of `virt_type` (`kvm` or
/// `qemu`) with this arch and machine. Drivers without domain capabilities
/// (the test driver) offer no virtiofs.
pub fn share_support(
    connection: &Connect,
    arch: &str,
    machine: &str,
    virt_type: &str,
) -> Result<ShareSupport, LibvirtError> {
    let libvirt_version = connection
        .lib_version()
        .map_err(|e| LibvirtError::host("reading the libvirt version", e))?;
    // Only a driver without domain capabilities (the test driver) means
    // "no virtiofs"; any other failure (a machine type QEMU lacks) is the
    // start's to report, not a reason to quietly pick 9p.
    let qemu_offers_virtiofs =
        match connection.domain_capabilities(None, Some(arch), Some(machine), Some(virt_type), 0) {
            Ok(xml) => offers_virtiofs(&xml),
            Err(error) => {
                let error = super::error::VirtError::from(error);
                if !error.is_unsupported() {
                    return Err(LibvirtError::host(
                    "reading the domain capabilities (os.arch, os.machine) for shared directories",
                    error,
                ));
                }
                false
            }
        };
    // A remote host's files are not ours to read: trust its capabilities.
    let local = connection.uri().is_ok_and(|uri| is_local_uri(&uri));
    let virtiofs = qemu_offers_virtiofs
        && (!local
            || VHOST_USER_DIRS
                .iter()
                .any(|dir| virtiofsd_described(Path::new(dir))));
    let capabilities = connection
        .capabilities()
        .map_err(|e| LibvirtError::host("reading host capabilities", e))?;
    Ok(ShareSupport {
        virtiofs,
        libvirt_version,
        qemu_identity: dac_identity(&capabilities, virt_type),
        local,
    })
}

/// Whether a libvirt URI names this machine: no host part
/// (`qemu:///system`, `qemu+unix:///system`, `test:///default`). Anything
/// with a host, even `localhost`, may be another machine's files.
pub fn is_local_uri(uri: &str) -> bool {
    uri.split_once("://")
        .is_some_and(|(_, rest)| rest.starts_with('/'))
}

/// Where libvirt looks for vhost-user backends (QEMU's interop
/// descriptors), in its order.
const VHOST_USER_DIRS: [&str; 2] = ["/etc/qemu/vhost-user", "/usr/share/qemu/vhost-user"];

/// Whether `dir` holds a vhost-user descriptor of `"type": "fs"` whose
/// binary exists: how libvirt finds virtiofsd (Debian 12 ships it in
/// qemu-system-common, newer Debian in the `virtiofsd` package).
pub fn virtiofsd_described(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            return false;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            return false;
        };
        let Ok(descriptor) = serde_json::from_str::<serde_json::Value>(&text) else {
            return false;
        };
        descriptor.get("type").and_then(|t| t.as_str()) == Some("fs")
            && descriptor
                .get("binary")
                .and_then(|b| b.as_str())
                .is_some_and(|binary| Path::new(binary).is_file())
    })
}

/// Whether a domain capabilities document lists the `virtiofs` filesystem
/// driver type.
pub fn offers_virtiofs(domain_capabilities_xml: &str) -> bool {
    let Ok(root) = super::xml::parse(domain_capabilities_xml) else {
        return false;
    };
    let offered = root
        .child("devices")
        .and_then(|devices| devices.child("filesystem"))
        .filter(|fs| fs.attr("supported") == Some("yes"))
        .is_some_and(|fs| {
            fs.children_named("enum")
                .filter(|e| e.attr("name") == Some("driverType"))
                .flat_map(|e| e.children_named("value"))
                .any(|value| value.text_at(&[]).as_deref() == Some("virtiofs"))
        });
    offered
}

/// The DAC base label (`+uid:+gid`) libvirt gives domains of `virt_type`,
/// from the host capabilities' `<secmodel>`.
pub fn dac_identity(capabilities_xml: &str, virt_type: &str) -> Option<QemuIdentity> {
    let root = super::xml::parse(capabilities_xml).ok()?;
    let host = root.child("host")?;
    let dac = host
        .children_named("secmodel")
        .find(|model| model.text_at(&["model"]).as_deref() == Some("dac"))?;
    let label = dac
        .children_named("baselabel")
        .find(|label| label.attr("type") == Some(virt_type))?
        .text_at(&[])?;
    let (uid, gid) = label.trim().split_once(':')?;
    let number = |text: &str| text.trim().trim_start_matches('+').parse::<u32>().ok();
    Some(QemuIdentity {
        uid: number(uid)?,
        gid: number(gid)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtiofs_in_domain_capabilities() {
        let with = "<domainCapabilities><devices><filesystem supported='yes'>\
             <enum name='driverType'><value>path</value><value>handle</value>\
             <value>virtiofs</value></enum></filesystem></devices></domainCapabilities>";
        assert!(offers_virtiofs(with));
        let without = with.replace("<value>virtiofs</value>", "");
        assert!(!offers_virtiofs(&without));
        let unsupported = with.replace("supported='yes'", "supported='no'");
        assert!(!offers_virtiofs(&unsupported));
        assert!(!offers_virtiofs("<domainCapabilities>"));
    }

    #[test]
    fn qemu_identity_from_the_dac_label() {
        let caps = "<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel>\
            <secmodel><model>dac</model><doi>0</doi>\
            <baselabel type='kvm'>+64055:+107</baselabel>\
            <baselabel type='qemu'>+64055:+64055</baselabel></secmodel></host></capabilities>";
        assert_eq!(
            dac_identity(caps, "qemu"),
            Some(QemuIdentity {
                uid: 64055,
                gid: 64055
            })
        );
        assert_eq!(dac_identity(caps, "kvm").map(|id| id.gid), Some(107));
        assert_eq!(dac_identity(caps, "xen"), None);
        assert_eq!(
            dac_identity("<capabilities><host/></capabilities>", "qemu"),
            None
        );
    }

    #[test]
    fn virtiofsd_from_its_vhost_user_descriptor() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!virtiofsd_described(dir.path()));
        assert!(!virtiofsd_described(&dir.path().join("missing")));
        let binary = dir.path().join("virtiofsd");
        let descriptor = |binary: &Path| {
            format!(
                "{{\"description\": \"QEMU virtiofsd vhost-user-fs\", \"type\": \"fs\", \"binary\": {:?}}}",
                binary.display().to_string()
            )
        };
        std::fs::write(
            dir.path().join("50-qemu-virtiofsd.json"),
            descriptor(&binary),
        )
        .expect("write");
        assert!(!virtiofsd_described(dir.path()), "the binary is missing");
        std::fs::write(&binary, "").expect("write");
        assert!(virtiofsd_described(dir.path()));
        let gpu = dir.path().join("gpu");
        std::fs::create_dir(&gpu).expect("mkdir");
        std::fs::write(
            gpu.join("50-gpu.json"),
            descriptor(&binary).replace("\"fs\"", "\"gpu\""),
        )
        .expect("write");
        std::fs::write(gpu.join("broken.json"), "{").expect("write");
        assert!(!virtiofsd_described(&gpu));
    }

    #[test]
    fn local_uris_have_no_host() {
        for uri in ["qemu:///system", "qemu+unix:///system", "test:///default"] {
            assert!(is_local_uri(uri), "{uri}");
        }
        for uri in [
            "qemu+ssh://root@hv1/system",
            "qemu+tcp://hv1:16509/system",
            "qemu://localhost/system",
            "nonsense",
        ] {
            assert!(!is_local_uri(uri), "{uri}");
        }
    }

    /// The test driver has no domain capabilities: no virtiofs, no error.
    #[test]
    fn no_domain_capabilities_means_no_virtiofs() {
        let connection = Connect::open(Some("test:///default")).expect("test driver");
        let support = share_support(&connection, "x86_64", "pc", "qemu").expect("share support");
        assert!(!support.virtiofs);
        assert!(support.local);
    }

    #[test]
    fn readonly_virtiofs_from_libvirt_11() {
        let support = |libvirt_version| ShareSupport {
            virtiofs: true,
            libvirt_version,
            qemu_identity: None,
            local: true,
        };
        assert!(!support(10_010_000).virtiofs_readonly());
        assert!(support(11_000_000).virtiofs_readonly());
    }
}
