//! Pure planning: turns Nomad's task description and the typed task config
//! into names, resources, device letters and guest mount commands.

use std::collections::BTreeSet;

use crate::config::task::{DiskBus, DiskSpec};

/// The libvirt domain name: `<task>-<last 8 chars of the task id>`.
///
/// Nomad task ids are `<alloc id>/<task name>/<8 random chars>`; the task
/// name is reduced to characters libvirt names allow.
pub fn domain_name(task_name: &str, task_id: &str) -> String {
    let suffix: String = task_id
        .rsplit('/')
        .next()
        .unwrap_or(task_id)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let suffix: String = suffix
        .chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let mut base = String::new();
    for c in task_name.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            base.push(c);
        } else if !base.ends_with('-') {
            base.push('-');
        }
    }
    let base: String = base.trim_matches('-').chars().take(48).collect();
    let base = if base.is_empty() {
        "task".to_string()
    } else {
        base
    };
    if suffix.is_empty() {
        base
    } else {
        format!("{base}-{suffix}")
    }
}

/// Memory and CPU for the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmResources {
    /// Maximum memory (Nomad's memory_max, else memory), KiB.
    pub memory_kib: u64,
    /// Memory at boot (Nomad's memory), KiB.
    pub current_memory_kib: u64,
    pub vcpus: u32,
    /// Host cores reserved for the task (`resources { cores }`), libvirt syntax.
    pub cpuset: Option<String>,
    /// Relative CPU weight (Nomad's cpu MHz as shares).
    pub cpu_shares: Option<u64>,
}

/// Smallest memory we boot a VM with.
pub const MIN_MEMORY_MB: i64 = 64;

/// Largest memory given to libvirt (16 TiB, in KiB): beyond any host, and
/// far below where KiB or byte counts could overflow.
pub const MAX_MEMORY_KIB: u64 = 16 << 30;

/// The one memory rule, shared by StartTask and `validate`.
pub fn check_memory(memory_mb: i64) -> Result<(), String> {
    if memory_mb < MIN_MEMORY_MB {
        return Err(format!(
            "{memory_mb} MB is too little for a VM; give at least {MIN_MEMORY_MB} MB"
        ));
    }
    Ok(())
}

/// Derives VM resources from what Nomad allocated.
///
/// vCPUs: one per reserved core when cores are reserved; otherwise enough
/// cores to cover the task's MHz at the host's per-core speed, at least one,
/// at most the host's CPU count.
pub fn vm_resources(
    memory_mb: i64,
    memory_max_mb: i64,
    cpu_mhz: i64,
    cpuset_cpus: &str,
    host_mhz_per_core: u64,
    host_cpus: u32,
) -> Result<VmResources, String> {
    check_memory(memory_mb).map_err(|problem| format!("resources.memory: {problem}"))?;
    let max_mb = memory_max_mb.max(memory_mb);
    let cores = parse_cpuset(cpuset_cpus)?;
    let vcpus = if !cores.is_empty() {
        cores.len() as u32
    } else if cpu_mhz > 0 && host_mhz_per_core > 0 {
        let needed = (cpu_mhz as u64).div_ceil(host_mhz_per_core);
        needed.clamp(1, u64::from(host_cpus.max(1))) as u32
    } else {
        1
    };
    // Nomad's values are i64: a huge one must be refused, not wrapped.
    let kib = |mb: i64| {
        u64::try_from(mb)
            .ok()
            .and_then(|mb| mb.checked_mul(1024))
            .filter(|kib| *kib <= MAX_MEMORY_KIB)
            .ok_or_else(|| {
                format!(
                    "resources.memory: {mb} MB is more than a VM can have; give at most {} MB",
                    MAX_MEMORY_KIB / 1024
                )
            })
    };
    Ok(VmResources {
        memory_kib: kib(max_mb)?,
        current_memory_kib: kib(memory_mb)?,
        vcpus,
        cpuset: (!cores.is_empty()).then(|| cpuset_cpus.trim().to_string()),
        cpu_shares: (cpu_mhz > 0).then_some(cpu_mhz as u64),
    })
}

/// Parses Nomad's reserved-core list ("0,2-3") into core numbers.
pub fn parse_cpuset(text: &str) -> Result<BTreeSet<u32>, String> {
    let mut cores = BTreeSet::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("reserved cores {text:?} are not a cpuset list such as \"0,2-3\"");
        match part.split_once('-') {
            Some((start, end)) => {
                let start: u32 = start.parse().map_err(|_| bad())?;
                let end: u32 = end.parse().map_err(|_| bad())?;
                if end < start || end - start > 4096 {
                    return Err(bad());
                }
                cores.extend(start..=end);
            }
            None => {
                cores.insert(part.parse().map_err(|_| bad())?);
            }
        }
    }
    Ok(cores)
}

