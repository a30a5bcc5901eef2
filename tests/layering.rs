//! The layers do not leak: outside `src/libvirt/` no source file names the
//! `virt` crate, only `src/libvirt/ffi.rs` holds `unsafe` (the crate root
//! denies `unsafe_code` everywhere else), and Nomad's protos and the gRPC
//! stack stay in the transport, driver, simulator and CLI layers.

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

/// Modules (directories or files under src/) that may name a proto type or
/// the gRPC stack: the transport, the driver services and their
/// conversions, Nomad's vocabulary, the Nomad-client simulator and the CLI
/// built on it.
const PROTO_LAYERS: [&str; 7] = [
    "src/plugin/",
    "src/driver/",
    "src/nomad/",
    "src/nomad_client/",
    "src/cli/",
    "src/pb.rs",
    "src/main.rs",
];

/// Source lines of every file under src/, as (path relative to the crate, line number, text),
/// without comments.
fn source_lines() -> Vec<(String, usize, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(files.len() > 20, "src/ has only {} files?", files.len());
    let mut lines = Vec::new();
    for file in files {
        let relative = file
            .strip_prefix(root)
            .expect("under the crate")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&file).expect("read source");
        for (index, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            lines.push((relative.clone(), index + 1, code.to_string()));
        }
    }
    lines
}

/// Whether `code` uses the path `name::` as a path root (not as the tail
/// of another name, e.g. `nomad_driver_virt::`).
fn uses_path(code: &str, name: &str) -> bool {
    let needle = format!("{name}::");
    code.match_indices(&needle).any(|(at, _)| {
        code[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

fn violations(allowed: impl Fn(&str) -> bool, uses: impl Fn(&str) -> bool) -> Vec<String> {
    source_lines()
        .into_iter()
        .filter(|(path, _, code)| !allowed(path) && uses(code))
        .map(|(path, line, code)| format!("{path}:{line}: {}", code.trim()))
        .collect()
}

#[test]
fn protos_and_grpc_stay_in_the_transport_and_driver_layers() {
    let found = violations(
        |path| PROTO_LAYERS.iter().any(|layer| path.starts_with(layer)),
        |code| {
            code.contains("crate::pb")
                || uses_path(code, "pb")
                || uses_path(code, "tonic")
                || uses_path(code, "prost")
                || uses_path(code, "prost_types")
        },
    );
    assert!(
        found.is_empty(),
        "proto or gRPC types below the driver layer (convert in src/driver/convert.rs instead):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_proto_check_sees_path_roots_only() {
    assert!(uses_path("tonic::Status::internal(x)", "tonic"));
    assert!(uses_path("use crate::pb::x;", "pb"));
    assert!(!uses_path("a monotonic::clock", "tonic"));
    assert!(!uses_path("use nomad_driver_virt::task;", "virt"));
}
