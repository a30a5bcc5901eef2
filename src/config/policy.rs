//! The operator's say over what a job may touch: a checked task config
//! against the plugin's [`Policy`] (networks, macvtap devices and modes,
//! storage pools, disk sizes). Pure: the facts only the host knows (the
//! network behind a bridge, default-route devices, a pool's free space)
//! are passed in. Every refusal names the job's field, its value and the
//! plugin setting that would allow it.

use super::network::{MacvtapMode, NetworkInterface};
use super::plugin::{Policy, DEFAULT_MACVTAP_MODES};
use super::task::TaskSpec;
use super::Problems;

/// Checks what can be checked without libvirt: macvtap devices (when the
/// allowed devices are known: an explicit list, or the host's default-route
/// devices passed in), macvtap modes, storage pools and explicit disk sizes.
/// `default_route_devices` is `None` when the host is not this one (the
/// `validate` command): the default device rule is then not checked.
pub fn check_task(
    spec: &TaskSpec,
    policy: &Policy,
    default_pool: &str,
    default_route_devices: Option<&[String]>,
    problems: &mut Problems,
) {
    for (index, interface) in spec.network_interfaces.iter().enumerate() {
        let NetworkInterface::Macvtap(macvtap) = interface else {
            continue;
        };
        let field = format!("network_interface[{index}].macvtap");
        let device = macvtap.device.as_str();
        if let Err(message) = check_macvtap_device(device, policy, default_route_devices) {
            problems.add(format!("{field}.device"), message);
        }
        if let Err(message) = check_macvtap_mode(macvtap.mode, policy) {
            problems.add(format!("{field}.mode"), message);
        }
    }
    for (index, disk) in spec.disks.iter().enumerate() {
        let field = format!("disk[{index}]");
        // A disk on a Nomad volume is the volume's device: no pool holds it
        // (its image is checked against the device's size when written).
        if disk.nomad_volume().is_none() {
            let (pool, pool_field) = match &disk.pool {
                Some(pool) => (pool.as_str(), format!("{field}.pool")),
                None => (
                    default_pool,
                    format!("{field}.pool (unset: the default pool)"),
                ),
            };
            if let Err(message) = check_pool(pool, policy) {
                problems.add(pool_field, message);
            }
        }
        if let Some(size) = disk.size {
            if let Err(message) = check_disk_size(size.0, None, policy) {
                problems.add(format!("{field}.size"), message);
            }
        }
    }
}

/// A `bridge` interface joins `network` (found by its bridge): allowed
/// when `allow_networks` is unset or names the network or the bridge.
pub fn check_network(bridge: &str, network: &str, policy: &Policy) -> Result<(), String> {
    let Some(allowed) = &policy.networks else {
        return Ok(());
    };
    if allowed.iter().any(|name| name == network || name == bridge) {
        return Ok(());
    }
    Err(format!(
        "{bridge:?} is the bridge of libvirt network {network:?}, which the operator does not allow \
         (allow_networks = {}); adding {network:?} to the plugin setting allow_networks would allow it",
        list(allowed)
    ))
}

/// A macvtap device: allowed when listed in `allow_macvtap_devices`, or,
/// when that is unset, when it carries the host's default route.
pub fn check_macvtap_device(
    device: &str,
    policy: &Policy,
    default_route_devices: Option<&[String]>,
) -> Result<(), String> {
    let (allowed, whence) = match (&policy.macvtap_devices, default_route_devices) {
        (Some(allowed), _) => (allowed.as_slice(), "allow_macvtap_devices"),
        (None, Some(defaults)) => (
            defaults,
            "unset allow_macvtap_devices: the devices with the host's default route",
        ),
        (None, None) => return Ok(()),
    };
    if allowed.iter().any(|name| name == device) {
        return Ok(());
    }
    Err(format!(
        "host device {device:?} is not allowed by the operator (allowed: {} from {whence}); \
         adding {device:?} to the plugin setting allow_macvtap_devices would allow it",
        list(allowed)
    ))
}

