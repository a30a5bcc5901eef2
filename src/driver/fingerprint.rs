//! Fingerprinting: what `nomad node status` shows about this driver, and
//! whether the scheduler may place VMs here.

use std::collections::HashMap;
use std::time::Duration;

use super::{Driver, PLUGIN_VERSION};
use crate::config::plugin::Settings;
use crate::libvirt::host::{self, HostInfo};
use crate::nomad::attribute;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::fingerprint_response::HealthState;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::FingerprintResponse;
use crate::pb::hashicorp::nomad::plugins::shared::structs::Attribute;

/// A full fingerprint is sent at least this often.
pub const FINGERPRINT_PERIOD: Duration = Duration::from_secs(30);
/// Health is checked this often so a change reaches Nomad quickly.
pub const HEALTH_CHECK_PERIOD: Duration = Duration::from_secs(5);

/// Nomad's nominal healthy description.
pub const HEALTHY_DESCRIPTION: &str = "Healthy";

/// Attribute keys that depend on a working libvirt connection; blanked
/// (Nomad deletes a node attribute whose value is "") when it is lost.
const LIBVIRT_KEYS: [&str; 8] = [
    "driver.virt.provider.libvirt",
    "driver.virt.provider.libvirt.uri",
    "driver.virt.provider.libvirt.version",
    "driver.virt.provider.libvirt.version.readable",
    "driver.virt.provider.libvirt.driver",
    "driver.virt.provider.libvirt.driver.version",
    "driver.virt.provider.libvirt.driver.version.readable",
    "driver.virt.accelerator",
];

/// Builds the response for a healthy host. Pure.
pub fn healthy(
    settings: &Settings,
    info: &HostInfo,
    kvm_device_usable: bool,
) -> FingerprintResponse {
    let accelerator =
        host::choose_accelerator(settings.accelerator, info.kvm_offered, kvm_device_usable);
    let mut attributes = base_attributes();
    attributes.insert("driver.virt.provider.libvirt".into(), attribute::bool(true));
    attributes.insert(
        "driver.virt.provider.libvirt.uri".into(),
        attribute::string(&settings.libvirt_uri),
    );
    attributes.insert(
        "driver.virt.provider.libvirt.version".into(),
        attribute::int(i64::from(info.lib_version)),
    );
    attributes.insert(
        "driver.virt.provider.libvirt.version.readable".into(),
        attribute::string(&host::readable_version(info.lib_version)),
    );
    attributes.insert(
        "driver.virt.provider.libvirt.driver".into(),
        attribute::string(&info.driver),
    );
    attributes.insert(
        "driver.virt.provider.libvirt.driver.version".into(),
        attribute::int(i64::from(info.driver_version)),
    );
    attributes.insert(
        "driver.virt.provider.libvirt.driver.version.readable".into(),
        attribute::string(&host::readable_version(info.driver_version)),
    );
    attributes.insert(
        "driver.virt.accelerator".into(),
        attribute::string(accelerator),
    );
    FingerprintResponse {
        attributes,
        health: HealthState::Healthy as i32,
        health_description: HEALTHY_DESCRIPTION.into(),
        err: String::new(),
    }
}

/// Builds the response when libvirt cannot be used. Pure.
pub fn unhealthy(description: String) -> FingerprintResponse {
    let mut attributes = base_attributes();
    for key in LIBVIRT_KEYS {
        attributes.insert(key.into(), attribute::string(""));
    }
    FingerprintResponse {
        attributes,
        health: HealthState::Unhealthy as i32,
        health_description: description,
        err: String::new(),
    }
}

/// The Go driver's spelling of a libvirt pool type (its `storage.PoolType*`
/// names); types it never had keep libvirt's name.
pub fn go_pool_type(libvirt_type: &str) -> &str {
    match libvirt_type {
        "dir" => "directory",
        "rbd" => "ceph",
        other => other,
    }
}

