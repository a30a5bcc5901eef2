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
