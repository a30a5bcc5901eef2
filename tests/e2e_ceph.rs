//! End to end through the plugin against the real single-node Ceph cluster
//! of tests/setup/ceph.sh (cephx on): a TCG guest boots from an RBD disk
//! (a chained disk: an RBD clone of the shared parent holding the test
//! image, which a second task clones too), with an empty RBD disk and one
//! written sparsely from a raw image; after DestroyTask no RBD image of the
//! tasks is left, the parent going with the last clone. A Ceph pool with a wrong key and one whose monitor does not
//! answer fail with clear errors while a directory-pool task still starts
//! and the driver stays healthy (issue 12).

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::host::{Need, CEPH_KEY_FILE, CEPH_POOL, CEPH_USER};
use common::vm::{self, Alloc};
use nomad_driver_virt::nomad::attribute::render;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::fingerprint_response::HealthState;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, FingerprintRequest,
};
use nomad_driver_virt::storage::images::ImageFormat;

const BOOT_LIMIT: Duration = Duration::from_secs(300);

const NEEDS: &[Need] = &[
    Need::Root,
    Need::Libvirtd,
    Need::GuestImage,
    Need::Ceph,
    common::host::IP,
    common::host::IPTABLES,
    common::host::IPTABLES_SAVE,
    common::host::IPTABLES_RESTORE,
];

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("run virsh")
}

