//! A failing e2e test leaves its diagnostics under target/e2e/: proven with
//! a deliberate panic while an [`Alloc`] holds a defined (never started)
//! domain, so no guest boots.

mod common;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::Command;

use common::host::{IPTABLES_SAVE, VM};
use common::vm::{self, Alloc};

/// A defined domain, undefined on drop.
struct Defined(String);

impl Defined {
    fn new(alloc: &Alloc, name: &str) -> Defined {
        // Rust and libvirt spell the common architectures alike (x86_64, aarch64).
        let arch = std::env::consts::ARCH;
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>\
             <vcpu>1</vcpu><os><type arch='{arch}'>hvm</type></os></domain>"
        );
        let path = alloc.root.path().join("domain.xml");
        std::fs::write(&path, xml).expect("write domain xml");
        let out = Command::new("virsh")
            .args(["-q", "-c", "qemu:///system", "define"])
            .arg(&path)
            .output()
            .expect("run virsh define");
        assert!(
            out.status.success(),
            "virsh define failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Defined(name.to_string())
    }
}

impl Drop for Defined {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-q", "-c", "qemu:///system", "undefine", &self.0])
            .output();
    }
}

#[test]
fn a_panicking_test_leaves_domain_xml_console_and_iptables_save() {
    // Root, libvirtd and iptables-save: the guest image is not booted.
    let needs: Vec<_> = VM
        .iter()
        .copied()
        .filter(|need| *need != common::Need::GuestImage)
        .chain([IPTABLES_SAVE])
        .collect();
    if !common::host_ready(&needs) {
        return;
    }
    let mut seen: Option<(PathBuf, String)> = None;
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        // Declared before the Alloc, so dropped after it.
        let defined: Option<Defined>;
        let alloc = Alloc::new("ndvtest-diag");
        let task = alloc.task_config(Vec::new(), 32);
        let domain = vm::domain_name_of(&task);
        defined = Some(Defined::new(&alloc, &domain));
        std::fs::write(
            alloc.task_dir().join("virt-console.log"),
            "console: booting\n",
        )
        .expect("write console log");
        std::fs::write(alloc.stdout_path(), "stdout: hello\n").expect("write stdout");
        seen = Some((alloc.diagnostics_dir(), domain));
        // Dropping `alloc` while this unwinds saves the diagnostics.
        assert!(defined.is_some());
        panic!("deliberate failure: the diagnostics of this Alloc must be saved");
    }));
    assert!(result.is_err(), "the closure panics");
    let (dir, domain) = seen.expect("the closure got as far as the panic");
    assert!(dir.starts_with(vm::diagnostics_root()), "{}", dir.display());

    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()))
    };
    let xml = read(&format!("{domain}.xml"));
    assert!(xml.contains(&format!("<name>{domain}</name>")), "{xml}");
    assert_eq!(read("virt-console.log"), "console: booting\n");
    assert_eq!(read("ndvtest-diag.stdout.0"), "stdout: hello\n");
    let rules = read("iptables-save.txt");
    assert!(
        rules.contains("*filter") && rules.contains("COMMIT"),
        "{rules}"
    );
    // The domain went with the guard: nothing is left on the host.
    assert!(!vm::domain_exists(&domain));

    // A passing run leaves no diagnostics to mislead a reader.
    std::fs::remove_dir_all(&dir).expect("remove the proof's diagnostics");
}
