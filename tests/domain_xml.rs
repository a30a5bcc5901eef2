//! The golden domain XML files (kept equal to the renderer's output by the
//! `golden_files_match` unit test) against libvirt's own RelaxNG schema.
//! Needs `virt-xml-validate` (libvirt-clients) and xmllint (libxml2-utils),
//! installed by tests/setup/host.sh; fails, not skips, without them.

mod common;

use std::path::PathBuf;
use std::process::Command;

#[test]
fn golden_files_pass_virt_xml_validate() {
    if !common::host_ready(&[common::Need::Tool {
        program: "virt-xml-validate",
        package: "libvirt-clients",
    }]) {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/domain");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/golden/domain") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_none_or(|ext| ext != "xml") {
            continue;
        }
        let output = Command::new("virt-xml-validate")
            .arg(&path)
            .arg("domain")
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run virt-xml-validate ({e}); install it with \
                     `apt-get install libvirt-clients`"
                )
            });
        let stderr = String::from_utf8_lossy(&output.stderr);
        // virt-xml-validate is a shell script around xmllint.
        assert!(
            !stderr.contains("xmllint: not found"),
            "virt-xml-validate needs xmllint: `apt-get install libxml2-utils`"
        );
        assert!(
            output.status.success(),
            "{}: virt-xml-validate failed:\n{}{stderr}",
            path.display(),
            String::from_utf8_lossy(&output.stdout),
        );
        checked += 1;
    }
    assert!(checked >= 2, "no golden files in {}", dir.display());
}