/// RBD image names in the test pool, as client.ndvtest sees them.
fn rbd_images() -> Vec<String> {
    let output = Command::new("timeout")
        .args(["60", "rbd", "--id", CEPH_USER, "--keyfile", CEPH_KEY_FILE])
        .args(["-m", "127.0.0.1:6789", "ls", CEPH_POOL])
        .output()
        .expect("run rbd");
    assert!(output.status.success(), "rbd ls: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn rbd_info(image: &str) -> String {
    let output = Command::new("timeout")
        .args(["60", "rbd", "--id", CEPH_USER, "--keyfile", CEPH_KEY_FILE])
        .args(["-m", "127.0.0.1:6789", "info"])
        .arg(format!("{CEPH_POOL}/{image}"))
        .output()
        .expect("run rbd");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The shared parent a chained disk from `image` gets (named from its
/// content), so a test checks only its own images in the shared pool.
fn parent_of(image: &std::path::Path, format: ImageFormat) -> String {
    let file = std::fs::File::open(image).expect("open the image");
    let (content_key, _) =
        nomad_driver_virt::storage::parent_key::key_of_file(&file).expect("content key");
    nomad_driver_virt::libvirt::storage::rbd::shared_parent_name(format, &content_key)
}

/// libvirt pool `name` on the test cluster's pool, as the test user.
fn local_ceph_pool(name: &str) -> nomad_driver_virt::config::plugin::CephPool {
    use nomad_driver_virt::config::plugin::{CephHost, CephKey, CephPool};
    CephPool {
        name: name.to_string(),
        pool: CEPH_POOL.into(),
        hosts: vec![CephHost {
            name: "127.0.0.1".into(),
            port: Some(6789),
        }],
        username: CEPH_USER.into(),
        key: CephKey::new(key()),
    }
}

/// A 4 MiB raw image at `path` whose content no other test has (its first
/// bytes are a unique mark), so its shared parent is the caller's alone.
fn write_unique_image(path: &std::path::Path, mark_prefix: &str) {
    let mut bytes = vec![0u8; 4 << 20];
    let mark = vm::unique(mark_prefix);
    bytes[..mark.len()].copy_from_slice(mark.as_bytes());
    std::fs::write(path, bytes).expect("write the image");
}

fn key() -> String {
    std::fs::read_to_string(CEPH_KEY_FILE)
        .expect("read the key")
        .trim()
        .to_string()
}

fn ceph_block(name: &str, hosts: &str, key: &str) -> String {
    format!(
        "  ceph \"{name}\" {{\n    pool  = \"{CEPH_POOL}\"\n    hosts = [{hosts}]\n    \
         authentication {{\n      username = \"{CEPH_USER}\"\n      secret   = \"{key}\"\n    }}\n  }}\n"
    )
}

/// The alloc's plugin config with extra blocks inside `storage_pools`.
fn config_with(alloc: &Alloc, ceph_blocks: &str) -> String {
    let base = alloc.plugin_config();
    let marker = "storage_pools {\n";
    assert!(base.contains(marker), "{base}");
    base.replacen(marker, &format!("{marker}{ceph_blocks}"), 1)
}

/// Removes the libvirt rbd pools and secrets (usage = pool name) the
/// driver made for the test's Ceph pools.
struct CephPoolsGuard(Vec<String>);

impl Drop for CephPoolsGuard {
    fn drop(&mut self) {
        for name in &self.0 {
            virsh(&["pool-destroy", name]);
            virsh(&["pool-undefine", name]);
            let listed = virsh(&["secret-list"]);
            for line in String::from_utf8_lossy(&listed.stdout).lines() {
                let mut parts = line.split_whitespace();
                let (Some(uuid), Some("ceph"), Some(usage)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                if usage == name {
                    virsh(&["secret-undefine", uuid]);
                }
            }
        }
    }
}

/// If a check panics before DestroyTask: removes the RBD images of these
/// domains, then shared parents nothing clones any more (with libvirt's
/// snapshots, through libvirt pool `pool`) and their markers.
struct RbdImagesGuard {
    pool: String,
    domains: Vec<String>,
}

impl Drop for RbdImagesGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for name in rbd_images() {
            if self
                .domains
                .iter()
                .any(|domain| name.contains(domain.as_str()))
            {
                virsh(&["vol-delete", &name, "--pool", &self.pool]);
            }
        }
        let prefix = format!("{}rbd-", nomad_driver_virt::storage::PARENT_PREFIX);
        for name in rbd_images() {
            if name.starts_with(&prefix) && !name.ends_with(".done") {
                let deleted = virsh(&[
                    "vol-delete",
                    &name,
                    "--pool",
                    &self.pool,
                    "--delete-snapshots",
                ]);
                if deleted.status.success() {
                    virsh(&["vol-delete", &format!("{name}.done"), "--pool", &self.pool]);
                }
            }
        }
    }
}

/// Removes the domain if a check panics before DestroyTask.
struct DomainGuard(String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        virsh(&["destroy", &self.0]);
        virsh(&["undefine", &self.0]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_boots_from_an_rbd_clone_and_destroy_leaves_no_image() {
    if !common::host_ready(NEEDS) {
        return;
    }
    let alloc = Alloc::new("ceph");
    let pool = vm::unique("ndvtest-ceph-");
    let _pools = CephPoolsGuard(vec![pool.clone()]);
    let key = key();
    // A 64 MiB raw image that is all zeroes past its first bytes.
    let sparse = alloc.task_dir().join("sparse.img");
    let mut bytes = vec![0u8; 64 << 20];
    bytes[..17].copy_from_slice(b"ndvtest-rbd-image");
    std::fs::write(&sparse, bytes).expect("write sparse.img");
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(
            &config_with(&alloc, &ceph_block(&pool, "\"127.0.0.1:6789\"", &key)),
            None,
        )
        .await
        .expect("set config");
    let job = format!(
        r#"
disk {{
  primary = true
  chained = true
  pool    = "{pool}"
  source {{
    image = "guest.qcow2"
  }}
}}
disk {{
  pool = "{pool}"
  size = "8MiB"
}}
disk {{
  pool = "{pool}"
  source {{
    image = "sparse.img"
  }}
}}
"#
    );
    let task = alloc.task(&plugin, &job, 256).await;
    let task_id = task.id.clone();
    let domain = vm::domain_name_of(&task);
    // Dropped after the domain guards (declared later), so no domain
    // holds an image it removes.
    let mut rbd_guard = RbdImagesGuard {
        pool: pool.clone(),
        domains: vec![domain.clone()],
    };
    let _guard = DomainGuard(domain.clone());
    let started = Instant::now();
    vm::start(&plugin, task).await.expect("StartTask");
    eprintln!("StartTask took {:?}", started.elapsed());

    // The disks are RBD network disks with the secret, never the key.
    let xml = String::from_utf8_lossy(&virsh(&["dumpxml", &domain]).stdout).into_owned();
    assert!(xml.contains("protocol='rbd'"), "{xml}");
    assert!(
        xml.contains(&format!("name='{CEPH_POOL}/{domain}_vda.img'")),
        "{xml}"
    );
    assert!(
        xml.contains(&format!("<auth username='{CEPH_USER}'>")),
        "{xml}"
    );
    assert!(!xml.contains(&key), "the key is in the domain XML");

    // The chained disk is a COW clone of the task's base volume; both and
    // the empty disk are in RBD now.
    let images = rbd_images();
    let parent = parent_of(&vm::guest_dir().join("guest.qcow2"), ImageFormat::Qcow2);
    for name in [
        format!("{domain}_vda.img"),
        format!("{parent}.done"),
        format!("{domain}_vdb.img"),
        format!("{domain}_vdc.img"),
    ] {
        assert!(images.contains(&name), "{name} missing from {images:?}");
    }
    let info = rbd_info(&format!("{domain}_vda.img"));
    assert!(
        info.contains(&format!("parent: {CEPH_POOL}/{parent}@")),
        "not a clone: {info}"
    );
    assert!(
        rbd_info(&format!("{domain}_vdb.img")).contains("size 8 MiB"),
        "{}",
        rbd_info(&format!("{domain}_vdb.img"))
    );

    // The image went in whole, and sparsely: only the written blocks use
    // space in RBD.
    let vdc = format!("{CEPH_POOL}/{domain}_vdc.img");
    let head = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "timeout 60 rbd --id {CEPH_USER} --keyfile {CEPH_KEY_FILE} -m 127.0.0.1:6789 \
             export --no-progress {vdc} - | head -c 17"
        ))
        .output()
        .expect("rbd export");
    assert_eq!(head.stdout, b"ndvtest-rbd-image", "{head:?}");
    let du = Command::new("timeout")
        .args(["60", "rbd", "--id", CEPH_USER, "--keyfile", CEPH_KEY_FILE])
        .args(["-m", "127.0.0.1:6789", "du", "--format", "json", &vdc])
        .output()
        .expect("rbd du");
    let du: serde_json::Value =
        serde_json::from_slice(&du.stdout).unwrap_or_else(|e| panic!("rbd du: {e}: {du:?}"));
    let used = du["images"][0]["used_size"].as_u64().expect("used_size");
    let provisioned = du["images"][0]["provisioned_size"]
        .as_u64()
        .expect("provisioned_size");
    assert_eq!(provisioned, 64 << 20, "{du}");
    assert!(
        used <= 4 << 20,
        "not sparse: {used} of {provisioned} bytes used"
    );

    // The libvirt secret is private: its value cannot be read back.
    let secrets = String::from_utf8_lossy(&virsh(&["secret-list"]).stdout).into_owned();
    let uuid = secrets
        .lines()
        .find(|line| line.split_whitespace().nth(2) == Some(pool.as_str()))
        .and_then(|line| line.split_whitespace().next())
        .unwrap_or_else(|| panic!("no ceph secret for {pool}: {secrets}"))
        .to_string();
    let value = virsh(&["secret-get-value", &uuid]);
    assert!(!value.status.success(), "a private secret was read back");

    // The fingerprint shows the pool active.
    let mut stream = plugin
        .driver()
        .fingerprint(FingerprintRequest {})
        .await
        .expect("fingerprint")
        .into_inner();
    let first = stream.message().await.expect("stream").expect("message");
    let attributes: HashMap<String, String> = first
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), render(v)))
        .collect();
    let prefix = format!("driver.virt.storage_pool.{pool}");
    assert_eq!(attributes[&prefix], "ceph");
    assert_eq!(attributes[&format!("{prefix}.state")], "active");
    drop(stream);

    // A second task chained on the same image clones the same parent.
    let second_job = format!(
        "disk {{\n  chained = true\n  pool = \"{pool}\"\n  source {{\n    image = \"guest.qcow2\"\n  }}\n}}\n"
    );
    // Its own alloc: a task dir (and console log) of its own.
    let second_alloc = Alloc::new("ceph2");
    let second = second_alloc.task(&plugin, &second_job, 128).await;
    let second_id = second.id.clone();
    let second_domain = vm::domain_name_of(&second);
    let _second_guard = DomainGuard(second_domain.clone());
    rbd_guard.domains.push(second_domain.clone());
    vm::start(&plugin, second).await.expect("second StartTask");
    let info = rbd_info(&format!("{second_domain}_vda.img"));
    assert!(
        info.contains(&format!("parent: {CEPH_POOL}/{parent}@")),
        "not a clone of the shared parent: {info}"
    );

    alloc.wait_for_console("GUEST-BOOT", BOOT_LIMIT);
    eprintln!("booted from RBD after {:?}", started.elapsed());

    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id: task_id.clone(),
            force: true,
        })
        .await
        .expect("DestroyTask");
    assert!(!vm::domain_exists(&domain));
    // The other task's clone still needs the parent.
    let images = rbd_images();
    assert!(images.contains(&parent), "{images:?}");
    assert!(
        images.iter().all(|name| !name.contains(&domain)),
        "{images:?}"
    );
    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id: second_id,
            force: true,
        })
        .await
        .expect("second DestroyTask");
    // Only this test's names: the other tests share the Ceph pool and run
    // at the same time.
    let after = rbd_images();
    let left: Vec<&String> = after
        .iter()
        .filter(|name| name.contains(&domain) || name.starts_with(&parent))
        .collect();
    assert!(left.is_empty(), "RBD images left: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_key_or_a_silent_monitor_fail_clearly_and_directory_pools_still_work() {
    if !common::host_ready(NEEDS) {
        return;
    }
    let alloc = Alloc::new("cephbad");
    let wrong = vm::unique("ndvtest-cephkey-");
    let down = vm::unique("ndvtest-cephdown-");
    let _pools = CephPoolsGuard(vec![wrong.clone(), down.clone()]);
    // A well-formed key that is not client.ndvtest's.
    let wrong_key = "AQBm1S5nAAAAABAAhk0wF8ZeXqkVa0DbhhGsQA==";
    // A port nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let blocks = ceph_block(&wrong, "\"127.0.0.1:6789\"", wrong_key)
        + &ceph_block(&down, &format!("\"127.0.0.1:{closed}\""), &key());
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&config_with(&alloc, &blocks), None)
        .await
        .expect("set config");

    for (pool, expected) in [
        (&wrong, "cephx user or key was refused"),
        (&down, "no Ceph monitor answers"),
    ] {
        let job = format!(
            "disk {{\n  pool = \"{pool}\"\n  source {{\n    image = \"guest.qcow2\"\n  }}\n}}\n"
        );
        let task = alloc.task(&plugin, &job, 128).await;
        let domain = vm::domain_name_of(&task);
        let _guard = DomainGuard(domain.clone());
        let started = Instant::now();
        let error = vm::start(&plugin, task)
            .await
            .expect_err("a task on a broken Ceph pool must not start");
        let message = error.message().to_string();
        eprintln!("{pool} after {:?}: {message}", started.elapsed());
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "{pool}: took {:?}",
            started.elapsed()
        );
        assert!(message.contains("disk[0].pool"), "{message}");
        assert!(
            message.contains(&format!("Ceph storage pool {pool:?}")),
            "{message}"
        );
        assert!(message.contains(expected), "{message}");
        assert!(!message.contains(wrong_key) && !message.contains(&key()));
        assert!(!vm::domain_exists(&domain));
    }

    // The driver is healthy and says which pools are not usable.
    let mut stream = plugin
        .driver()
        .fingerprint(FingerprintRequest {})
        .await
        .expect("fingerprint")
        .into_inner();
    let first = stream.message().await.expect("stream").expect("message");
    assert_eq!(first.health, HealthState::Healthy as i32, "{first:?}");
    let attributes: HashMap<String, String> = first
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), render(v)))
        .collect();
    for pool in [&wrong, &down] {
        let state = &attributes[&format!("driver.virt.storage_pool.{pool}.state")];
        assert_ne!(state, "active", "{pool}");
    }
    drop(stream);

    // A directory-pool task still starts.
    let job = "disk {\n  source {\n    image = \"guest.qcow2\"\n  }\n}\n";
    let task = alloc.task(&plugin, job, 128).await;
    let task_id = task.id.clone();
    let domain = vm::domain_name_of(&task);
    let _guard = DomainGuard(domain.clone());
    vm::start(&plugin, task)
        .await
        .expect("a directory-pool task starts");
    assert!(vm::domain_exists(&domain));
    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id,
            force: true,
        })
        .await
        .expect("DestroyTask");
    assert!(!vm::domain_exists(&domain));
}

