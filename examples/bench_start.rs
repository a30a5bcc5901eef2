//! StartTask latency on the real host against its floor. The driver run:
//! the plugin binary (go-plugin, as Nomad starts it) boots the test guest
//! as a bridged task with one mapped port; its task events split the call
//! into phases. The floor: the same domain XML (dumped from the driver's
//! domain; its own overlay of the same image, a copy of the seed, a fresh
//! MAC) booted by hand with `virsh define` + `virsh start`, until its DHCP
//! lease exists. Both detect the lease the same way: an inotify watch on
//! libvirt's lease status file, read on every rewrite, gives the moment
//! dnsmasq granted it; the driver's "Guest IP" event says when it noticed.
//!
//!   cargo build --release && cargo run --release --example bench_start
//!   cargo run --example bench_start -- --short      # 1 run each (CI)
//!
//! Needs root, tests/setup/host.sh and tests/setup/guest.sh (the guest
//! image in /var/lib/nomad-driver-virt-test), libvirt's network "default"
//! (bridge virbr0). Everything it creates is named ndvtest-* and removed.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::BoxError;
use inotify::{Inotify, WatchMask};
use nomad_driver_virt::nomad_client::PluginClient;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, PortMapping, StartTaskRequest, StopTaskRequest, TaskEventsRequest,
};
use tokio_stream::StreamExt;

const URI: &str = "qemu:///system";
/// The test guest's dir: NDV_TEST_GUEST_DIR, as in the tests, or the
/// default tests/setup/guest.sh builds.
fn guest_dir() -> String {
    std::env::var("NDV_TEST_GUEST_DIR")
        .ok()
        .filter(|dir| !dir.is_empty())
        .unwrap_or_else(|| "/var/lib/nomad-driver-virt-test".to_string())
}
const STATUS_DIR: &str = "/var/lib/libvirt/dnsmasq";
const BRIDGE: &str = "virbr0";
const LEASE_LIMIT: Duration = Duration::from_secs(240);

/// When each watched MAC first appeared in the lease status file.
#[derive(Clone, Default)]
struct Grants(Arc<Mutex<HashMap<String, SystemTime>>>);

impl Grants {
    fn get(&self, mac: &str) -> Option<SystemTime> {
        self.0.lock().ok()?.get(&mac.to_ascii_lowercase()).copied()
    }

    /// Watches `<bridge>.status`; records each MAC the first time a rewrite
    /// of the file contains it.
    fn watch(&self) -> Result<(), BoxError> {
        let mut inotify = Inotify::init()?;
        inotify
            .watches()
            .add(STATUS_DIR, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO)?;
        let file = std::ffi::OsString::from(format!("{BRIDGE}.status"));
        let path = Path::new(STATUS_DIR).join(&file);
        let seen = self.0.clone();
        std::thread::Builder::new()
            .name("lease-watch".into())
            .spawn(move || {
                let mut buffer = vec![0u8; 4096];
                loop {
                    let Ok(events) = inotify.read_events_blocking(&mut buffer) else {
                        return;
                    };
                    if !events.into_iter().any(|e| e.name == Some(file.as_os_str())) {
                        continue;
                    }
                    let now = SystemTime::now();
                    let Ok(text) = std::fs::read_to_string(&path) else {
                        continue;
                    };
                    let Ok(leases) = serde_json::from_str::<Vec<serde_json::Value>>(&text) else {
                        continue;
                    };
                    if let Ok(mut seen) = seen.lock() {
                        for lease in leases {
                            if let Some(mac) = lease.get("mac-address").and_then(|m| m.as_str()) {
                                seen.entry(mac.to_ascii_lowercase()).or_insert(now);
                            }
                        }
                    }
                }
            })?;
        Ok(())
    }
}

fn virsh(args: &[&str]) -> Result<String, BoxError> {
    let output = Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn secs(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from)
        .map(|d| d.as_secs_f64())
        .unwrap_or_else(|e| -e.duration().as_secs_f64())
}

fn random_mac() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().rotate_left(16);
    let bytes = nanos.to_be_bytes();
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        bytes[1] | 0x80,
        bytes[2],
        bytes[3]
    )
}

/// The phases of one driver start, seconds.
#[derive(Debug, Default, Clone)]
struct DriverRun {
    total: f64,
    before_disks: f64,
    disks: f64,
    seed: f64,
    define_start: f64,
    lease_wait: f64,
    host_rules: f64,
    /// From dnsmasq's grant to the driver's "Guest IP" event.
    noticed_after_grant: f64,
}

struct Bench {
    root: tempfile::TempDir,
    plugin: PluginClient,
    grants: Grants,
    msgpack: Vec<u8>,
}

impl Bench {
    fn alloc_dir(&self) -> PathBuf {
        self.root.path().join("alloc")
    }

