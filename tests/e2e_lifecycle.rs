//! End to end on a real libvirtd + QEMU (TCG) with the tiny test guest,
//! through the plugin's real wire interface: boot from a cloud-image-like
//! disk, cloud-init seed, shares, console, stats, plugin crash + recovery,
//! ACPI stop, destroy; and failed starts that leave nothing behind.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::vm::{self, Alloc};
use nomad_driver_virt::driver::convert::recoverable_from_status;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, InspectTaskRequest, Mount, RecoverTaskRequest, StopTaskRequest, TaskState,
    TaskStatsRequest, WaitTaskRequest,
};

const BOOT_LIMIT: Duration = Duration::from_secs(240);

fn guest_config() -> String {
    r#"
hostname = "e2e-guest"
cmds = [
  "cat /alloc/hello.txt",
  "cat /data/volume.txt",
  "touch /alloc/from-guest || echo ALLOC-IS-READ-ONLY",
  ". /etc/profile.d/virt.sh && echo \"ENV-GREETING=$GREETING\"",
]
disk {
  chained = true
  source {
    image = "guest.qcow2"
  }
}
"#
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_lifecycle_with_crash_recovery() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let alloc = Alloc::new("web");
    std::fs::write(
        alloc.alloc_dir().join("alloc/hello.txt"),
        "HELLO-FROM-HOST\n",
    )
    .expect("write shared file");
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&alloc.plugin_config(), None)
        .await
        .expect("set config");
    let msgpack = plugin
        .encode_task_config(&guest_config(), &HashMap::new())
        .await
        .expect("encode");
    let mut task = alloc.task_config(msgpack, 256);
    // A Nomad volume_mount of a host directory becomes a share in the guest.
    let volume_dir = alloc.root.path().join("host-volume");
    std::fs::create_dir_all(&volume_dir).expect("mkdir volume");
    std::fs::write(volume_dir.join("volume.txt"), "FROM-HOST-VOLUME\n").expect("write volume file");
    task.mounts = vec![Mount {
        task_path: "/data".into(),
        host_path: volume_dir.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    let task_id = task.id.clone();
    let domain = vm::domain_name_of(&task);

    let started = vm::start(&plugin, task.clone()).await.expect("StartTask");
    let handle = started.handle.expect("handle");
    assert_eq!(handle.version, 1);
    assert_eq!(
        handle.config.as_ref().map(|c| c.id.as_str()),
        Some(task_id.as_str())
    );
    assert!(vm::domain_exists(&domain), "domain {domain} defined");

    let inspected = plugin
        .driver()
        .inspect_task(InspectTaskRequest {
            task_id: task_id.clone(),
        })
        .await
        .expect("InspectTask")
        .into_inner();
    let status = inspected.task.expect("status");
    assert_eq!(status.state, TaskState::Running as i32);
    assert_eq!(
        inspected
            .driver
            .expect("driver status")
            .attributes
            .get("domain_name"),
        Some(&domain)
    );

    let console = alloc.wait_for_console("GUEST-READY", BOOT_LIMIT);
    assert!(
        console.contains("GUEST-HOSTNAME: e2e-guest"),
        "hostname from the seed:\n{console}"
    );
    assert!(
        console.contains("HELLO-FROM-HOST"),
        "alloc dir file readable in the guest:\n{console}"
    );
    assert!(
        console.contains("FROM-HOST-VOLUME"),
        "volume_mount readable in the guest:\n{console}"
    );
    assert!(
        console.contains("ALLOC-IS-READ-ONLY"),
        "alloc dir must not be writable:\n{console}"
    );
    assert!(
        console.contains("ENV-GREETING=it's a VM"),
        "task env in /etc/profile.d/virt.sh:\n{console}"
    );
    assert!(!alloc.alloc_dir().join("alloc/from-guest").exists());

    // Stats stream sane numbers.
    let mut stats = plugin
        .driver()
        .task_stats(TaskStatsRequest {
            task_id: task_id.clone(),
            collection_interval: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
        })
        .await
        .expect("stats")
        .into_inner();
    let mut samples = Vec::new();
    for _ in 0..3 {
        let message = tokio::time::timeout(Duration::from_secs(10), stats.message())
            .await
            .expect("a stats sample per interval")
            .expect("stream ok")
            .expect("message");
        samples.push(message.stats.expect("stats"));
    }
    for sample in &samples {
        assert!(sample.timestamp.is_some());
        let usage = sample.agg_resource_usage.as_ref().expect("aggregate usage");
        let memory = usage.memory.as_ref().expect("memory");
        assert!(
            memory.usage > 16 << 20 && memory.usage <= 300 << 20,
            "memory usage in bytes: {}",
            memory.usage
        );
        let cpu = usage.cpu.as_ref().expect("cpu");
        assert!(
            cpu.percent >= 0.0 && cpu.percent <= 100.0 * 2.0,
            "cpu percent {}",
            cpu.percent
        );
    }
    drop(stats);

    // The plugin dies while the VM runs; a new plugin recovers the task.
    let mut crashed = plugin;
    crashed.signal(libc::SIGKILL).expect("SIGKILL plugin");
    crashed
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("wait")
        .expect("plugin died");
    assert!(vm::domain_exists(&domain), "the VM outlives the plugin");
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&alloc.plugin_config(), None)
        .await
        .expect("set config");
    let mut recovered_handle = handle.clone();
    if let Some(config) = recovered_handle.config.as_mut() {
        // After an agent restart Nomad hands back no driver config.
        config.msgpack_driver_config.clear();
    }
    plugin
        .driver()
        .recover_task(RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(recovered_handle),
        })
        .await
        .expect("RecoverTask");

    // WaitTask blocks while the VM runs.
    let mut driver = plugin.driver();
    let waiter = {
        let mut driver = plugin.driver();
        let task_id = task_id.clone();
        tokio::spawn(async move { driver.wait_task(WaitTaskRequest { task_id }).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiter.is_finished(),
        "WaitTask must block while the VM runs"
    );

    // ACPI stop well inside the timeout, exit code 0.
    let stop_started = Instant::now();
    driver
        .stop_task(StopTaskRequest {
            task_id: task_id.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            signal: String::new(),
        })
        .await
        .expect("StopTask");
    let stop_took = stop_started.elapsed();
    assert!(
        stop_took < Duration::from_secs(45),
        "ACPI stop took {stop_took:?}"
    );
    let result = waiter.await.expect("join").expect("WaitTask").into_inner();
    let exit = result.result.expect("exit result");
    assert_eq!(
        (exit.exit_code, exit.signal),
        (0, 0),
        "graceful power-off: {result:?}"
    );
    assert!(result.err.is_empty(), "{result:?}");
    // A second wait answers at once.
    let again = tokio::time::timeout(
        Duration::from_secs(2),
        driver.wait_task(WaitTaskRequest {
            task_id: task_id.clone(),
        }),
    )
    .await
    .expect("immediate answer")
    .expect("WaitTask");
    assert_eq!(again.into_inner().result.map(|r| r.exit_code), Some(0));
    let inspected = driver
        .inspect_task(InspectTaskRequest {
            task_id: task_id.clone(),
        })
        .await
        .expect("InspectTask")
        .into_inner();
    let status = inspected.task.expect("status");
    assert_eq!(status.state, TaskState::Exited as i32);
    assert!(
        status.completed_at.is_some_and(|t| t.seconds > 0),
        "completed_at set after exit"
    );

    // Destroy leaves nothing; a second destroy is fine.
    driver
        .destroy_task(DestroyTaskRequest {
            task_id: task_id.clone(),
            force: true,
        })
        .await
        .expect("DestroyTask");
    driver
        .destroy_task(DestroyTaskRequest {
            task_id: task_id.clone(),
            force: true,
        })
        .await
        .expect("DestroyTask again");
    assert!(!vm::domain_exists(&domain), "domain {domain} left behind");
    let leftovers: Vec<String> = vm::pool_volumes(&alloc.pool_name)
        .into_iter()
        .filter(|v| v.contains(&domain))
        .collect();
    assert!(leftovers.is_empty(), "volumes left behind: {leftovers:?}");
    // Stop of an unknown task is not an error (Nomad would retry for minutes).
    driver
        .stop_task(StopTaskRequest {
            task_id: "nope/nope/nope".into(),
            timeout: None,
            signal: String::new(),
        })
        .await
        .expect("StopTask of an unknown task is OK");
    plugin.kill().await.expect("exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_are_clear_and_leave_nothing() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let alloc = Alloc::new("bad");
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&alloc.plugin_config(), None)
        .await
        .expect("set config");
    let before = vm::pool_volumes(&alloc.pool_name);

    for (body, expected_field, expected_code) in [
        (
            "disk {\n  source {\n    image = \"no-such-image.qcow2\"\n  }\n}\n",
            "disk[0].source.image",
            tonic::Code::InvalidArgument,
        ),
        (
            "disk {\n  source {\n    image = \"../../../etc/passwd\"\n  }\n}\n",
            "disk[0].source.image",
            tonic::Code::InvalidArgument,
        ),
        (
            "hostname = \"not_valid\"\ndisk {\n  size = \"1GiB\"\n}\n",
            "hostname",
            tonic::Code::InvalidArgument,
        ),
        ("", "disk", tonic::Code::InvalidArgument),
    ] {
        let msgpack = plugin
            .encode_task_config(body, &HashMap::new())
            .await
            .expect("encode");
        let task = alloc.task_config(msgpack, 256);
        let domain = vm::domain_name_of(&task);
        let status = vm::start(&plugin, task).await.expect_err(body);
        assert_eq!(status.code(), expected_code, "{body}: {status:?}");
        assert!(
            status.message().contains(expected_field),
            "{body}: {}",
            status.message()
        );
        assert_eq!(
            recoverable_from_status(&status),
            Some(false),
            "{body}: config errors are not recoverable"
        );
        assert!(!vm::domain_exists(&domain), "{body}: domain left behind");
    }
    // Too little memory fails after planning, still before anything exists.
    let msgpack = plugin
        .encode_task_config(
            "disk {\n  source {\n    image = \"guest.qcow2\"\n  }\n}\n",
            &HashMap::new(),
        )
        .await
        .expect("encode");
    let task = alloc.task_config(msgpack, 16);
    let status = vm::start(&plugin, task).await.expect_err("16 MB");
    assert!(
        status.message().contains("at least 64 MB"),
        "{}",
        status.message()
    );
    assert_eq!(
        vm::pool_volumes(&alloc.pool_name),
        before,
        "failed starts must not leave volumes"
    );
    plugin.kill().await.expect("exit");
}