pub fn check_macvtap_mode(mode: MacvtapMode, policy: &Policy) -> Result<(), String> {
    if policy.macvtap_modes.contains(&mode) {
        return Ok(());
    }
    let modes: Vec<String> = policy
        .macvtap_modes
        .iter()
        .map(|mode| mode.as_str().to_string())
        .collect();
    let default = if policy.macvtap_modes == DEFAULT_MACVTAP_MODES {
        " (the default; passthrough gives the guest the whole host device)"
    } else {
        ""
    };
    Err(format!(
        "{:?} is not allowed by the operator (allow_macvtap_modes = {}{default}); \
         adding {:?} to the plugin setting allow_macvtap_modes would allow it",
        mode.as_str(),
        list(&modes),
        mode.as_str()
    ))
}

pub fn check_pool(pool: &str, policy: &Policy) -> Result<(), String> {
    let Some(allowed) = &policy.storage_pools else {
        return Ok(());
    };
    if allowed.iter().any(|name| name == pool) {
        return Ok(());
    }
    Err(format!(
        "storage pool {pool:?} is not allowed for job disks (allow_storage_pools = {}); \
         adding {pool:?} to the plugin setting allow_storage_pools would allow it",
        list(allowed)
    ))
}

/// A disk of `size` bytes: at most `max_disk_size`, and at most the pool's
/// free space when that is known.
pub fn check_disk_size(
    size: u64,
    pool_available: Option<(&str, u64)>,
    policy: &Policy,
) -> Result<(), String> {
    if let Some(max) = policy.max_disk_size {
        if size > max {
            return Err(format!(
                "{size} bytes ({}) is more than the operator allows (max_disk_size = {max} bytes, {}); \
                 use a smaller disk, or the plugin setting max_disk_size = \"{}\" would allow it",
                human(size),
                human(max),
                human(size)
            ));
        }
    }
    if let Some((pool, available)) = pool_available {
        if size > available {
            return Err(format!(
                "{size} bytes ({}) is more than storage pool {pool:?} has free ({available} bytes, {}); \
                 use a smaller disk or another pool, or free space in the pool",
                human(size),
                human(available)
            ));
        }
    }
    Ok(())
}

/// The disks of one pool (`(field, size)` each, plus `seed` bytes of
/// cloud-init seed in the default pool) together against its free space.
/// A disk too big on its own is named alone.
pub fn check_pool_free(
    disks: &[(String, u64)],
    seed: u64,
    pool: &str,
    available: u64,
) -> Result<(), String> {
    let total = disks
        .iter()
        .fold(seed, |sum, (_, size)| sum.saturating_add(*size));
    if total <= available {
        return Ok(());
    }
    let (what, bytes, with_seed) = match disks.iter().find(|(_, size)| *size > available) {
        Some((field, size)) => (field.clone(), *size, String::new()),
        None if disks.is_empty() => ("the cloud-init seed".to_string(), total, String::new()),
        None => {
            let fields: Vec<&str> = disks.iter().map(|(field, _)| field.as_str()).collect();
            let with_seed = if seed > 0 {
                format!(", with the {seed}-byte cloud-init seed")
            } else {
                String::new()
            };
            (format!("{} together", fields.join(" + ")), total, with_seed)
        }
    };
    Err(format!(
        "{what}: {bytes} bytes ({}{with_seed}) is more than storage pool {pool:?} has free \
         ({available} bytes, {}); use smaller disks or another pool, or free space in the pool",
        human(bytes),
        human(available)
    ))
}

