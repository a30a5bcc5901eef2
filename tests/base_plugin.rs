//! BasePlugin and the driver's static answers, over the real wire path.

mod common;

use nomad_driver_virt::pb::hashicorp::nomad::plugins::base::proto::{
    NomadConfig, NomadDriverConfig, PluginInfoRequest, PluginType, SetConfigRequest,
};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    CapabilitiesRequest, ExecTaskRequest, InitRequest, ShutdownRequest, SignalTaskRequest,
};

#[tokio::test]
async fn plugin_info_identifies_a_virt_driver() {
    let plugin = common::launch().await;
    let info = plugin
        .base()
        .plugin_info(PluginInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.r#type, PluginType::Driver as i32);
    assert_eq!(info.plugin_api_versions, vec!["v0.1.0".to_string()]);
    assert_eq!(info.plugin_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.name, "virt");
    plugin.kill().await.expect("exit");
}

#[tokio::test]
async fn set_config_accepts_no_config_and_a_full_one() {
    let plugin = common::launch().await;
    // Empty bytes (no schema data) and an empty block both mean defaults.
    plugin
        .base()
        .set_config(SetConfigRequest {
            msgpack_config: Vec::new(),
            nomad_config: None,
            plugin_api_version: "v0.1.0".into(),
        })
        .await
        .expect("empty config uses defaults");
    plugin
        .set_config_hcl("", None)
        .await
        .expect("an empty config block uses defaults");
    let nomad_config = NomadConfig {
        driver: Some(NomadDriverConfig {
            client_max_port: 14512,
            client_min_port: 14000,
            topology: None,
        }),
    };
    plugin
        .set_config_hcl(
            r#"
provider {
  libvirt {
    uri = "test:///default"
  }
}
image_paths = ["/var/lib/virt/images"]
storage_pools {
  directory "local" {
    path = "/var/lib/virt/pools/local"
  }
}
accelerator = "tcg"
log_level   = "DEBUG"
"#,
            Some(nomad_config),
        )
        .await
        .expect("full config");
    plugin.kill().await.expect("exit");
}

#[tokio::test]
async fn invalid_config_is_invalid_argument_naming_the_attribute() {
    let plugin = common::launch().await;
    for (body, attribute, advice) in [
        ("accelerator = \"hvf\"", "accelerator", "\"auto\", \"kvm\", \"tcg\""),
        ("image_paths = [\"relative\"]", "image_paths[0]", "absolute"),
        ("log_level = \"chatty\"", "log_level", "trace, debug, info"),
        (
            "storage_pools {\n  directory \"a\" {\n    path = \"/a\"\n  }\n  directory \"b\" {\n    path = \"/b\"\n  }\n}",
            "storage_pools.default",
            "more than one pool",
        ),
    ] {
        let error = plugin.set_config_hcl(body, None).await.expect_err(body);
        let status = error.downcast_ref::<tonic::Status>().unwrap_or_else(|| panic!("{body}: not a gRPC status: {error:#}"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{body}: {status:?}");
        assert!(status.message().contains(attribute), "{body}: {}", status.message());
        assert!(status.message().contains(advice), "{body}: {}", status.message());
    }
    // Garbage bytes are a clear error too, not a crash.
    let status = plugin
        .base()
        .set_config(SetConfigRequest {
            msgpack_config: vec![0xc1, 0xff],
            nomad_config: None,
            plugin_api_version: "v0.1.0".into(),
        })
        .await
        .expect_err("garbage");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("invalid plugin config"),
        "{}",
        status.message()
    );
    plugin.kill().await.expect("exit");
}

#[tokio::test]
async fn capabilities_schema_and_unsupported_rpcs() {
    let plugin = common::launch().await;
    let mut driver = plugin.driver();
    driver.init(InitRequest {}).await.expect("init");
    let caps = driver
        .capabilities(CapabilitiesRequest {})
        .await
        .expect("caps")
        .into_inner()
        .capabilities
        .expect("set");
    assert_eq!(caps.fs_isolation, 2, "IMAGE");
    assert_eq!(caps.mount_configs, 0, "ANY_MOUNTS so volume_mount works");
    assert!(!caps.disable_log_collection, "log collection on");
    assert!(
        caps.exec && caps.send_signals,
        "exec and signals through the guest agent"
    );
    assert_eq!(caps.network_isolation_modes, vec![0], "HOST");

    let schema = plugin.task_config_schema().await.expect("task schema");
    let nomad_driver_virt::nomad::hclspec::Spec::Object(fields) = schema else {
        panic!("object schema")
    };
    for field in [
        "hostname",
        "user_data",
        "cmds",
        "os",
        "disk",
        "network_interface",
        "timezone",
        "guest_agent",
        "signal_commands",
        "shared_dirs_driver",
    ] {
        assert!(fields.contains_key(field), "task schema lacks {field}");
    }

    let status = driver
        .exec_task(ExecTaskRequest {
            task_id: "x".into(),
            command: vec![],
            timeout: None,
        })
        .await
        .expect_err("exec");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("\"x\""), "{}", status.message());
    let status = driver
        .signal_task(SignalTaskRequest {
            task_id: "x".into(),
            signal: "SIGHUP".into(),
        })
        .await
        .expect_err("signal");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    driver
        .shutdown(ShutdownRequest {})
        .await
        .expect("driver shutdown answers");
    plugin.kill().await.expect("exit");
}
