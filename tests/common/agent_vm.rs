//! A test guest with the QEMU guest agent channel, booted straight through
//! libvirt (no plugin): an overlay of the test image, a NIC on `default`, the
//! serial console in a file. Destroyed on drop. Shared by tests/e2e_agent.rs
//! and examples/bench_exec.rs (which includes this file by path), so it
//! depends on nothing else in tests/common.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nomad_driver_virt::guest_agent::GuestAgent;
use nomad_driver_virt::libvirt::domain_xml::{
    render_domain_xml, DiskBus, DiskDevice, DiskSource, DiskSpec, DomainMetadata, DomainSpec,
    DomainType, InterfaceSpec,
};
use nomad_driver_virt::libvirt::Libvirt;

pub const URI: &str = "qemu:///system";

/// Where guest.sh put the image; NDV_TEST_GUEST_DIR overrides it (as in
/// tests/common/vm.rs, which this file cannot use).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("NDV_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/nomad-driver-virt-test"))
}

/// Panics with the fix when libvirtd or an agent-capable guest is missing.
pub fn require_agent_guest() -> PathBuf {
    let virsh = Command::new("virsh").args(["-c", URI, "version"]).output();
    match virsh {
        Ok(output) if output.status.success() => {}
        _ => panic!(
            "libvirtd is not reachable at {URI}: run `bash tests/setup/host.sh` as root first"
        ),
    }
    let dir = guest_dir();
    let image = dir.join("guest.qcow2");
    let version = std::fs::read_to_string(dir.join("guest.version")).unwrap_or_default();
    assert!(
        image.is_file() && version.contains("qemu-guest-agent="),
        "{} is missing or has no guest agent: run `bash tests/setup/guest.sh {}` as root",
        image.display(),
        dir.display()
    );
    image
}

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .expect("run virsh")
}

/// A unique domain name with the ndvtest prefix (cleaned up by CI if left).
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "ndvtest-{prefix}-{:x}{:05x}",
        std::process::id() & 0xfff,
        nanos & 0xfffff
    )
}

pub struct AgentVm {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub libvirt: Libvirt,
}

impl AgentVm {
    /// Creates and starts a transient domain from an overlay of the image.
    pub fn boot(prefix: &str, guest_agent: bool) -> AgentVm {
        let image = require_agent_guest();
        let dir = tempfile::Builder::new()
            .prefix("ndvtest-agent-")
            .tempdir()
            .expect("tempdir");
        // QEMU runs as libvirt-qemu and must reach the overlay and console.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let overlay = dir.path().join("disk.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&image)
            .arg(&overlay)
            .status()
            .expect("run qemu-img");
        assert!(status.success(), "qemu-img create failed");
        let name = unique_name(prefix);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mac = format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            (nanos >> 16) & 0xff,
            (nanos >> 8) & 0xff,
            (std::process::id() ^ nanos) & 0xff
        );
        let spec = DomainSpec {
            name: name.clone(),
            domain_type: DomainType::Qemu,
            memory_kib: 256 * 1024,
            current_memory_kib: 256 * 1024,
            vcpus: 1,
            cpuset: None,
            cpu_shares: None,
            arch: "x86_64".into(),
            machine: "pc".into(),
            disks: vec![DiskSpec {
                source: DiskSource::File(overlay),
                format: "qcow2".into(),
                target_dev: "vda".into(),
                bus: DiskBus::Virtio,
                device: DiskDevice::Disk,
                read_only: false,
                boot_order: None,
                // The domain XML spells the chain out: without this QEMU
                // would not open the overlay's backing file.
                backing: Some((image, "qcow2".into())),
            }],
            shares: vec![],
            interfaces: vec![InterfaceSpec::Network {
                network: "default".into(),
                mac,
                filter: None,
            }],
            console_log: Some(dir.path().join("console.log")),
            metadata: DomainMetadata {
                task_id: format!("{name}/agent/test"),
                alloc_id: name.clone(),
                task_name: "agent".into(),
                plugin_version: "test".into(),
            },
            guest_agent,
        };
        let xml = render_domain_xml(&spec).expect("domain renders");
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, xml).expect("write domain xml");
        let output = virsh(&["create", &xml_path.display().to_string()]);
        assert!(
            output.status.success(),
            "virsh create failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        AgentVm {
            name,
            dir,
            libvirt: Libvirt::new(URI, None),
        }
    }

    pub fn agent(&self) -> GuestAgent {
        GuestAgent::new(self.libvirt.clone(), &self.name)
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.console_path())
            .unwrap_or_default()
            .replace('\r', "")
    }

    pub fn console_path(&self) -> PathBuf {
        self.dir.path().join("console.log")
    }

    /// Whether the (transient) domain still exists and runs.
    pub fn running(&self) -> bool {
        let output = virsh(&["domstate", &self.name]);
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("running")
    }

    /// Waits until the domain is gone or shut off.
    pub fn wait_stopped(&self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    }

    pub fn dir_path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for AgentVm {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
    }
}