    async fn driver_run(&self, index: usize) -> Result<(DriverRun, String, String), BoxError> {
        let task_id = format!("ndvbench/web/{:08x}", index as u32 ^ std::process::id());
        let mut task = common::task_config(
            &task_id,
            "web",
            "ndvbench",
            &self.alloc_dir(),
            self.msgpack.clone(),
            256,
        );
        if let Some(resources) = task.resources.as_mut() {
            // A documentation address: the rules are made, never reached.
            resources.ports = vec![PortMapping {
                label: "http".into(),
                value: 18080,
                to: 8080,
                host_ip: "192.0.2.1".into(),
            }];
        }
        let domain = nomad_driver_virt::task::plan::domain_name(&task.name, &task.id);
        let mac = nomad_driver_virt::net::mac_for(&task.id, 0);
        let mut events = self
            .plugin
            .driver()
            .task_events(TaskEventsRequest {})
            .await?
            .into_inner();
        let called = SystemTime::now();
        let response = self
            .plugin
            .driver()
            .start_task(StartTaskRequest { task: Some(task) })
            .await;
        let returned = SystemTime::now();
        response.map_err(|status| format!("StartTask: {}", status.message()))?;
        let mut at: HashMap<&'static str, SystemTime> = HashMap::new();
        while let Ok(Some(Ok(event))) =
            tokio::time::timeout(Duration::from_millis(300), events.next()).await
        {
            if event.task_id != task_id {
                continue;
            }
            let Some(stamp) = event.timestamp else {
                continue;
            };
            let time = SystemTime::UNIX_EPOCH
                + Duration::new(stamp.seconds.max(0) as u64, stamp.nanos.max(0) as u32);
            for (prefix, key) in [
                ("Preparing disks", "disks"),
                ("Building cloud-init seed", "seed"),
                ("Starting VM", "start"),
                ("Waiting for a DHCP lease", "lease"),
                ("Guest IP", "ip"),
            ] {
                if event.message.starts_with(prefix) {
                    at.entry(key).or_insert(time);
                }
            }
        }
        let get = |key: &str| {
            at.get(key)
                .copied()
                .ok_or_else(|| format!("no {key:?} event from the driver"))
        };
        let grant = self.grants.get(&mac).ok_or("lease grant not seen")?;
        let run = DriverRun {
            total: secs(called, returned),
            before_disks: secs(called, get("disks")?),
            disks: secs(get("disks")?, get("seed")?),
            seed: secs(get("seed")?, get("start")?),
            define_start: secs(get("start")?, get("lease")?),
            lease_wait: secs(get("lease")?, get("ip")?),
            host_rules: secs(get("ip")?, returned),
            noticed_after_grant: secs(grant, get("ip")?),
        };
        Ok((run, task_id, domain))
    }

    async fn destroy(&self, task_id: &str) -> Result<(), BoxError> {
        let mut driver = self.plugin.driver();
        driver
            .stop_task(StopTaskRequest {
                task_id: task_id.to_string(),
                timeout: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
                signal: "SIGKILL".into(),
            })
            .await?;
        driver
            .destroy_task(DestroyTaskRequest {
                task_id: task_id.to_string(),
                force: true,
            })
            .await?;
        Ok(())
    }

    /// The driver's domain XML, rewritten for a floor run: own name, no
    /// uuid, a fresh MAC, its own overlay and seed copy and console file.
    fn floor_xml(
        &self,
        driver_xml: &str,
        name: &str,
        mac: &str,
        dir: &Path,
    ) -> Result<String, BoxError> {
        let overlay = dir.join("disk.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(Path::new(&guest_dir()).join("guest.qcow2"))
            .arg(&overlay)
            .status()?;
        if !status.success() {
            return Err("qemu-img create failed".into());
        }
        let mut xml = String::new();
        let mut disk_index = 0;
        // The live XML spells out the overlay's backing chain; the floor's
        // own overlay has its backing file in its header instead.
        let mut backing_store_depth = 0usize;
        for line in driver_xml.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("<uuid>") {
                continue;
            }
            let opens = trimmed.starts_with("<backingStore") && !trimmed.ends_with("/>");
            if opens {
                backing_store_depth += 1;
                continue;
            }
            if backing_store_depth > 0 {
                if trimmed.starts_with("</backingStore>") {
                    backing_store_depth -= 1;
                }
                continue;
            }
            let line = if trimmed.starts_with("<name>") {
                format!("<name>{name}</name>")
            } else if trimmed.starts_with("<mac address=") {
                format!("<mac address='{mac}'/>")
            } else if trimmed.starts_with("<source file=") {
                let source = trimmed
                    .split('\'')
                    .nth(1)
                    .ok_or("unexpected <source file> line")?;
                let target = if source.ends_with(".iso") {
                    let copy = dir.join("seed.iso");
                    std::fs::copy(source, &copy)?;
                    copy
                } else {
                    disk_index += 1;
                    overlay.clone()
                };
                line.replace(source, &target.display().to_string())
            } else if trimmed.starts_with("<source path=") {
                // The serial console's file.
                let source = trimmed
                    .split('\'')
                    .nth(1)
                    .ok_or("unexpected <source path> line")?;
                line.replace(source, &dir.join("console.log").display().to_string())
            } else {
                line.to_string()
            };
            xml.push_str(&line);
            xml.push('\n');
        }
        if disk_index != 1 {
            return Err(
                format!("expected one disk image in the driver's XML, found {disk_index}").into(),
            );
        }
        Ok(xml)
    }