/// A plugin killed right after a task's RBD images were made: the next
/// plugin finds the start journal record and deletes them (starting the
/// libvirt pool, which is stopped meanwhile) (the clone, then
/// its shared parent with libvirt's snapshot and its marker, as no other
/// clone uses it); a disk the pool cannot hold is refused before any image
/// is made.
#[tokio::test(flavor = "multi_thread")]
async fn rbd_images_of_an_unfinished_start_are_removed_by_the_next_plugin() {
    use nomad_driver_virt::faults::CRASH_AT_ENV;
    use nomad_driver_virt::nomad_client::LaunchOptions;
    use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::InitRequest;
    use nomad_driver_virt::task::journal::JOURNAL_DIR_ENV;

    if !common::host_ready(NEEDS) {
        return;
    }
    let alloc = Alloc::new("cephcrash");
    let pool = vm::unique("ndvtest-cephcr-");
    let _pools = CephPoolsGuard(vec![pool.clone()]);
    let config = config_with(&alloc, &ceph_block(&pool, "\"127.0.0.1:6789\"", &key()));
    let state = tempfile::tempdir().expect("state dir");
    let launch = |crash: bool| {
        let mut env = vec![
            (
                JOURNAL_DIR_ENV.to_string(),
                state.path().display().to_string(),
            ),
            (
                "NOMAD_DRIVER_VIRT_RECONCILE_DELAY".to_string(),
                "0".to_string(),
            ),
        ];
        if crash {
            env.push((CRASH_AT_ENV.to_string(), "start:disk".to_string()));
        }
        let config = config.clone();
        async move {
            let plugin = common::launch_with(LaunchOptions {
                env,
                ..LaunchOptions::default()
            })
            .await;
            plugin
                .set_config_hcl(&config, None)
                .await
                .expect("set config");
            plugin
        }
    };

    let plugin = launch(false).await;
    // Refused before anything is made: RBD images are raw.
    let bad =
        format!("disk {{\n  pool = \"{pool}\"\n  format = \"qcow2\"\n  size = \"8MiB\"\n}}\n");
    let task = alloc.task(&plugin, &bad, 128).await;
    let domain = vm::domain_name_of(&task);
    let error = vm::start(&plugin, task).await.expect_err("qcow2 in RBD");
    assert!(
        error.message().contains("disk[0].format") && error.message().contains("raw"),
        "{error:?}"
    );
    assert!(rbd_images().iter().all(|name| !name.contains(&domain)));
    let _ = plugin.kill().await;

    let crashing = launch(true).await;
    // An image of its own, so its shared parent is this test's alone.
    write_unique_image(&alloc.task_dir().join("crash.img"), "ndvtest-crash-");
    let job = format!(
        "disk {{\n  chained = true\n  pool = \"{pool}\"\n  source {{\n    image = \"crash.img\"\n  }}\n}}\n"
    );
    let task = alloc.task(&crashing, &job, 128).await;
    let domain = vm::domain_name_of(&task);
    let _guard = DomainGuard(domain.clone());
    assert!(
        vm::start(&crashing, task).await.is_err(),
        "the plugin should have died"
    );
    let _ = crashing.kill().await;
    let images = rbd_images();
    let made: Vec<&String> = images
        .iter()
        .filter(|name| name.contains(&domain))
        .collect();
    assert_eq!(made.len(), 1, "the clone before the crash: {images:?}");
    let info = rbd_info(made[0]);
    let parent = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("parent: "))
        .and_then(|spec| spec.split('@').next())
        .and_then(|spec| spec.strip_prefix(&format!("{CEPH_POOL}/")))
        .unwrap_or_else(|| panic!("not a clone: {info}"))
        .to_string();

    // As after a reboot whose autostart found no cluster: the libvirt pool
    // is stopped; the cleanup starts it to reach the images.
    let stopped = virsh(&["pool-destroy", &pool]);
    assert!(stopped.status.success(), "{stopped:?}");
    let relaunched = launch(false).await;
    relaunched
        .driver()
        .init(InitRequest {})
        .await
        .expect("init");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left: Vec<String> = rbd_images()
            .into_iter()
            .filter(|name| name.contains(&domain) || name.starts_with(&parent))
            .collect();
        let records = std::fs::read_dir(state.path()).map_or(0, |dir| dir.count());
        if left.is_empty() && records == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still there after 120 s: {left:?}, {records} journal record(s)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = relaunched.kill().await;
}

