//! Fingerprint through the real wire path, against libvirt's test driver.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use nomad_driver_virt::nomad::attribute::render;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::fingerprint_response::HealthState;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    FingerprintRequest, FingerprintResponse,
};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::shared::structs::attribute::Value;

fn rendered(response: &FingerprintResponse) -> HashMap<String, String> {
    response
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), render(v)))
        .collect()
}

#[tokio::test]
async fn healthy_against_the_test_driver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = common::test_driver_node(dir.path());
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(
            &(common::test_driver_config(&node) + "accelerator = \"tcg\"\n"),
            None,
        )
        .await
        .expect("set config");
    let mut stream = plugin
        .driver()
        .fingerprint(FingerprintRequest {})
        .await
        .expect("fingerprint")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("first fingerprint arrives at once")
        .expect("stream ok")
        .expect("a message");
    assert_eq!(first.health, HealthState::Healthy as i32, "{first:?}");
    assert_eq!(first.health_description, "Healthy");
    let attributes = rendered(&first);
    assert_eq!(attributes["driver.virt"], "true");
    assert_eq!(attributes["driver.virt.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(attributes["driver.virt.provider.libvirt"], "true");
    assert_eq!(attributes["driver.virt.provider.libvirt.driver"], "TEST");
    assert_eq!(attributes["driver.virt.accelerator"], "tcg");
    assert_eq!(
        attributes["driver.virt.provider.libvirt.uri"],
        format!("test://{}", node.display())
    );
    let readable = &attributes["driver.virt.provider.libvirt.version.readable"];
    assert_eq!(readable.split('.').count(), 3, "{readable}");
    let numeric: u64 = attributes["driver.virt.provider.libvirt.version"]
        .parse()
        .expect("int version");
    assert!(numeric >= 6_000_000, "libvirt version {numeric}");
    plugin.kill().await.expect("exit");
}

#[tokio::test]
async fn storage_pools_and_credentials_are_fingerprinted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = dir.path().join("auth-node.xml");
    let with_auth = common::TEST_NODE_XML.replacen(
        "<node>",
        "<node>\n  <auth>\n    <user password='s3cret'>admin</user>\n  </auth>",
        1,
    );
    std::fs::write(&node, with_auth).expect("write node");
    let plugin = common::launch().await;
    let config = |password: &str| {
        format!(
            "provider {{\n  libvirt {{\n    uri = \"test://{}\"\n    user = \"admin\"\n    password = \"{password}\"\n  }}\n}}\nstorage_pools {{\n  default = \"ndvpool\"\n  directory \"ndvpool\" {{\n    path = \"/var/lib/ndvpool\"\n  }}\n  directory \"later\" {{\n    path = \"/var/lib/later\"\n  }}\n}}\n",
            node.display()
        )
    };
    plugin
        .set_config_hcl(&config("wrong"), None)
        .await
        .expect("set config");
    let mut stream = plugin
        .driver()
        .fingerprint(FingerprintRequest {})
        .await
        .expect("fingerprint")
        .into_inner();
    let denied = stream.message().await.expect("stream").expect("message");
    assert_eq!(
        denied.health,
        HealthState::Unhealthy as i32,
        "wrong password must not connect"
    );
    drop(stream);

    plugin
        .set_config_hcl(&config("s3cret"), None)
        .await
        .expect("set config");
    let mut stream = plugin
        .driver()
        .fingerprint(FingerprintRequest {})
        .await
        .expect("fingerprint")
        .into_inner();
    let first = stream.message().await.expect("stream").expect("message");
    assert_eq!(first.health, HealthState::Healthy as i32, "{first:?}");
    let attributes = rendered(&first);
    assert_eq!(attributes["driver.virt.storage_pool.ndvpool"], "directory");
    assert_eq!(
        attributes["driver.virt.storage_pool.ndvpool.state"],
        "active"
    );
    assert_eq!(
        attributes["driver.virt.storage_pool.ndvpool.default"],
        "true"
    );
    assert_eq!(
        attributes["driver.virt.storage_pool.later.state"],
        "missing"
    );
    assert!(!attributes.contains_key("driver.virt.storage_pool.later.default"));
    plugin.kill().await.expect("exit");
}

#[tokio::test]
async fn unreachable_uri_is_unhealthy_with_advice_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = dir.path().join("node-appears-later.xml");
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&common::test_driver_config(&node), None)
        .await
        .expect("set config");
    let mut stream = plugin
        .driver()
        .fingerprint(FingerprintRequest {})
        .await
        .expect("fingerprint")
        .into_inner();
    let first = stream.message().await.expect("stream").expect("message");
    assert_eq!(first.health, HealthState::Unhealthy as i32, "{first:?}");
    let description = &first.health_description;
    assert!(
        description.contains(&format!("cannot connect to test://{}", node.display())),
        "{description}"
    );
    assert!(description.contains("is libvirtd running"), "{description}");
    let attributes = rendered(&first);
    assert_eq!(attributes["driver.virt"], "true");
    assert_eq!(
        attributes["driver.virt.provider.libvirt.driver"], "",
        "stale libvirt attributes are blanked"
    );

    // The URI becomes reachable: health must come back without a restart.
    std::fs::write(&node, common::TEST_NODE_XML).expect("write node");
    let recovered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let message = stream.message().await.expect("stream").expect("message");
            if message.health == HealthState::Healthy as i32 {
                return message;
            }
        }
    })
    .await
    .expect("fingerprint turns healthy within 20 s");
    assert_eq!(
        rendered(&recovered)["driver.virt.provider.libvirt.driver"],
        "TEST"
    );
    plugin.kill().await.expect("exit");
}

