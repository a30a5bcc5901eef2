//! The go-plugin transport as Nomad's client sees it: cookie, handshake,
//! socket, internal services, signals, logs.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use nomad_driver_virt::nomad_client::LaunchOptions;
use nomad_driver_virt::pb::plugin::{ConnInfo, Empty};
use nomad_driver_virt::plugin::handshake::MAGIC_COOKIE_KEY;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};

fn run_without_nomad(cookie: Option<&str>) -> std::process::Output {
    let mut command = std::process::Command::new(common::plugin_binary());
    command.env_remove(MAGIC_COOKIE_KEY);
    if let Some(cookie) = cookie {
        command.env(MAGIC_COOKIE_KEY, cookie);
    }
    command.output().expect("run plugin binary")
}

#[test]
fn without_cookie_it_explains_and_exits_1() {
    let output = run_without_nomad(None);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        output.stdout.is_empty(),
        "stdout: {:?}",
        String::from_utf8_lossy(&output.stdout)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("This binary is a plugin. These are not meant to be executed directly."),
        "{stderr}"
    );
}

#[test]
fn wrong_cookie_is_refused_like_no_cookie() {
    let output = run_without_nomad(Some("not-the-cookie"));
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert!(String::from_utf8_lossy(&output.stderr).contains("This binary is a plugin"));
}

#[tokio::test]
async fn client_without_version_2_rejects_the_handshake() {
    let options = LaunchOptions {
        protocol_versions: "1".into(),
        accepted_app_versions: vec![1],
        ..LaunchOptions::default()
    };
    let error =
        nomad_driver_virt::nomad_client::PluginClient::launch(&common::plugin_binary(), options)
            .await
            .err()
            .expect("handshake must be refused");
    assert!(
        error
            .to_string()
            .contains("Incompatible API version with plugin. Plugin version: 2"),
        "{error}"
    );
}