/// The secret and the rbd pool are made once and then reused; a changed
/// monitor list redefines the pool, a changed key updates the secret's
/// value (a wrong one makes the start fail, the right one works again).
#[test]
fn the_secret_and_the_rbd_pool_are_idempotent_and_follow_the_config() {
    use nomad_driver_virt::config::plugin::{CephHost, CephKey};
    use nomad_driver_virt::libvirt::storage::rbd::ensure_rbd_pool;

    if !common::host_ready(NEEDS) {
        return;
    }
    let name = vm::unique("ndvtest-cephidem-");
    let _pools = CephPoolsGuard(vec![name.clone()]);
    let conn = virt::connect::Connect::open(Some("qemu:///system")).expect("connect");
    let host = |port| CephHost {
        name: "127.0.0.1".into(),
        port: Some(port),
    };
    let mut config = local_ceph_pool(&name);
    let pool_xml = || String::from_utf8_lossy(&virsh(&["pool-dumpxml", &name]).stdout).into_owned();
    let pool_uuid = || {
        String::from_utf8_lossy(&virsh(&["pool-uuid", &name]).stdout)
            .trim()
            .to_string()
    };

    let (_, first) = ensure_rbd_pool(&conn, &config).expect("first");
    let uuid = pool_uuid();
    assert!(pool_xml().contains("port='6789'"), "{}", pool_xml());
    let (_, again) = ensure_rbd_pool(&conn, &config).expect("again");
    assert_eq!(first, again);
    assert_eq!(pool_uuid(), uuid, "the pool was not redefined");
    let secrets = String::from_utf8_lossy(&virsh(&["secret-list"]).stdout).into_owned();
    assert_eq!(
        secrets
            .lines()
            .filter(|line| line.contains(name.as_str()))
            .count(),
        1,
        "{secrets}"
    );

    config.hosts = vec![host(3300)];
    let (_, moved) = ensure_rbd_pool(&conn, &config).expect("new monitors");
    assert_eq!(moved.secret_uuid, first.secret_uuid);
    let xml = pool_xml();
    assert!(
        xml.contains("port='3300'") && !xml.contains("port='6789'"),
        "{xml}"
    );
    let info = String::from_utf8_lossy(&virsh(&["pool-info", &name]).stdout).into_owned();
    assert!(
        info.lines()
            .any(|line| line.starts_with("State:") && line.contains("running")),
        "{info}"
    );

    // A wrong key goes into the secret: the (stopped) pool cannot start.
    virsh(&["pool-destroy", &name]);
    config.key = CephKey::new("AQBm1S5nAAAAABAAhk0wF8ZeXqkVa0DbhhGsQA==");
    let error = ensure_rbd_pool(&conn, &config)
        .expect_err("wrong key")
        .to_string();
    assert!(error.contains("cephx user or key was refused"), "{error}");
    config.key = CephKey::new(key());
    ensure_rbd_pool(&conn, &config).expect("the right key again");
}

