//! Fingerprint through the real wire path, against libvirt's test driver.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use nomad_driver_virt::nomad::attribute::render;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::fingerprint_response::HealthState;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    FingerprintRequest, FingerprintResponse,
};

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
    assert_eq!(attributes["driver.virt.storage_pool.ndvpool"], "dir");
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
