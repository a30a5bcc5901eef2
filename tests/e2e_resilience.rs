//! End to end: a guest that ignores ACPI is destroyed when the stop timeout
//! ends, and a libvirtd restart while a VM runs neither stops the task nor
//! leaves the driver unhealthy.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::vm::{self, Alloc};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::fingerprint_response::HealthState;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, FingerprintRequest, StopTaskRequest, WaitTaskRequest,
};

fn restart_libvirtd() {
    let status = std::process::Command::new("pkill")
        .args(["-TERM", "-x", "libvirtd"])
        .status()
        .expect("pkill");
    assert!(status.success(), "libvirtd was not running");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::process::Command::new("pidof")
        .arg("libvirtd")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "libvirtd did not exit");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Stay down longer than the driver's health check period so the outage is seen.
    std::thread::sleep(Duration::from_secs(12));
    let status = std::process::Command::new("libvirtd")
        .arg("-d")
        .status()
        .expect("start libvirtd");
    assert!(status.success(), "libvirtd -d failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acpi_ignoring_guest_survives_libvirtd_restart_and_is_destroyed_at_timeout() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let alloc = Alloc::new("stubborn");
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&alloc.plugin_config(), None)
        .await
        .expect("set config");
    // Without the guest agent, which would shut the guest down despite
    // its ignoring ACPI.
    let body = "guest_agent = false\ncmds = [\"touch /run/no-acpi\"]\ndisk {\n  chained = true\n  source {\n    image = \"guest.qcow2\"\n  }\n}\n";
    let msgpack = plugin
        .encode_task_config(body, &HashMap::new())
        .await
        .expect("encode");
    let task = alloc.task_config(msgpack, 256);
    let task_id = task.id.clone();
    let domain = vm::domain_name_of(&task);
    vm::start(&plugin, task).await.expect("StartTask");
    alloc.wait_for_console("GUEST-READY", Duration::from_secs(240));

    let mut fingerprints = plugin
        .driver()
        .fingerprint(FingerprintRequest {})
        .await
        .expect("fingerprint")
        .into_inner();
    let first = fingerprints
        .message()
        .await
        .expect("stream")
        .expect("message");
    assert_eq!(first.health, HealthState::Healthy as i32, "{first:?}");
    let waiter = {
        let mut driver = plugin.driver();
        let task_id = task_id.clone();
        tokio::spawn(async move { driver.wait_task(WaitTaskRequest { task_id }).await })
    };

    tokio::task::spawn_blocking(restart_libvirtd)
        .await
        .expect("restart");
    // The driver notices the lost connection and comes back on its own.
    let mut saw_unhealthy = false;
    let healthy_again = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            let message = fingerprints
                .message()
                .await
                .expect("stream")
                .expect("message");
            if message.health != HealthState::Healthy as i32 {
                saw_unhealthy = true;
            } else if saw_unhealthy {
                return message;
            }
        }
    })
    .await;
    assert!(
        healthy_again.is_ok(),
        "fingerprint did not go unhealthy and back (saw unhealthy: {saw_unhealthy})"
    );
    assert!(
        vm::domain_exists(&domain),
        "the VM survives a libvirtd restart"
    );
    assert!(
        !waiter.is_finished(),
        "the task keeps running across a libvirtd restart"
    );

    // The guest ignores the power button: destroyed when the timeout ends.
    let stop_started = Instant::now();
    plugin
        .driver()
        .stop_task(StopTaskRequest {
            task_id: task_id.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            signal: String::new(),
        })
        .await
        .expect("StopTask");
    let took = stop_started.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(30),
        "forced stop took {took:?}"
    );
    let result = waiter.await.expect("join").expect("WaitTask").into_inner();
    let exit = result.result.expect("exit");
    assert_eq!(exit.signal, 9, "killed after the timeout: {result:?}");
    assert!(
        alloc.console().contains("GUEST-ACPI: power button ignored"),
        "the guest saw the button"
    );

    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id,
            force: true,
        })
        .await
        .expect("destroy");
    assert!(!vm::domain_exists(&domain));
    assert!(vm::pool_volumes(&alloc.pool_name)
        .iter()
        .all(|v| !v.contains(&domain)));
    plugin.kill().await.expect("exit");
}