/// Starts run in parallel: several first starts on an rbd pool this plugin
/// has not defined yet all get it, with one secret and one pool.
#[test]
fn concurrent_first_setups_of_an_rbd_pool_all_succeed() {
    use nomad_driver_virt::libvirt::storage::rbd::{ensure_rbd_pool, ensure_secret};

    if !common::host_ready(NEEDS) {
        return;
    }
    let name = vm::unique("ndvtest-cephrace-");
    let _pools = CephPoolsGuard(vec![name.clone()]);
    let config = local_ceph_pool(&name);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
    let setups: Vec<_> = (0..4)
        .map(|_| {
            let config = config.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let conn = virt::connect::Connect::open(Some("qemu:///system")).expect("connect");
                barrier.wait();
                ensure_rbd_pool(&conn, &config)
                    .map(|(_, access)| access.secret_uuid)
                    .map_err(|error| error.to_string())
            })
        })
        .collect();
    let uuids: Vec<String> = setups
        .into_iter()
        .map(|setup| {
            setup
                .join()
                .expect("setup thread")
                .expect("every start gets the pool")
        })
        .collect();
    assert!(uuids.iter().all(|uuid| *uuid == uuids[0]), "{uuids:?}");
    let secrets = String::from_utf8_lossy(&virsh(&["secret-list"]).stdout).into_owned();
    assert_eq!(
        secrets
            .lines()
            .filter(|line| line.contains(name.as_str()))
            .count(),
        1,
        "{secrets}"
    );

    // Two plugin processes do not share that lock: the secret's setup,
    // called without it, still ends with one secret for all.
    let other = local_ceph_pool(&vm::unique("ndvtest-cephrace-"));
    let _other_pools = CephPoolsGuard(vec![other.name.clone()]);
    let setups: Vec<_> = (0..4)
        .map(|_| {
            let other = other.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let conn = virt::connect::Connect::open(Some("qemu:///system")).expect("connect");
                barrier.wait();
                ensure_secret(&conn, &other).map_err(|error| error.to_string())
            })
        })
        .collect();
    let uuids: Vec<String> = setups
        .into_iter()
        .map(|setup| {
            setup
                .join()
                .expect("thread")
                .expect("every setup gets the secret")
        })
        .collect();
    assert!(uuids.iter().all(|uuid| *uuid == uuids[0]), "{uuids:?}");
}