/// Every attribute the Go driver (hashicorp/nomad-driver-virt main:
/// `providers/providers.go`, `providers/libvirt/libvirt.go` Fingerprint,
/// `providers/libvirt/net/net_linux.go`, `providers/libvirt/storage/storage.go`)
/// emits, with its key, attribute type and value format.
#[tokio::test]
async fn every_go_driver_attribute_is_present_in_go_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = common::test_driver_node(dir.path());
    let plugin = common::launch().await;
    let config = common::test_driver_config(&node)
        + "storage_pools {\n  directory \"ndvpool\" {\n    path = \"/var/lib/ndvpool\"\n  }\n}\n";
    plugin
        .set_config_hcl(&config, None)
        .await
        .expect("set config");
    let mut stream = plugin
        .driver()
        .fingerprint(FingerprintRequest {})
        .await
        .expect("fingerprint")
        .into_inner();
    let first = stream.message().await.expect("stream").expect("message");
    assert_eq!(first.health, HealthState::Healthy as i32, "{first:?}");
    // Go: drivers.DriverHealthy.
    assert_eq!(first.health_description, "Healthy");
    let value = |key: &str| {
        first
            .attributes
            .get(key)
            .unwrap_or_else(|| panic!("attribute {key} missing: {:?}", first.attributes.keys()))
            .value
            .clone()
            .unwrap_or_else(|| panic!("attribute {key} has no value"))
    };
    let int = |key: &str| match value(key) {
        Value::IntVal(number) => number,
        other => panic!("{key} should be an int attribute, is {other:?}"),
    };
    let string = |key: &str| match value(key) {
        Value::StringVal(text) => text,
        other => panic!("{key} should be a string attribute, is {other:?}"),
    };
    let is_true = |key: &str| assert_eq!(value(key), Value::BoolVal(true), "{key}");
    // Go's computeVersion: major.minor.release of libvirt's integer.
    let readable = |number: i64| {
        format!(
            "{}.{}.{}",
            number / 1_000_000,
            (number / 1000) % 1000,
            number % 1000
        )
    };

    is_true("driver.virt");
    is_true("driver.virt.provider.libvirt");
    let version = int("driver.virt.provider.libvirt.version");
    assert!(version >= 6_000_000, "{version}");
    assert_eq!(
        string("driver.virt.provider.libvirt.version.readable"),
        readable(version)
    );
    assert_eq!(string("driver.virt.provider.libvirt.driver"), "TEST");
    let driver_version = int("driver.virt.provider.libvirt.driver.version");
    assert_eq!(
        string("driver.virt.provider.libvirt.driver.version.readable"),
        readable(driver_version)
    );
    assert_eq!(string("driver.virt.network.default.state"), "active");
    assert_eq!(string("driver.virt.network.default.bridge_name"), "virbr0");
    assert_eq!(string("driver.virt.storage_pool.ndvpool"), "directory");
    is_true("driver.virt.storage_pool.ndvpool.provider.libvirt");
    // The only pool becomes the default, as in Go.
    is_true("driver.virt.storage_pool.ndvpool.default");

    // Ours besides, never instead.
    assert_eq!(string("driver.virt.storage_pool.ndvpool.state"), "active");
    assert_eq!(
        string("driver.virt.storage_pool.ndvpool.path"),
        "/var/lib/ndvpool"
    );
    assert_eq!(string("driver.virt.version"), env!("CARGO_PKG_VERSION"));
    plugin.kill().await.expect("exit");
}

/// A Ceph pool is fingerprinted with Go's attribute names (type "ceph")
/// and ours; it is created on first use, so it is "missing" until then,
/// and the driver stays healthy. The key shows up nowhere.
#[tokio::test]
async fn ceph_pools_are_fingerprinted_without_their_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = common::test_driver_node(dir.path());
    let plugin = common::launch().await;
    let key = "AQD8bvtpvFsSHxAAetpPOmzr4VBwu1zk7YQB+w==";
    let config = common::test_driver_config(&node)
        + &format!(
            "storage_pools {{\n  ceph \"ndvtest-ceph\" {{\n    pool = \"ndvtest-rbd\"\n    \
             hosts = [\"127.0.0.1:6789\"]\n    authentication {{\n      username = \"ndvtest\"\n      \
             secret = \"{key}\"\n    }}\n  }}\n}}\n"
        );
    plugin
        .set_config_hcl(&config, None)
        .await
        .expect("set config");
    let mut stream = plugin
        .driver()
        .fingerprint(FingerprintRequest {})
        .await
        .expect("fingerprint")
        .into_inner();
    let first = stream.message().await.expect("stream").expect("message");
    assert_eq!(first.health, HealthState::Healthy as i32, "{first:?}");
    let attributes = rendered(&first);
    let prefix = "driver.virt.storage_pool.ndvtest-ceph";
    assert_eq!(attributes[prefix], "ceph");
    assert_eq!(attributes[&format!("{prefix}.provider.libvirt")], "true");
    assert_eq!(attributes[&format!("{prefix}.state")], "missing");
    assert_eq!(attributes[&format!("{prefix}.ceph_pool")], "ndvtest-rbd");
    assert!(!attributes.contains_key(&format!("{prefix}.default")));
    let shown = format!("{first:?}");
    assert!(!shown.contains(key) && !shown.contains("AQD8"), "{shown}");
    plugin.kill().await.expect("exit");
}