#[tokio::test]
async fn socket_dir_is_honoured_private_and_removed_after_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = LaunchOptions {
        env: vec![(
            "PLUGIN_UNIX_SOCKET_DIR".into(),
            dir.path().display().to_string(),
        )],
        ..LaunchOptions::default()
    };
    let plugin = common::launch_with(options).await;
    let socket = plugin.socket_path();
    let private_dir = socket.parent().expect("socket dir").to_path_buf();
    assert_eq!(
        private_dir.parent(),
        Some(dir.path()),
        "socket {socket:?} not in a directory of its own in the requested dir"
    );
    let dir_mode = std::fs::metadata(&private_dir)
        .expect("socket dir exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        dir_mode, 0o700,
        "the socket's directory is private: {dir_mode:o}"
    );
    let mode = std::fs::metadata(&socket)
        .expect("socket exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        mode, 0o600,
        "socket must not be usable by other users: {mode:o}"
    );

    let mut health = HealthClient::new(plugin.channel());
    let status = health
        .check(HealthCheckRequest {
            service: "plugin".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let status = plugin.kill().await.expect("plugin exits");
    assert!(status.success(), "exit status {status:?}");
    assert!(!socket.exists(), "socket {socket:?} left behind");
    assert!(
        !private_dir.exists(),
        "socket dir {private_dir:?} left behind"
    );
}

#[tokio::test]
async fn socket_group_is_honoured() {
    if !common::host_ready(&[common::Need::Root]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // gid 1 ("daemon" on Debian) differs from root's group 0.
    let options = LaunchOptions {
        env: vec![
            (
                "PLUGIN_UNIX_SOCKET_DIR".into(),
                dir.path().display().to_string(),
            ),
            ("PLUGIN_UNIX_SOCKET_GROUP".into(), "daemon".into()),
        ],
        ..LaunchOptions::default()
    };
    let plugin = common::launch_with(options).await;
    let metadata = std::fs::metadata(plugin.socket_path()).expect("socket exists");
    assert_eq!(metadata.gid(), 1, "socket group");
    assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
    let socket_path = plugin.socket_path();
    let dir = std::fs::metadata(socket_path.parent().expect("dir")).expect("dir exists");
    assert_eq!((dir.gid(), dir.permissions().mode() & 0o777), (1, 0o750));
    plugin.kill().await.expect("exit");
}

#[tokio::test]
async fn unknown_socket_group_fails_clearly() {
    let output = tokio::process::Command::new(common::plugin_binary())
        .env(
            MAGIC_COOKIE_KEY,
            nomad_driver_virt::plugin::handshake::MAGIC_COOKIE_VALUE,
        )
        .env("PLUGIN_UNIX_SOCKET_GROUP", "no-such-group-here")
        .output()
        .await
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "no handshake may be printed");
    assert!(String::from_utf8_lossy(&output.stderr).contains("no-such-group-here"));
}

#[tokio::test]
async fn internal_services_answer_and_only_one_stdout_line_is_written() {
    let plugin = common::launch().await;
    let mut health = HealthClient::new(plugin.channel());
    for service in ["plugin", ""] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }

    // Stdio: the stream opens and stays open (no data, no error).
    let mut stdio =
        nomad_driver_virt::pb::plugin::grpc_stdio_client::GrpcStdioClient::new(plugin.channel());
    let mut stream = stdio
        .stream_stdio(())
        .await
        .expect("stdio stream opens")
        .into_inner();
    let idle = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
    assert!(idle.is_err(), "stdio stream should idle, got {idle:?}");

    // Broker: accepts our connection info and holds the stream open.
    let mut broker =
        nomad_driver_virt::pb::plugin::grpc_broker_client::GrpcBrokerClient::new(plugin.channel());
    let outgoing = tokio_stream::iter(vec![ConnInfo {
        service_id: 7,
        network: "unix".into(),
        address: "/x".into(),
        knock: None,
    }])
    .chain(tokio_stream::pending());
    let mut incoming = broker
        .start_stream(outgoing)
        .await
        .expect("broker stream opens")
        .into_inner();
    let idle = tokio::time::timeout(Duration::from_millis(300), incoming.message()).await;
    assert!(idle.is_err(), "broker stream should idle, got {idle:?}");

    // Shutdown ends the open streams and the process.
    let mut controller = plugin.controller();
    controller
        .shutdown(Empty {})
        .await
        .expect("shutdown answers");
    let ended = tokio::time::timeout(Duration::from_secs(3), stream.message()).await;
    assert!(
        matches!(ended, Ok(Ok(None)) | Ok(Err(_))),
        "stdio stream must end at shutdown: {ended:?}"
    );
    let extra = plugin.extra_stdout_lines();
    let status = plugin.kill().await.expect("exit");
    assert!(status.success(), "{status:?}");
    assert!(
        extra.is_empty(),
        "stdout must hold only the handshake: {extra:?}"
    );
}

use tokio_stream::StreamExt;

#[tokio::test]
async fn sigint_is_ignored_and_sigterm_exits_cleanly() {
    let mut plugin = common::launch().await;
    plugin.signal(libc::SIGINT).expect("send SIGINT");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(plugin.is_running(), "SIGINT must not stop the plugin");
    let mut health = HealthClient::new(plugin.channel());
    health
        .check(HealthCheckRequest {
            service: "plugin".into(),
        })
        .await
        .expect("still serving after SIGINT");

    let socket = plugin.socket_path();
    plugin.signal(libc::SIGTERM).expect("send SIGTERM");
    let status = plugin
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("wait")
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "socket removed after SIGTERM");
}

