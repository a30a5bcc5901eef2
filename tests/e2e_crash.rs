//! End to end on real libvirtd + dnsmasq + a TCG guest: the plugin is
//! killed (aborted, as SIGKILL would end it) at every step of StartTask and
//! DestroyTask, then a new plugin does what Nomad does next. Nothing may be
//! left: no domain, volume, seed, port-mapping rule, DHCP reservation or
//! journal record.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::vm::{self, Alloc};
use nomad_driver_virt::faults::CRASH_AT_ENV;
use nomad_driver_virt::nomad_client::{LaunchOptions, PluginClient};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, InitRequest, PortMapping, RecoverTaskRequest, StopTaskRequest, TaskConfig,
};
use nomad_driver_virt::task::journal::JOURNAL_DIR_ENV;

/// Every crash point of a start, in the order a start passes them.
const START_POINTS: [&str; 6] = [
    "start:recorded",
    "start:disk",
    "start:seed",
    "start:defined",
    "start:booted",
    "start:network",
];
/// Every crash point of a destroy.
const DESTROY_POINTS: [&str; 2] = ["destroy:domain", "destroy:volumes"];

fn output(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn plugin(state_dir: &Path, crash_at: Option<&str>, alloc: &Alloc) -> PluginClient {
    let mut env = vec![
        (JOURNAL_DIR_ENV.to_string(), state_dir.display().to_string()),
        (
            "NOMAD_DRIVER_VIRT_RECONCILE_DELAY".to_string(),
            "0".to_string(),
        ),
    ];
    if let Some(point) = crash_at {
        env.push((CRASH_AT_ENV.to_string(), point.to_string()));
    }
    let plugin = common::launch_with(LaunchOptions {
        env,
        ..LaunchOptions::default()
    })
    .await;
    plugin
        .set_config_hcl(&alloc.plugin_config(), None)
        .await
        .expect("set config");
    plugin
}

async fn task(plugin: &PluginClient, alloc: &Alloc) -> TaskConfig {
    let body = "disk {\n  chained = true\n  source {\n    image = \"guest.qcow2\"\n  }\n}\nnetwork_interface {\n  bridge {\n    name  = \"virbr0\"\n    ports = [\"http\"]\n  }\n}\n";
    let msgpack = plugin
        .encode_task_config(body, &HashMap::new())
        .await
        .expect("encode");
    let mut task = alloc.task_config(msgpack, 256);
    if let Some(resources) = task.resources.as_mut() {
        // A documentation address: the rules are made, never reached.
        resources.ports = vec![PortMapping {
            label: "http".into(),
            value: 18080,
            to: 8080,
            host_ip: "192.0.2.1".into(),
        }];
    }
    task
}

fn journal_records(state_dir: &Path) -> Vec<String> {
    std::fs::read_dir(state_dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What the task may have left on the host, in words; empty when clean.
fn leftovers(task: &TaskConfig, alloc: &Alloc, state_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let domain = vm::domain_name_of(task);
    if vm::domain_exists(&domain) {
        found.push(format!("domain {domain}"));
    }
    // Shared parents of chained disks stay for reuse (pruned when unused).
    for volume in vm::pool_volumes(&alloc.pool_name)
        .into_iter()
        .filter(|volume| !volume.starts_with("nomad-virt-base-"))
    {
        found.push(format!("volume {volume}"));
    }
    let mac = nomad_driver_virt::net::mac_for(&task.id, 0);
    if output(&["virsh", "-c", "qemu:///system", "net-dumpxml", "default"]).contains(&mac) {
        found.push(format!("DHCP reservation for {mac}"));
    }
    let tag = nomad_driver_virt::net::iptables::task_tag(&task.id);
    let rules = output(&["iptables-save"]);
    if rules.contains(&tag) {
        found.push(format!("iptables rules tagged {tag}"));
    }
    for record in journal_records(state_dir) {
        found.push(format!("journal record {record}"));
    }
    found
}

async fn wait_until_clean(task: &TaskConfig, alloc: &Alloc, state_dir: &Path, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = leftovers(task, alloc, state_dir);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: still on the host after 90 s: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_killed_at_any_step_of_a_start_leaves_nothing() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let state = tempfile::tempdir().expect("state dir");
    for (index, point) in START_POINTS.iter().enumerate() {
        let alloc = Alloc::new("crash");
        let crashing = plugin(state.path(), Some(point), &alloc).await;
        let task = task(&crashing, &alloc).await;
        let result = vm::start(&crashing, task.clone()).await;
        assert!(result.is_err(), "{point}: the plugin should have died");
        let _ = crashing.kill().await;

        // Nomad relaunches the plugin. Every other step it also retries the
        // start with the same id; otherwise the task is gone for good.
        let relaunched = plugin(state.path(), None, &alloc).await;
        if index % 2 == 1 {
            let started = vm::start(&relaunched, task.clone())
                .await
                .unwrap_or_else(|status| panic!("{point}: retried start: {status:?}"));
            assert!(started.handle.is_some());
            relaunched
                .driver()
                .stop_task(StopTaskRequest {
                    task_id: task.id.clone(),
                    timeout: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 0,
                    }),
                    signal: "SIGKILL".into(),
                })
                .await
                .expect("stop");
            relaunched
                .driver()
                .destroy_task(DestroyTaskRequest {
                    task_id: task.id.clone(),
                    force: true,
                })
                .await
                .expect("destroy");
        } else {
            relaunched
                .driver()
                .init(InitRequest {})
                .await
                .expect("init");
        }
        wait_until_clean(&task, &alloc, state.path(), point).await;
        let _ = relaunched.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_killed_at_any_step_of_a_destroy_leaves_nothing() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let state = tempfile::tempdir().expect("state dir");
    for point in DESTROY_POINTS {
        let alloc = Alloc::new("crashd");
        let crashing = plugin(state.path(), Some(point), &alloc).await;
        let task = task(&crashing, &alloc).await;
        let started = vm::start(&crashing, task.clone())
            .await
            .unwrap_or_else(|status| panic!("{point}: start: {status:?}"));
        let handle = started.handle.expect("handle");
        crashing
            .driver()
            .stop_task(StopTaskRequest {
                task_id: task.id.clone(),
                timeout: None,
                signal: "SIGKILL".into(),
            })
            .await
            .expect("stop");
        let destroyed = crashing
            .driver()
            .destroy_task(DestroyTaskRequest {
                task_id: task.id.clone(),
                force: true,
            })
            .await;
        assert!(destroyed.is_err(), "{point}: the plugin should have died");
        let _ = crashing.kill().await;

        // Nomad relaunches the plugin, recovers the task from its handle
        // and destroys it again.
        let relaunched = plugin(state.path(), None, &alloc).await;
        relaunched
            .driver()
            .recover_task(RecoverTaskRequest {
                task_id: task.id.clone(),
                handle: Some(handle),
            })
            .await
            .unwrap_or_else(|status| panic!("{point}: recover: {status:?}"));
        relaunched
            .driver()
            .destroy_task(DestroyTaskRequest {
                task_id: task.id.clone(),
                force: true,
            })
            .await
            .unwrap_or_else(|status| panic!("{point}: destroy again: {status:?}"));
        wait_until_clean(&task, &alloc, state.path(), point).await;
        let _ = relaunched.kill().await;
    }
}