    /// Define + start by hand until the lease exists: (seconds to the
    /// lease, seconds `virsh define` + `virsh start` took).
    fn floor_run(
        &self,
        xml: &str,
        name: &str,
        mac: &str,
        dir: &Path,
    ) -> Result<(f64, f64), BoxError> {
        let file = dir.join("domain.xml");
        std::fs::write(&file, xml)?;
        let path = file.display().to_string();
        let started = SystemTime::now();
        virsh(&["define", &path])?;
        virsh(&["start", name])?;
        let define_start = secs(started, SystemTime::now());
        let deadline = Instant::now() + LEASE_LIMIT;
        loop {
            if let Some(grant) = self.grants.get(mac) {
                return Ok((secs(started, grant), define_start));
            }
            if Instant::now() > deadline {
                return Err(format!("no lease for {mac} within {LEASE_LIMIT:?}").into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn remove_floor_domain(name: &str) {
    let _ = virsh(&["destroy", name]);
    let _ = virsh(&["undefine", name]);
}

fn release(ip: &str, mac: &str) {
    let _ = Command::new("dhcp_release")
        .args([BRIDGE, ip, mac])
        .output();
}

fn lease_ip(mac: &str) -> Option<String> {
    let text =
        std::fs::read_to_string(Path::new(STATUS_DIR).join(format!("{BRIDGE}.status"))).ok()?;
    let leases: Vec<serde_json::Value> = serde_json::from_str(&text).ok()?;
    leases.iter().find_map(|lease| {
        (lease
            .get("mac-address")?
            .as_str()?
            .eq_ignore_ascii_case(mac))
        .then(|| lease.get("ip-address")?.as_str().map(str::to_string))?
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> Result<(), BoxError> {
    let short = std::env::args()
        .skip(1)
        .any(|a| a == "--short" || a == "short");
    let runs = if short { 1 } else { 3 };
    let guest_dir = guest_dir();
    if !Path::new(&guest_dir).join("guest.qcow2").is_file() {
        return Err(format!("{guest_dir}/guest.qcow2 is missing: run tests/setup/guest.sh").into());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(runs))
}

async fn run(runs: usize) -> Result<(), BoxError> {
    let root = tempfile::Builder::new()
        .prefix("ndvtest-start-")
        .tempdir()?;
    // QEMU runs as libvirt-qemu: it must reach the pool, seed and console.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))?;
    let alloc_dir = root.path().join("alloc");
    for dir in [
        alloc_dir.join("alloc/logs"),
        alloc_dir.join("web"),
        root.path().join("pool"),
    ] {
        std::fs::create_dir_all(&dir)?;
    }
    for dir in [
        alloc_dir.clone(),
        alloc_dir.join("alloc"),
        alloc_dir.join("web"),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let plugin = common::launch(&root.path().join("state")).await?;
    let pool_name = format!("ndvtest-bench-start-{}", std::process::id());
    let guest_dir = guest_dir();
    plugin
        .set_config_hcl(
            &format!(
                "provider {{\n  libvirt {{\n    uri = \"{URI}\"\n  }}\n}}\nimage_paths = [\"{guest_dir}\"]\naccelerator = \"tcg\"\nstorage_pools {{\n  directory \"{pool_name}\" {{\n    path = \"{}\"\n  }}\n}}\n",
                root.path().join("pool").display()
            ),
            None,
        )
        .await
        .map_err(|error| format!("set config: {error:#}"))?;
    let msgpack = plugin
        .encode_task_config(
            "disk {\n  chained = true\n  source {\n    image = \"guest.qcow2\"\n  }\n}\nnetwork_interface {\n  bridge {\n    name  = \"virbr0\"\n    ports = [\"http\"]\n  }\n}\n",
            &HashMap::new(),
        )
        .await
        .map_err(|error| format!("encode: {error:#}"))?;
    let grants = Grants::default();
    grants.watch()?;
    let bench = Bench {
        root,
        plugin,
        grants,
        msgpack,
    };

    let result = measure(&bench, runs, &pool_name).await;
    let _ = virsh(&["pool-destroy", &pool_name]);
    let _ = virsh(&["pool-undefine", &pool_name]);
    let Bench { plugin, root, .. } = bench;
    let _ = plugin.kill().await;
    drop(root);
    result
}

async fn measure(bench: &Bench, runs: usize, _pool: &str) -> Result<(), BoxError> {
    let mut driver_runs = Vec::new();
    let mut floors = Vec::new();
    let mut floor_define_starts = Vec::new();
    for index in 0..runs {
        // Driver first, then the floor from the driver's XML, alternating.
        let (run, task_id, domain) = bench.driver_run(index).await?;
        let driver_xml = virsh(&["dumpxml", "--inactive", &domain]);
        let floor_dir = bench.root.path().join(format!("floor{index}"));
        std::fs::create_dir_all(&floor_dir)?;
        std::fs::set_permissions(&floor_dir, std::fs::Permissions::from_mode(0o755))?;
        let floor_name = format!("ndvtest-floor-{}-{index}", std::process::id());
        let floor_mac = random_mac();
        let floor_xml =
            driver_xml.and_then(|xml| bench.floor_xml(&xml, &floor_name, &floor_mac, &floor_dir));
        let driver_mac = nomad_driver_virt::net::mac_for(&task_id, 0);
        bench.destroy(&task_id).await?;
        let (floor, floor_define_start) = match floor_xml {
            Ok(xml) => {
                let result = bench.floor_run(&xml, &floor_name, &floor_mac, &floor_dir);
                remove_floor_domain(&floor_name);
                if let Some(ip) = lease_ip(&floor_mac) {
                    release(&ip, &floor_mac);
                }
                result?
            }
            Err(error) => return Err(error),
        };
        let _ = driver_mac;
        eprintln!(
            "run {}: StartTask {:.2} s, floor {:.2} s",
            index + 1,
            run.total,
            floor
        );
        driver_runs.push(run);
        floors.push(floor);
        floor_define_starts.push(floor_define_start);
    }

    println!(
        "StartTask vs the floor (virsh define + start of the same XML until the DHCP lease), \
         bridged task with one port, test guest under TCG; {runs} run(s) each, alternating; \
         {} build; load average {}",
        common::profile(),
        common::load_average()
    );
    println!();
    print!("| phase (s) |");
    for index in 0..runs {
        print!(" run {} |", index + 1);
    }
    println!(" median |");
    print!("|---|");
    for _ in 0..=runs {
        print!("---:|");
    }
    println!();
    type Field = fn(&DriverRun) -> f64;
    let rows: [(&str, Field); 8] = [
        ("request checks, journal", |r| r.before_disks),
        ("disk preparation", |r| r.disks),
        ("cloud-init seed", |r| r.seed),
        ("define + start", |r| r.define_start),
        ("lease wait", |r| r.lease_wait),
        ("host rules, answer (after the lease)", |r| r.host_rules),
        ("**StartTask total**", |r| r.total),
        ("lease noticed after dnsmasq wrote it", |r| {
            r.noticed_after_grant
        }),
    ];
    for (label, field) in rows {
        print!("| {label} |");
        let values: Vec<f64> = driver_runs.iter().map(field).collect();
        for value in &values {
            print!(" {value:.3} |");
        }
        println!(" {:.3} |", median(values));
    }
    print!("| **floor: virsh define + start to lease** |");
    for floor in &floors {
        print!(" {floor:.3} |");
    }
    println!(" {:.3} |", median(floors.clone()));
    print!("| floor: of which virsh define + start |");
    for value in &floor_define_starts {
        print!(" {value:.3} |");
    }
    println!(" {:.3} |", median(floor_define_starts.clone()));
    // What the floor does not do at all: checks, disks, seed, host rules,
    // noticing the lease; plus define + start beyond virsh's.
    let own: Vec<f64> = driver_runs
        .iter()
        .zip(&floor_define_starts)
        .map(|(r, floor_ds)| {
            r.before_disks
                + r.disks
                + r.seed
                + r.host_rules
                + r.noticed_after_grant
                + (r.define_start - floor_ds)
        })
        .collect();
    print!("| driver's own time: all but the guest's boot (vs virsh's define + start) |");
    for value in &own {
        print!(" {value:.3} |");
    }
    println!(" {:.3} |", median(own.clone()));
    print!("| driver's own time / floor |");
    let shares: Vec<f64> = own
        .iter()
        .zip(&floors)
        .map(|(o, f)| o / f * 100.0)
        .collect();
    for share in &shares {
        print!(" {share:.1}% |");
    }
    println!(" {:.1}% |", median(shares));
    print!("| StartTask / floor |");
    let ratios: Vec<f64> = driver_runs
        .iter()
        .zip(&floors)
        .map(|(run, floor)| run.total / floor)
        .collect();
    for ratio in &ratios {
        print!(" {ratio:.3}x |");
    }
    println!(" {:.3}x |", median(ratios));
    Ok(())
}