/// Guest device names for the task's disks plus one more for the seed
/// cdrom, unique per bus prefix: vdX for virtio, hdX for ide, sdX otherwise.
pub fn device_names(
    disks: &[DiskSpec],
    seed_bus: DiskBus,
) -> Result<(Vec<String>, String), String> {
    let mut used: BTreeSet<String> = disks
        .iter()
        .filter_map(|d| d.devname.as_ref().map(|name| name.as_str().to_string()))
        .collect();
    let mut next = |bus: DiskBus| -> Result<String, String> {
        let prefix = bus_prefix(bus);
        for letter in 'a'..='z' {
            let candidate = format!("{prefix}{letter}");
            if used.insert(candidate.clone()) {
                return Ok(candidate);
            }
        }
        Err(format!("too many disks on the {bus} bus"))
    };
    let mut names = Vec::new();
    for disk in disks {
        match &disk.devname {
            Some(name) => names.push(name.as_str().to_string()),
            None => names.push(next(disk.bus())?),
        }
    }
    let seed = next(seed_bus)?;
    Ok((names, seed))
}

fn bus_prefix(bus: DiskBus) -> &'static str {
    match bus {
        DiskBus::Virtio => "vd",
        DiskBus::Ide => "hd",
        DiskBus::Sata | DiskBus::Scsi | DiskBus::Usb => "sd",
    }
}

/// A host directory shared into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestShare {
    pub host_dir: std::path::PathBuf,
    pub tag: String,
    pub guest_path: String,
    pub read_only: bool,
}

/// Quotes a string for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names() {
        assert_eq!(domain_name("web", "f1e2/web/abcd1234"), "web-abcd1234");
        assert_eq!(
            domain_name("my task!", "x/my task!/12345678"),
            "my-task-12345678"
        );
        assert_eq!(domain_name("'/><evil", "a/b/1234abcd"), "evil-1234abcd");
        let long = domain_name(&"n".repeat(100), "a/b/12345678");
        assert!(long.len() <= 64, "{long}");
    }

    #[test]
    fn resources_from_cores_or_mhz() {
        let reserved = vm_resources(512, 0, 1000, "0,2-3", 2000, 8).expect("valid");
        assert_eq!(reserved.vcpus, 3);
        assert_eq!(reserved.cpuset.as_deref(), Some("0,2-3"));
        assert_eq!(reserved.memory_kib, 512 * 1024);
        let shared = vm_resources(512, 1024, 4500, "", 2000, 8).expect("valid");
        assert_eq!(
            shared.vcpus, 3,
            "4500 MHz at 2000 MHz per core needs 3 cores"
        );
        assert_eq!(shared.memory_kib, 1024 * 1024);
        assert_eq!(shared.current_memory_kib, 512 * 1024);
        assert_eq!(shared.cpu_shares, Some(4500));
        let capped = vm_resources(512, 0, 100_000, "", 2000, 2).expect("valid");
        assert_eq!(capped.vcpus, 2);
        assert!(vm_resources(32, 0, 100, "", 2000, 2)
            .unwrap_err()
            .contains("at least 64 MB"));
        assert!(vm_resources(512, 0, 100, "0-x", 2000, 2).is_err());
        // Huge values from Nomad are refused, never wrapped.
        for (memory, max) in [(i64::MAX, 0), (512, i64::MAX), (1 << 45, 0)] {
            let error = vm_resources(memory, max, i64::MAX, "", 2000, 2).expect_err("too big");
            assert!(error.starts_with("resources.memory:"), "{error}");
        }
        let huge_cpu = vm_resources(512, 0, i64::MAX, "", 1, u32::MAX).expect("valid");
        assert_eq!(huge_cpu.vcpus, u32::MAX);
    }

    #[test]
    fn device_letters_do_not_collide() {
        let disks = vec![
            DiskSpec::default(),
            DiskSpec {
                devname: Some(crate::config::names::GuestDeviceName::parse("vdb").expect("name")),
                ..Default::default()
            },
            DiskSpec::default(),
            DiskSpec {
                kind: crate::config::task::DiskKind::Cdrom,
                ..Default::default()
            },
        ];
        let (names, seed) = device_names(&disks, DiskBus::Ide).expect("names");
        assert_eq!(names, vec!["vda", "vdb", "vdc", "hda"]);
        assert_eq!(seed, "hdb");
    }
}
