//! End to end on real libvirtd + dnsmasq + a TCG guest: libvirtd restarted,
//! and the network's dnsmasq killed, in the middle of StartTask (while the
//! plugin waits for the guest's DHCP lease) and of DestroyTask. The plugin
//! pauses at the step (test hook `NOMAD_DRIVER_VIRT_PAUSE_AT`), the test
//! does the damage, the plugin goes on: the start succeeds, the destroy
//! completes (retried once if it failed), and nothing is left.
//!
//! Each test uses its own transient libvirt network, so killing its dnsmasq
//! touches nobody else. Restarting libvirtd disturbs everyone using it, so
//! that test restarts it twice and no more, and a guard restarts it if the
//! test fails while it is down.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::vm::{self, Alloc};
use nomad_driver_virt::faults::{PAUSE_AT_ENV, PAUSE_FILE_ENV};
use nomad_driver_virt::nomad_client::{LaunchOptions, PluginClient};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, PortMapping, StartTaskRequest, StopTaskRequest, TaskConfig,
};
use nomad_driver_virt::task::journal::JOURNAL_DIR_ENV;

const URI: &str = "qemu:///system";

/// One fault test at a time: a libvirtd restart would hit the other one.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn run(args: &[&str]) -> (bool, String) {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(error) => (false, error.to_string()),
    }
}

fn libvirtd_answers() -> bool {
    run(&["virsh", "-q", "-c", URI, "version"]).0
}