/// `["a", "b"]` as HCL would spell it.
fn list<S: AsRef<str>>(items: &[S]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|item| format!("{:?}", item.as_ref()))
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// Bytes in the largest binary unit that keeps a whole number, e.g. "10GiB".
fn human(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::names::{InterfaceName, ObjectName};
    use crate::config::network::MacvtapInterface;
    use crate::config::task::DiskSpec;
    use crate::config::units::ByteSize;

    fn macvtap_task(device: &str, mode: MacvtapMode) -> TaskSpec {
        TaskSpec {
            network_interfaces: vec![NetworkInterface::Macvtap(MacvtapInterface {
                device: InterfaceName::parse(device).expect("name"),
                mode,
            })],
            ..TaskSpec::default()
        }
    }

    fn problems_of(spec: &TaskSpec, policy: &Policy, routes: Option<&[String]>) -> Vec<String> {
        let mut problems = Problems::default();
        check_task(spec, policy, "local", routes, &mut problems);
        problems
            .into_result("task config", ())
            .err()
            .map(|e| e.errors.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    #[test]
    fn macvtap_devices_default_to_the_default_route_devices() {
        let routes = vec!["eth0".to_string()];
        let policy = Policy::default();
        let eth0 = macvtap_task("eth0", MacvtapMode::Bridge);
        assert!(problems_of(&eth0, &policy, Some(&routes)).is_empty());
        let eth1 = macvtap_task("eth1", MacvtapMode::Bridge);
        let refused = problems_of(&eth1, &policy, Some(&routes));
        assert_eq!(refused.len(), 1, "{refused:?}");
        for part in [
            "network_interface[0].macvtap.device:",
            "\"eth1\"",
            "adding \"eth1\" to the plugin setting allow_macvtap_devices would allow it",
            "default route",
        ] {
            assert!(refused[0].contains(part), "{part} missing: {refused:?}");
        }
        // validate (another host): the default rule cannot be judged.
        assert!(problems_of(&eth1, &policy, None).is_empty());
        let listed = Policy {
            macvtap_devices: Some(vec!["eth1".into()]),
            ..Policy::default()
        };
        assert!(problems_of(&eth1, &listed, Some(&routes)).is_empty());
        let refused = problems_of(&eth0, &listed, None);
        assert!(
            refused[0].contains("allowed: [\"eth1\"] from allow_macvtap_devices"),
            "{refused:?}"
        );
    }

    #[test]
    fn passthrough_is_refused_by_default() {
        let routes = vec!["eth0".to_string()];
        let spec = macvtap_task("eth0", MacvtapMode::Passthrough);
        let refused = problems_of(&spec, &Policy::default(), Some(&routes));
        assert_eq!(refused.len(), 1, "{refused:?}");
        for part in [
            "network_interface[0].macvtap.mode:",
            "\"passthrough\" is not allowed",
            "adding \"passthrough\" to the plugin setting allow_macvtap_modes would allow it",
        ] {
            assert!(refused[0].contains(part), "{part} missing: {refused:?}");
        }
        for mode in DEFAULT_MACVTAP_MODES {
            assert!(problems_of(&macvtap_task("eth0", mode), &Policy::default(), None).is_empty());
        }
        let allowed = Policy {
            macvtap_modes: vec![MacvtapMode::Passthrough],
            ..Policy::default()
        };
        assert!(problems_of(&spec, &allowed, None).is_empty());
        let vepa = problems_of(&macvtap_task("eth0", MacvtapMode::Vepa), &allowed, None);
        assert!(vepa[0].contains("\"vepa\" is not allowed"), "{vepa:?}");
    }

    #[test]
    fn networks_are_matched_by_network_or_bridge_name() {
        let open = Policy::default();
        assert!(check_network("virbr0", "default", &open).is_ok());
        let listed = Policy {
            networks: Some(vec!["default".into(), "virbr7".into()]),
            ..Policy::default()
        };
        assert!(check_network("virbr0", "default", &listed).is_ok());
        assert!(check_network("virbr7", "other", &listed).is_ok());
        let refused = check_network("virbr1", "isolated", &listed).expect_err("refused");
        for part in [
            "\"virbr1\"",
            "\"isolated\"",
            "adding \"isolated\" to the plugin setting allow_networks would allow it",
        ] {
            assert!(refused.contains(part), "{part} missing: {refused}");
        }
    }

    #[test]
    fn pools_and_sizes_are_checked() {
        let policy = Policy {
            storage_pools: Some(vec!["local".into()]),
            max_disk_size: Some(10 << 30),
            ..Policy::default()
        };
        let spec = TaskSpec {
            disks: vec![
                DiskSpec {
                    size: Some(ByteSize(10 << 30)),
                    ..DiskSpec::default()
                },
                DiskSpec {
                    pool: Some(ObjectName::parse("fast").expect("name")),
                    size: Some(ByteSize(u64::MAX)),
                    ..DiskSpec::default()
                },
            ],
            ..TaskSpec::default()
        };
        let refused = problems_of(&spec, &policy, None);
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(
            refused[0].starts_with("disk[1].pool: storage pool \"fast\" is not allowed")
                && refused[0].contains(
                    "adding \"fast\" to the plugin setting allow_storage_pools would allow it"
                ),
            "{refused:?}"
        );
        assert!(
            refused[1].starts_with("disk[1].size: 18446744073709551615 bytes")
                && refused[1].contains("max_disk_size = 10737418240 bytes, 10GiB")
                && refused[1].contains("max_disk_size = \"18446744073709551615B\" would allow it"),
            "{refused:?}"
        );
        // The default pool is checked too, under the disk's pool field.
        let elsewhere = Policy {
            storage_pools: Some(vec!["fast".into()]),
            ..Policy::default()
        };
        let refused = problems_of(
            &TaskSpec {
                disks: vec![DiskSpec::default()],
                ..TaskSpec::default()
            },
            &elsewhere,
            None,
        );
        assert!(
            refused[0]
                .starts_with("disk[0].pool (unset: the default pool): storage pool \"local\""),
            "{refused:?}"
        );
    }

    #[test]
    fn disks_on_nomad_volumes_use_no_pool() {
        let policy = Policy {
            storage_pools: Some(Vec::new()),
            max_disk_size: Some(1 << 20),
            ..Policy::default()
        };
        let on_volume = DiskSpec {
            volume: Some("/dev/ndvtest".into()),
            ..DiskSpec::default()
        };
        let spec = TaskSpec {
            disks: vec![on_volume, DiskSpec::default()],
            ..TaskSpec::default()
        };
        let refused = problems_of(&spec, &policy, None);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].starts_with("disk[1].pool"), "{refused:?}");
    }

    #[test]
    fn disks_of_a_pool_are_summed_against_its_free_space() {
        let disks = vec![
            ("disk[0].size".to_string(), 1 << 30),
            ("disk[1].size".to_string(), 1 << 30),
        ];
        assert!(check_pool_free(&disks, 0, "p", 2 << 30).is_ok());
        let refused = check_pool_free(&disks, 4096, "p", 2 << 30).expect_err("full");
        for part in [
            "disk[0].size + disk[1].size together: 2147487744 bytes",
            "with the 4096-byte cloud-init seed",
            "more than storage pool \"p\" has free (2147483648 bytes, 2GiB)",
        ] {
            assert!(refused.contains(part), "{part} missing: {refused}");
        }
        let alone = check_pool_free(&disks, 0, "p", 1 << 29).expect_err("full");
        assert!(
            alone.starts_with("disk[0].size: 1073741824 bytes (1GiB) is more"),
            "{alone}"
        );
        let seed_only = check_pool_free(&[], 4096, "p", 0).expect_err("full");
        assert!(
            seed_only.starts_with("the cloud-init seed: 4096 bytes"),
            "{seed_only}"
        );
    }

    #[test]
    fn pool_free_space_is_a_limit() {
        let policy = Policy::default();
        assert!(check_disk_size(1 << 30, Some(("p", 1 << 30)), &policy).is_ok());
        let refused = check_disk_size(2 << 30, Some(("p", 1 << 30)), &policy).expect_err("too big");
        assert!(
            refused.contains("more than storage pool \"p\" has free (1073741824 bytes, 1GiB)"),
            "{refused}"
        );
        assert_eq!(human(1536), "1536B");
        assert_eq!(human(3 << 20), "3MiB");
    }
}