/// Deletes an operator's RBD image (with libvirt's clone snapshots) through
/// the libvirt pool, else with the rbd CLI.
struct SourceImageGuard {
    pool: String,
    image: String,
}

impl Drop for SourceImageGuard {
    fn drop(&mut self) {
        virsh(&["pool-refresh", &self.pool]);
        virsh(&[
            "vol-delete",
            &self.image,
            "--pool",
            &self.pool,
            "--delete-snapshots",
        ]);
    }
}

/// Go's examples 05 and 06: `source.volume` in a Ceph pool is copied in
/// full, or (chained) cloned; the operator's image is only read and stays.
#[tokio::test(flavor = "multi_thread")]
async fn an_operators_rbd_volume_is_copied_or_cloned() {
    if !common::host_ready(NEEDS) {
        return;
    }
    let alloc = Alloc::new("cephvol");
    let pool = vm::unique("ndvtest-cephvol-");
    let _pools = CephPoolsGuard(vec![pool.clone()]);
    let source = vm::unique("ndvtest-src-");
    let file = alloc.root.path().join("source.raw");
    let mut bytes = vec![0u8; 16 << 20];
    bytes[..18].copy_from_slice(b"ndvtest-rbd-source");
    std::fs::write(&file, bytes).expect("write");
    let imported = Command::new("timeout")
        .args(["60", "rbd", "--id", CEPH_USER, "--keyfile", CEPH_KEY_FILE])
        .args(["-m", "127.0.0.1:6789", "import", "--no-progress"])
        .arg(&file)
        .arg(format!("{CEPH_POOL}/{source}"))
        .output()
        .expect("rbd import");
    assert!(imported.status.success(), "{imported:?}");
    let _source_guard = SourceImageGuard {
        pool: pool.clone(),
        image: source.clone(),
    };

    let plugin = common::launch().await;
    plugin
        .set_config_hcl(
            &config_with(&alloc, &ceph_block(&pool, "\"127.0.0.1:6789\"", &key())),
            None,
        )
        .await
        .expect("set config");
    let job = format!(
        "disk {{\n  pool = \"{pool}\"\n  size = \"32MiB\"\n  source {{\n    volume = \"{source}\"\n  }}\n}}\n\
         disk {{\n  pool = \"{pool}\"\n  chained = true\n  source {{\n    volume = \"{source}\"\n  }}\n}}\n"
    );
    let task = alloc.task(&plugin, &job, 128).await;
    let task_id = task.id.clone();
    let domain = vm::domain_name_of(&task);
    let _guard = DomainGuard(domain.clone());
    vm::start(&plugin, task).await.expect("StartTask");

    let copy = rbd_info(&format!("{domain}_vda.img"));
    assert!(copy.contains("size 32 MiB"), "{copy}");
    assert!(!copy.contains("parent:"), "a copy has no parent: {copy}");
    let head = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "timeout 60 rbd --id {CEPH_USER} --keyfile {CEPH_KEY_FILE} -m 127.0.0.1:6789 \
             export --no-progress {CEPH_POOL}/{domain}_vda.img - | head -c 18"
        ))
        .output()
        .expect("rbd export");
    assert_eq!(head.stdout, b"ndvtest-rbd-source", "{head:?}");
    let clone = rbd_info(&format!("{domain}_vdb.img"));
    assert!(
        clone.contains(&format!("parent: {CEPH_POOL}/{source}@")),
        "{clone}"
    );

    // A domain's disk cannot be a source.
    let again = format!(
        "disk {{\n  pool = \"{pool}\"\n  source {{\n    volume = \"{domain}_vda.img\"\n  }}\n}}\n"
    );
    let other = alloc.task(&plugin, &again, 128).await;
    let error = vm::start(&plugin, other)
        .await
        .expect_err("another task's disk");
    assert!(
        error.message().contains("disk[0].source.volume"),
        "{error:?}"
    );

    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id,
            force: true,
        })
        .await
        .expect("DestroyTask");
    let left: Vec<String> = rbd_images()
        .into_iter()
        .filter(|name| name.contains(&domain))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(rbd_images().contains(&source), "the operator's image stays");
}

