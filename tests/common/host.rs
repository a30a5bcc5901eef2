//! Host tests: what a test needs from the machine, and what happens when it
//! is missing.
//!
//! A test that needs root or host tools starts with
//! `if !common::host_ready(NEEDS) { return; }`. Plain `cargo test` then
//! skips it on a machine without them, saying why and how to run it in one
//! line on stderr (once per reason per test binary). With
//! `NOMAD_DRIVER_VIRT_HOST_TESTS=1` (tests/ci.sh exports it) a missing
//! prerequisite fails the test instead, with the command that fixes it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use super::vm::guest_dir;

/// Set to anything but empty or `0` to make host tests mandatory.
pub const HOST_TESTS_VAR: &str = "NOMAD_DRIVER_VIRT_HOST_TESTS";

/// One prerequisite of a host test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Effective uid 0: network namespaces, iptables, qemu:///system.
    Root,
    /// libvirtd answering at qemu:///system.
    Libvirtd,
    /// The test guest image (tests/setup/guest.sh).
    GuestImage,
    /// The single-node Ceph cluster of tests/setup/ceph.sh: answering,
    /// with pool `ndvtest-rbd`, client.ndvtest's key readable, and
    /// libvirt offering rbd pools.
    Ceph,
    /// A program on PATH, and the Debian package that provides it.
    Tool {
        program: &'static str,
        package: &'static str,
    },
}

/// Booting the test guest through the plugin (which maps ports with iptables).
pub const VM: &[Need] = &[
    Need::Root,
    Need::Libvirtd,
    Need::GuestImage,
    IP,
    IPTABLES,
    IPTABLES_SAVE,
    IPTABLES_RESTORE,
];

/// Real iptables inside a network namespace the test creates.
pub const NETNS_IPTABLES: &[Need] = &[Need::Root, IP, IPTABLES, IPTABLES_SAVE, IPTABLES_RESTORE];

pub const IP: Need = Need::Tool {
    program: "ip",
    package: "iproute2",
};
pub const IPTABLES: Need = Need::Tool {
    program: "iptables",
    package: "iptables",
};
pub const IPTABLES_SAVE: Need = Need::Tool {
    program: "iptables-save",
    package: "iptables",
};
pub const IPTABLES_RESTORE: Need = Need::Tool {
    program: "iptables-restore",
    package: "iptables",
};

/// Whether the host has everything in `needs`. When it does not: returns
/// false after one line on stderr (skip mode), or panics with the fix when
/// [`HOST_TESTS_VAR`] is set.
pub fn host_ready(needs: &[Need]) -> bool {
    let Some((reason, fix)) = needs.iter().find_map(|need| missing(*need)) else {
        return true;
    };
    if mandatory() {
        panic!("{HOST_TESTS_VAR} is set, but {reason}: {fix}");
    }
    note_skip(&reason, &fix);
    false
}

/// Whether host tests must run (CI) rather than skip.
fn mandatory() -> bool {
    std::env::var_os(HOST_TESTS_VAR).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Prints the skip line once per distinct reason in this test binary.
/// Written to the real stderr: libtest would swallow `eprintln!` output of
/// a passing test.
fn note_skip(reason: &str, fix: &str) {
    static SEEN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let first = SEEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(reason.to_string());
    if first {
        let binary = test_binary();
        // One write, so libtest's own output cannot split the line.
        let line = format!(
            "{binary}: skipping host tests: {reason}. To run them: {fix}; then `{HOST_TESTS_VAR}=1 cargo test --test {binary}`\n"
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// The test target's name (`iptables_netns` for `iptables_netns-0123abcd...`).
fn test_binary() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let stem = exe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name.to_string()
        }
        _ => stem,
    }
}

/// Why `need` is not met and what fixes it, or `None` when it is met.
/// Each answer is computed once per test binary.
fn missing(need: Need) -> Option<(String, String)> {
    static ROOT: OnceLock<bool> = OnceLock::new();
    static LIBVIRTD: OnceLock<bool> = OnceLock::new();
    static CEPH: OnceLock<Option<String>> = OnceLock::new();
    match need {
        Need::Ceph => CEPH.get_or_init(ceph_problem).clone().map(|reason| {
            (
                reason,
                "run `bash tests/setup/host.sh` and `bash tests/setup/ceph.sh` as root".to_string(),
            )
        }),
        Need::Root => (!*ROOT.get_or_init(is_root)).then(|| {
            (
                "not running as root".to_string(),
                "become root and run `bash tests/setup/host.sh`".to_string(),
            )
        }),
        Need::Libvirtd => (!*LIBVIRTD.get_or_init(libvirtd_answers)).then(|| {
            (
                "libvirtd is not reachable at qemu:///system".to_string(),
                "run `bash tests/setup/host.sh` as root".to_string(),
            )
        }),
        Need::GuestImage => {
            let image = guest_image();
            (!image.is_file()).then(|| {
                (
                    format!("the test guest {} is missing", image.display()),
                    format!(
                        "run `bash tests/setup/guest.sh {}` as root",
                        guest_dir().display()
                    ),
                )
            })
        }
        Need::Tool { program, package } => (!on_path(program)).then(|| {
            (
                format!("`{program}` is not on PATH"),
                format!("`apt-get install -y --no-install-recommends {package}`"),
            )
        }),
    }
}

/// The qcow2 image tests/setup/guest.sh builds.
pub fn guest_image() -> PathBuf {
    guest_dir().join("guest.qcow2")
}

/// Effective uid 0, read from /proc (no unsafe FFI in tests).
fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// The Ceph pool and user tests/setup/ceph.sh makes.
pub const CEPH_POOL: &str = "ndvtest-rbd";
pub const CEPH_USER: &str = "ndvtest";
pub const CEPH_KEY_FILE: &str = "/etc/ceph/ceph.client.ndvtest.key";

/// Why the test cluster is not usable, or `None` when it is.
fn ceph_problem() -> Option<String> {
    if std::fs::read_to_string(CEPH_KEY_FILE).is_err() {
        return Some(format!("the Ceph test key {CEPH_KEY_FILE} is missing"));
    }
    let listed = std::process::Command::new("timeout")
        .args(["30", "rbd", "--id", CEPH_USER, "--keyfile", CEPH_KEY_FILE])
        .args(["-m", "127.0.0.1:6789", "ls", CEPH_POOL])
        .stdin(std::process::Stdio::null())
        .output();
    if !listed.is_ok_and(|out| out.status.success()) {
        return Some(format!(
            "the Ceph test cluster does not answer (`rbd ls {CEPH_POOL}` as client.{CEPH_USER})"
        ));
    }
    let caps = std::process::Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "pool-capabilities"])
        .output();
    match caps {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("type='rbd' supported='yes'") => {
            None
        }
        _ => Some("libvirtd offers no rbd storage pools".to_string()),
    }
}

fn libvirtd_answers() -> bool {
    std::process::Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "version"])
        .stdin(std::process::Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Whether `program` is an executable file in a PATH directory, which is
/// where `Command::new(program)` will look for it.
fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program))
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    })
}