/// As the Go driver: `driver.virt.storage_pool.<name>` = pool type in its
/// spelling (`directory`), `.provider.libvirt = true`, `.default = true` for
/// the default pool. Ours besides: `.state` = active or inactive (or
/// "missing" for a configured pool libvirt does not have yet: it is created
/// on first use) and `.path`. Ceph pools get the same Go attributes (type
/// `ceph`) and our `.state`, plus `.ceph_pool` (the Ceph pool's name); a
/// Ceph pool that refuses the key stays `inactive`, one whose monitors do
/// not answer `missing` (it is defined only once they do), while the
/// driver and its other pools work.
pub fn add_pool_attributes(
    response: &mut FingerprintResponse,
    settings: &Settings,
    pools: &[(String, bool, String)],
) {
    for configured in &settings.pools {
        let prefix = format!("driver.virt.storage_pool.{}", configured.name);
        let found = pools.iter().find(|(name, _, _)| name == &configured.name);
        let (kind, state) = match found {
            Some((_, active, kind)) => (
                go_pool_type(kind).to_string(),
                crate::net::is_active_string(*active).to_string(),
            ),
            None => ("directory".to_string(), "missing".to_string()),
        };
        response
            .attributes
            .insert(prefix.clone(), attribute::string(&kind));
        response
            .attributes
            .insert(format!("{prefix}.provider.libvirt"), attribute::bool(true));
        response
            .attributes
            .insert(format!("{prefix}.state"), attribute::string(&state));
        response.attributes.insert(
            format!("{prefix}.path"),
            attribute::string(&configured.path.display().to_string()),
        );
        if configured.name == settings.default_pool {
            response
                .attributes
                .insert(format!("{prefix}.default"), attribute::bool(true));
        }
    }
    for configured in &settings.ceph_pools {
        let prefix = format!("driver.virt.storage_pool.{}", configured.name);
        let found = pools.iter().find(|(name, _, _)| name == &configured.name);
        let (kind, state) = match found {
            Some((_, active, kind)) => (
                go_pool_type(kind).to_string(),
                crate::net::is_active_string(*active).to_string(),
            ),
            None => ("ceph".to_string(), "missing".to_string()),
        };
        let attributes = &mut response.attributes;
        attributes.insert(prefix.clone(), attribute::string(&kind));
        attributes.insert(format!("{prefix}.provider.libvirt"), attribute::bool(true));
        attributes.insert(format!("{prefix}.state"), attribute::string(&state));
        attributes.insert(
            format!("{prefix}.ceph_pool"),
            attribute::string(&configured.pool),
        );
    }
}

/// Why guests cannot get the `clean-traffic` filter the plugin config asks
/// for, if they cannot. Only libvirt's test driver answers `Ok(None)` (no
/// network filters at all), which is not a problem.
pub fn clean_traffic_problem(
    found: &Result<Option<bool>, crate::libvirt::LibvirtError>,
) -> Option<String> {
    let fix = crate::net::CLEAN_TRAFFIC_FIX;
    match found {
        Ok(Some(true)) | Ok(None) => None,
        Ok(Some(false)) => Some(format!(
            "libvirt has no network filter \"{}\", which guests on shared bridges get; {fix}",
            crate::net::CLEAN_TRAFFIC_FILTER
        )),
        Err(error) => Some(format!(
            "cannot list libvirt's network filters ({}); guests on shared bridges need \"{}\"; {fix}",
            crate::libvirt::error::with_sources(error),
            crate::net::CLEAN_TRAFFIC_FILTER
        )),
    }
}

fn base_attributes() -> HashMap<String, Attribute> {
    HashMap::from([
        ("driver.virt".to_string(), attribute::bool(true)),
        (
            "driver.virt.version".to_string(),
            attribute::string(PLUGIN_VERSION),
        ),
    ])
}

impl Driver {
    /// Takes one fingerprint of the host now.
    pub async fn fingerprint_once(&self) -> FingerprintResponse {
        let settings = self.settings();
        let clean_traffic = settings.policy.clean_traffic;
        let result = self
            .libvirt()
            .call(move |connection| {
                let info = host::host_info(connection)?;
                let pools =
                    crate::libvirt::storage::pool_fingerprint(connection).unwrap_or_default();
                let filter = if clean_traffic {
                    Some(crate::libvirt::network::nwfilter_exists(
                        connection,
                        crate::net::CLEAN_TRAFFIC_FILTER,
                    ))
                } else {
                    None
                };
                Ok((info, pools, filter))
            })
            .await;
        match result {
            Ok((_, _, Some(filter))) if clean_traffic_problem(&filter).is_some() => {
                let problem = clean_traffic_problem(&filter).unwrap_or_default();
                tracing::warn!(problem = %problem, "clean-traffic filter unavailable");
                unhealthy(problem)
            }
            Ok((info, pools, _)) => {
                let mut response = healthy(&settings, &info, host::kvm_device_usable());
                add_pool_attributes(&mut response, &settings, &pools);
                for (key, value) in self.tasks().network_fingerprint().await {
                    response.attributes.insert(key, attribute::string(&value));
                }
                response
            }
            Err(error) => {
                tracing::warn!(error = %error, "libvirt fingerprint failed");
                unhealthy(error.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_clean_traffic_filter_is_explained() {
        assert_eq!(clean_traffic_problem(&Ok(Some(true))), None);
        assert_eq!(clean_traffic_problem(&Ok(None)), None);
        let missing = clean_traffic_problem(&Ok(Some(false))).expect("a problem");
        for part in [
            "no network filter \"clean-traffic\"",
            "libvirt-daemon-driver-nwfilter",
            "clean_traffic = false",
        ] {
            assert!(missing.contains(part), "{part} missing: {missing}");
        }
        let unhealthy = unhealthy(missing.clone());
        assert_eq!(unhealthy.health, HealthState::Unhealthy as i32);
        assert_eq!(unhealthy.health_description, missing);
    }

    #[test]
    fn pool_types_use_the_go_spelling() {
        assert_eq!(go_pool_type("dir"), "directory");
        assert_eq!(go_pool_type("rbd"), "ceph");
        assert_eq!(go_pool_type("logical"), "logical");
    }
}