fn libvirtd_pid() -> Option<i32> {
    let (ok, out) = run(&["pidof", "libvirtd"]);
    ok.then(|| out.split_whitespace().next()?.parse().ok())
        .flatten()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts libvirtd the way tests/setup/host.sh does, if it is not running.
fn ensure_libvirtd() {
    if libvirtd_pid().is_none() {
        let _ = run(&["libvirtd", "-d"]);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !libvirtd_answers() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    if !libvirtd_answers() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/setup/host.sh");
        let _ = run(&["bash", &script.display().to_string()]);
    }
}

/// Never leaves libvirtd down, whatever happens to the test.
struct LibvirtdGuard;

impl Drop for LibvirtdGuard {
    fn drop(&mut self) {
        ensure_libvirtd();
    }
}

/// Stops libvirtd (by its pid), waits until it is gone, starts it again
/// and waits until it answers. Running domains and dnsmasq stay up.
fn restart_libvirtd() {
    let pid = libvirtd_pid().expect("libvirtd is running");
    let (ok, out) = run(&["kill", "-TERM", &pid.to_string()]);
    assert!(ok, "kill libvirtd: {out}");
    wait_for("libvirtd exits", Duration::from_secs(30), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    let (ok, out) = run(&["libvirtd", "-d"]);
    assert!(ok, "libvirtd -d: {out}");
    wait_for(
        "libvirtd answers again",
        Duration::from_secs(60),
        libvirtd_answers,
    );
}

/// A transient NAT network of the test's own, with DHCP; destroyed on drop.
struct TestNetwork {
    name: String,
    bridge: String,
}

impl TestNetwork {
    fn create() -> TestNetwork {
        let id = vm::short_id();
        let name = format!("ndvtest-fault-{id}");
        let bridge = format!("ndvtf{}", &id[..id.len().min(8)]);
        // Another test may take a subnet meanwhile: try the next one.
        let mut last = String::new();
        for octet in 180..250 {
            let used = run(&["ip", "-4", "-o", "addr"]).1;
            if used.contains(&format!("192.168.{octet}.")) {
                continue;
            }
            let xml = format!(
                "<network><name>{name}</name><forward mode='nat'/>\
                 <bridge name='{bridge}' stp='on' delay='0'/>\
                 <ip address='192.168.{octet}.1' netmask='255.255.255.0'>\
                 <dhcp><range start='192.168.{octet}.2' end='192.168.{octet}.254'/></dhcp>\
                 </ip></network>"
            );
            let file = tempfile::NamedTempFile::new().expect("tempfile");
            std::fs::write(file.path(), xml).expect("network xml");
            let (ok, out) = run(&[
                "virsh",
                "-q",
                "-c",
                URI,
                "net-create",
                &file.path().display().to_string(),
            ]);
            if ok {
                return TestNetwork { name, bridge };
            }
            last = out;
        }
        panic!("net-create {name}: no free 192.168.x.0/24 ({last})");
    }

    /// The pids of the network's dnsmasq processes (the daemon and its
    /// lease helper child), found by its own config file.
    fn dnsmasq_pids(&self) -> Vec<String> {
        let conf = format!("/var/lib/libvirt/dnsmasq/{}.conf", self.name);
        let (_, out) = run(&["pgrep", "-f", &format!("conf-file={conf}")]);
        out.split_whitespace().map(str::to_string).collect()
    }

    fn kill_dnsmasq(&self) {
        let pids = self.dnsmasq_pids();
        assert!(!pids.is_empty(), "network {} has no dnsmasq", self.name);
        for pid in &pids {
            let _ = run(&["kill", "-KILL", pid]);
        }
        wait_for("dnsmasq dies", Duration::from_secs(10), || {
            pids.iter()
                .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        });
    }

    fn xml(&self) -> String {
        run(&["virsh", "-q", "-c", URI, "net-dumpxml", &self.name]).1
    }

    fn leases(&self) -> String {
        run(&["virsh", "-q", "-c", URI, "net-dhcp-leases", &self.name]).1
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        ensure_libvirtd();
        let _ = run(&["virsh", "-q", "-c", URI, "net-destroy", &self.name]);
    }
}

/// Removes the task's domain if the test fails before the plugin does.
struct DomainGuard(String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        ensure_libvirtd();
        let _ = run(&["virsh", "-q", "-c", URI, "destroy", &self.0]);
        let _ = run(&[
            "virsh",
            "-q",
            "-c",
            URI,
            "undefine",
            &self.0,
            "--nvram",
            "--managed-save",
        ]);
    }
}

async fn plugin(state_dir: &Path, pause_file: &Path, points: &str, alloc: &Alloc) -> PluginClient {
    let plugin = common::launch_with(LaunchOptions {
        env: vec![
            (JOURNAL_DIR_ENV.to_string(), state_dir.display().to_string()),
            (PAUSE_AT_ENV.to_string(), points.to_string()),
            (PAUSE_FILE_ENV.to_string(), pause_file.display().to_string()),
        ],
        ..LaunchOptions::default()
    })
    .await;
    plugin
        .set_config_hcl(&alloc.plugin_config(), None)
        .await
        .expect("set config");
    plugin
}

async fn task(plugin: &PluginClient, alloc: &Alloc, bridge: &str) -> TaskConfig {
    let body = format!(
        "disk {{\n  chained = true\n  source {{\n    image = \"guest.qcow2\"\n  }}\n}}\n\
         network_interface {{\n  bridge {{\n    name  = \"{bridge}\"\n    ports = [\"http\"]\n  }}\n}}\n"
    );
    let msgpack = plugin
        .encode_task_config(&body, &HashMap::new())
        .await
        .expect("encode");
    let mut task = alloc.task_config(msgpack, 256);
    if let Some(resources) = task.resources.as_mut() {
        // A documentation address: the rules are made, never reached.
        resources.ports = vec![PortMapping {
            label: "http".into(),
            value: 18081,
            to: 8080,
            host_ip: "192.0.2.1".into(),
        }];
    }
    task
}

/// Waits until the plugin announces the pause at `point`, does `fault`,
/// and lets the plugin go on.
async fn at_pause(pause_file: &Path, point: &str, fault: impl FnOnce()) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if let Ok(reached) = std::fs::read_to_string(pause_file) {
            assert_eq!(reached, point, "paused at the wrong point");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the plugin never reached {point}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fault();
    std::fs::remove_file(pause_file).expect("lift the pause");
}

/// What the task may have left, in words; empty when clean.
fn leftovers(task: &TaskConfig, alloc: &Alloc, network: &TestNetwork, state: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let domain = vm::domain_name_of(task);
    if vm::domain_exists(&domain) {
        found.push(format!("domain {domain}"));
    }
    for volume in vm::pool_volumes(&alloc.pool_name)
        .into_iter()
        .filter(|volume| !volume.starts_with("nomad-virt-base-"))
    {
        found.push(format!("volume {volume}"));
    }
    let mac = nomad_driver_virt::net::mac_for(&task.id, 0);
    if network.xml().contains(&mac) {
        found.push(format!("DHCP reservation for {mac}"));
    }
    if network.leases().contains(&mac) {
        found.push(format!("DHCP lease of {mac}"));
    }
    let tag = nomad_driver_virt::net::iptables::task_tag(&task.id);
    if run(&["iptables-save"]).1.contains(&tag) {
        found.push(format!("iptables rules tagged {tag}"));
    }
    if std::fs::read_dir(state).is_ok_and(|mut entries| entries.next().is_some()) {
        found.push("a start journal record".into());
    }
    found
}

async fn wait_until_clean(task: &TaskConfig, alloc: &Alloc, network: &TestNetwork, state: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = leftovers(task, alloc, network, state);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still on the host after 60 s: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Starts the task with `start_fault` done at the lease wait, then stops
/// and destroys it with `destroy_fault` done at `destroy_point`, retrying
/// the destroy once if it failed. Asserts the start succeeded and that
/// nothing is left.
async fn start_and_destroy_through_faults(
    prefix: &str,
    destroy_point: &str,
    start_fault: impl FnOnce(&TestNetwork),
    destroy_fault: impl FnOnce(&TestNetwork),
) {
    let _serial = SERIAL.lock().await;
    let _libvirtd = LibvirtdGuard;
    let network = TestNetwork::create();
    let alloc = Alloc::new(prefix);
    let state = tempfile::tempdir().expect("state dir");
    let pauses = tempfile::tempdir().expect("pause dir");
    let pause_file: PathBuf = pauses.path().join("paused");
    let plugin = plugin(
        state.path(),
        &pause_file,
        &format!("start:lease-wait,{destroy_point}"),
        &alloc,
    )
    .await;
    let task = task(&plugin, &alloc, &network.bridge).await;
    let _domain = DomainGuard(vm::domain_name_of(&task));

    let starting = {
        let (mut driver, task) = (plugin.driver(), task.clone());
        tokio::spawn(async move {
            driver
                .start_task(StartTaskRequest { task: Some(task) })
                .await
                .map(|response| response.into_inner())
        })
    };
    at_pause(&pause_file, "start:lease-wait", || start_fault(&network)).await;
    let started = starting
        .await
        .expect("start task")
        .unwrap_or_else(|status| panic!("start after the fault: {status:?}"));
    assert!(started.handle.is_some());
    let ip = started
        .network_override
        .as_ref()
        .map(|n| n.addr.clone())
        .unwrap_or_default();
    assert!(!ip.is_empty(), "no guest address after the fault");
    let mac = nomad_driver_virt::net::mac_for(&task.id, 0);
    assert!(network.xml().contains(&mac), "no DHCP reservation");
    assert!(!network.dnsmasq_pids().is_empty(), "dnsmasq is not running");

    plugin
        .driver()
        .stop_task(StopTaskRequest {
            task_id: task.id.clone(),
            timeout: None,
            signal: "SIGKILL".into(),
        })
        .await
        .expect("stop");
    let destroying = {
        let (mut driver, id) = (plugin.driver(), task.id.clone());
        tokio::spawn(async move {
            driver
                .destroy_task(DestroyTaskRequest {
                    task_id: id,
                    force: true,
                })
                .await
        })
    };
    at_pause(&pause_file, destroy_point, || destroy_fault(&network)).await;
    if let Err(status) = destroying.await.expect("destroy task") {
        // A defined failure; Nomad retries DestroyTask, and so do we.
        eprintln!("destroy after the fault failed once: {status:?}; retrying");
        plugin
            .driver()
            .destroy_task(DestroyTaskRequest {
                task_id: task.id.clone(),
                force: true,
            })
            .await
            .unwrap_or_else(|status| panic!("destroy retried: {status:?}"));
    }
    wait_until_clean(&task, &alloc, &network, state.path()).await;
    let _ = plugin.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirtd_restarted_during_start_and_destroy() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    start_and_destroy_through_faults(
        "lvdrestart",
        "destroy:domain",
        |_| restart_libvirtd(),
        |_| restart_libvirtd(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsmasq_killed_during_start_and_destroy() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    start_and_destroy_through_faults(
        "dnsmasqkill",
        "destroy:volumes",
        TestNetwork::kill_dnsmasq,
        TestNetwork::kill_dnsmasq,
    )
    .await;
}