/// A chained disk whose shared parent another host is still uploading (an
/// image of that name without its `.done` marker) waits, then copies the
/// image into the disk; the task runs, and its destroy leaves that parent
/// alone: it is the other host's to finish or delete (the teardown used to
/// name it, and deleted it here, where nothing held it open).
#[tokio::test(flavor = "multi_thread")]
async fn a_chained_disk_copies_when_the_parent_stays_unfinished_and_leaves_that_parent_alone() {
    use nomad_driver_virt::libvirt::storage::rbd::{ensure_rbd_pool, PARENT_WAIT_ENV};
    use nomad_driver_virt::nomad_client::LaunchOptions;

    if !common::host_ready(NEEDS) {
        return;
    }
    let alloc = Alloc::new("cephwait");
    let pool = vm::unique("ndvtest-cephwait-");
    let _pools = CephPoolsGuard(vec![pool.clone()]);
    let image = alloc.task_dir().join("wait.img");
    write_unique_image(&image, "ndvtest-wait-");
    let parent = parent_of(&image, ImageFormat::Raw);

    // The other host's upload under way: the parent, no marker.
    let conn = virt::connect::Connect::open(Some("qemu:///system")).expect("connect");
    ensure_rbd_pool(&conn, &local_ceph_pool(&pool)).expect("the rbd pool");
    drop(conn);
    let made = virsh(&["vol-create-as", &pool, &parent, "4M"]);
    assert!(made.status.success(), "{made:?}");
    let _parent = SourceImageGuard {
        pool: pool.clone(),
        image: parent.clone(),
    };

    let plugin = common::launch_with(LaunchOptions {
        env: vec![(PARENT_WAIT_ENV.to_string(), "3".to_string())],
        ..LaunchOptions::default()
    })
    .await;
    plugin
        .set_config_hcl(
            &config_with(&alloc, &ceph_block(&pool, "\"127.0.0.1:6789\"", &key())),
            None,
        )
        .await
        .expect("set config");
    let job = format!(
        "disk {{\n  chained = true\n  pool = \"{pool}\"\n  source {{\n    image = \"wait.img\"\n  }}\n}}\n"
    );
    let task = alloc.task(&plugin, &job, 128).await;
    let task_id = task.id.clone();
    let domain = vm::domain_name_of(&task);
    let _images = RbdImagesGuard {
        pool: pool.clone(),
        domains: vec![domain.clone()],
    };
    let _guard = DomainGuard(domain.clone());
    tokio::time::timeout(Duration::from_secs(120), vm::start(&plugin, task))
        .await
        .expect("the start does not hang")
        .expect("StartTask copies instead of waiting for ever");
    let disk = format!("{domain}_vda.img");
    let info = rbd_info(&disk);
    assert!(info.contains("size 4 MiB"), "{info}");
    assert!(!info.contains("parent:"), "a copy, not a clone: {info}");
    let images = rbd_images();
    assert!(
        images.contains(&parent),
        "the parent is still there: {images:?}"
    );

    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id,
            force: true,
        })
        .await
        .expect("DestroyTask");
    let images = rbd_images();
    assert!(!images.contains(&disk), "{images:?}");
    assert!(
        images.contains(&parent),
        "the other host's parent must stay: {images:?}"
    );
    assert!(!images.contains(&format!("{parent}.done")), "{images:?}");
    let _ = plugin.kill().await;
}

