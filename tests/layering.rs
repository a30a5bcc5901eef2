//! The libvirt layer does not leak: outside `src/libvirt/` no source file
//! names the `virt` crate, and only `src/libvirt/ffi.rs` holds `unsafe`
//! (the crate root denies `unsafe_code` everywhere else).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// Whether `line` uses the `virt` crate by path (`virt::…`), as opposed to
/// `libvirt::…` or `nomad_driver_virt::…`.
fn names_virt_crate(line: &str) -> bool {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("virt::").any(|(at, _)| {
        code[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

#[test]
fn only_the_libvirt_module_uses_the_virt_crate() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let libvirt = src.join("libvirt");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut offenders = Vec::new();
    for file in files.iter().filter(|f| !f.starts_with(&libvirt)) {
        let text = std::fs::read_to_string(file).expect("read source");
        for (number, line) in text.lines().enumerate() {
            if names_virt_crate(line) {
                offenders.push(format!(
                    "{}:{}: {}",
                    file.display(),
                    number + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "the virt crate is used outside src/libvirt/ (add a function there instead):\n{}",
        offenders.join("\n")
    );
}

#[test]
fn unsafe_code_stays_in_the_ffi_module() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let ffi = src.join("libvirt").join("ffi.rs");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| **f != ffi)
        .filter(|f| {
            std::fs::read_to_string(f)
                .expect("read source")
                .lines()
                .any(|line| line.contains("unsafe {") || line.contains("unsafe fn"))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "unsafe outside src/libvirt/ffi.rs: {offenders:?}"
    );
    let root = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    assert!(root.contains("#![deny(unsafe_code)]"));
}

#[test]
fn the_checker_sees_crate_paths_only() {
    assert!(names_virt_crate("use virt::connect::Connect;"));
    assert!(names_virt_crate("let x = (virt::sys::VIR_ERR_NO_DOMAIN);"));
    assert!(!names_virt_crate("use crate::libvirt::Libvirt;"));
    assert!(!names_virt_crate("use nomad_driver_virt::cli;"));
    assert!(!names_virt_crate("// virt::sys in a comment"));
}