#[tokio::test]
async fn stderr_lines_are_hclog_json() {
    let plugin = common::launch().await;
    let mut base = plugin.base();
    base.plugin_info(
        nomad_driver_virt::pb::hashicorp::nomad::plugins::base::proto::PluginInfoRequest {},
    )
    .await
    .expect("plugin info");
    let status = plugin_kill_and_lines(plugin).await;
    assert!(
        !status.is_empty(),
        "the plugin logs at least its start and stop"
    );
    for line in status {
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let level = value["@level"]
            .as_str()
            .unwrap_or_else(|| panic!("@level not a string: {line}"));
        assert!(
            ["trace", "debug", "info", "warn", "error"].contains(&level),
            "{line}"
        );
        assert!(value["@message"].is_string(), "{line}");
        assert!(
            value["@module"]
                .as_str()
                .is_some_and(|m| m.starts_with("virt")),
            "{line}"
        );
        let stamp = value["@timestamp"]
            .as_str()
            .unwrap_or_else(|| panic!("no timestamp: {line}"));
        assert!(
            chrono::DateTime::parse_from_str(stamp, "%Y-%m-%dT%H:%M:%S%.6f%:z").is_ok(),
            "timestamp {stamp} does not match Go's 2006-01-02T15:04:05.000000Z07:00"
        );
        let fraction = stamp.split('.').nth(1).unwrap_or_default();
        assert_eq!(
            fraction.chars().take_while(char::is_ascii_digit).count(),
            6,
            "{stamp}"
        );
    }
}

async fn plugin_kill_and_lines(
    plugin: nomad_driver_virt::nomad_client::PluginClient,
) -> Vec<String> {
    // Keep a handle on the line buffer before kill() consumes the client.
    let lines = plugin.stderr_buffer();
    plugin.kill().await.expect("exit");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines = lines.lock().map(|l| l.clone()).unwrap_or_default();
    lines
}

/// Levels of the JSON lines a plugin wrote.
fn levels(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|value| value["@level"].as_str().map(str::to_string))
        .collect()
}

async fn send_broker_info(plugin: &nomad_driver_virt::nomad_client::PluginClient) {
    let mut broker =
        nomad_driver_virt::pb::plugin::grpc_broker_client::GrpcBrokerClient::new(plugin.channel());
    let outgoing = tokio_stream::iter(vec![ConnInfo {
        service_id: 9,
        network: "unix".into(),
        address: "/x".into(),
        knock: None,
    }])
    .chain(tokio_stream::pending());
    let _stream = broker.start_stream(outgoing).await.expect("broker");
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn log_level_follows_the_environment_and_the_plugin_config() {
    // The environment wins: at "error" not even the start-up info line shows.
    let options = LaunchOptions {
        env: vec![("NOMAD_DRIVER_VIRT_LOG_LEVEL".into(), "error".into())],
        ..LaunchOptions::default()
    };
    let quiet = common::launch_with(options).await;
    quiet
        .set_config_hcl("log_level = \"debug\"", None)
        .await
        .expect("set config");
    send_broker_info(&quiet).await;
    let buffer = quiet.stderr_buffer();
    quiet.kill().await.expect("exit");
    let quiet_levels = levels(&buffer.lock().map(|l| l.clone()).unwrap_or_default());
    assert!(
        quiet_levels.iter().all(|level| level == "error"),
        "{quiet_levels:?}"
    );

    // Without the environment, the plugin config's level applies.
    let plugin = common::launch_with(LaunchOptions {
        env_remove: vec!["NOMAD_DRIVER_VIRT_LOG_LEVEL".into()],
        ..LaunchOptions::default()
    })
    .await;
    send_broker_info(&plugin).await;
    let before = levels(&plugin.stderr_lines());
    assert!(
        !before.iter().any(|level| level == "debug"),
        "default level is info: {before:?}"
    );
    plugin
        .set_config_hcl("log_level = \"debug\"", None)
        .await
        .expect("set config");
    send_broker_info(&plugin).await;
    let after = levels(&plugin.stderr_lines());
    assert!(
        after.iter().any(|level| level == "debug"),
        "debug after log_level = debug: {after:?}"
    );
    plugin.kill().await.expect("exit");
}