/// A chained disk whose upload into a new shared parent fails (a qcow2
/// whose header checks out but whose L2 table offset is corrupt, so
/// qemu-img stops with an I/O error mid-conversion): the start fails with
/// the disk's field, the half-written parent is deleted, and the next
/// start of the same image on this plugin is not blocked by the parent's
/// lock (it used to deadlock: the failed upload deleted its parent
/// through the function that takes that lock again).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_parent_upload_removes_the_parent_and_blocks_nothing() {
    if !common::host_ready(NEEDS) {
        return;
    }
    let alloc = Alloc::new("cephfail");
    let pool = vm::unique("ndvtest-cephfail-");
    let _pools = CephPoolsGuard(vec![pool.clone()]);
    let image = alloc.task_dir().join("corrupt.qcow2");
    let image_arg = image.to_str().expect("utf-8 path");
    let run_tool = |program: &str, args: &[&str]| {
        let output = Command::new(program).args(args).output().expect("run tool");
        assert!(output.status.success(), "{program} {args:?}: {output:?}");
    };
    run_tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", image_arg, "16M"],
    );
    run_tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 64k", image_arg],
    );
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .expect("open image");
        let mut offset = [0u8; 8];
        file.read_exact_at(&mut offset, 40).expect("l1 offset");
        let l1_offset = u64::from_be_bytes(offset);
        // Copied flag set, the L2 offset not cluster-aligned.
        let corrupt = (1u64 << 63) | 0x3_0200;
        file.write_all_at(&corrupt.to_be_bytes(), l1_offset)
            .expect("corrupt l1");
    }
    let parent = parent_of(&image, ImageFormat::Qcow2);
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(
            &config_with(&alloc, &ceph_block(&pool, "\"127.0.0.1:6789\"", &key())),
            None,
        )
        .await
        .expect("set config");
    let job = format!(
        "disk {{\n  chained = true\n  pool = \"{pool}\"\n  source {{\n    image = \"corrupt.qcow2\"\n  }}\n}}\n"
    );
    for attempt in 0..2 {
        let task = alloc.task(&plugin, &job, 128).await;
        let domain = vm::domain_name_of(&task);
        let _guard = DomainGuard(domain.clone());
        let _images = RbdImagesGuard {
            pool: pool.clone(),
            domains: vec![domain.clone()],
        };
        let error = tokio::time::timeout(Duration::from_secs(120), vm::start(&plugin, task))
            .await
            .unwrap_or_else(|_| panic!("start {attempt} hangs"))
            .expect_err("a corrupt image must not start");
        let message = error.message().to_string();
        assert!(message.contains("disk[0]"), "{message}");
        assert!(!vm::domain_exists(&domain));
        let left: Vec<String> = rbd_images()
            .into_iter()
            .filter(|name| name.contains(&domain) || name.starts_with(&parent))
            .collect();
        assert!(left.is_empty(), "attempt {attempt} left images: {left:?}");
    }
}
