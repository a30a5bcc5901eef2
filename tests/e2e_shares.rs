//! End to end through the plugin: shared directories reach the guest over
//! 9p and over virtiofs (one booted guest per transport), read-only shares
//! stay read-only in the guest, and a share QEMU cannot open is refused
//! before anything is created. Files are written on the host side and read
//! in the guest through the guest agent (ExecTask), and the other way round.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::vm::{self, Alloc};
use nomad_driver_virt::nomad_client::PluginClient;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, ExecTaskRequest, Mount, TaskConfig,
};

const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// Removes the test's domain if a check panics before DestroyTask.
struct DomainGuard(String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        for action in ["destroy", "undefine"] {
            let _ = std::process::Command::new("virsh")
                .args(["-q", "-c", "qemu:///system", action, &self.0])
                .output();
        }
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn task_hcl(driver: &str) -> String {
    format!(
        r#"
shared_dirs_driver = "{driver}"
disk {{
  chained = true
  source {{
    image = "guest.qcow2"
  }}
}}
"#
    )
}

/// The plugin config of `alloc`, with `allow_insecure_readonly_mounts`
/// and `allow_writable_virtiofs` when asked for.
fn plugin_config(alloc: &Alloc, insecure: bool, writable_virtiofs: bool) -> String {
    let config = alloc.plugin_config();
    let uri = "uri = \"qemu:///system\"\n";
    assert!(config.contains(uri), "{config}");
    let mut settings = String::from(uri);
    if insecure {
        settings.push_str("    allow_insecure_readonly_mounts = true\n");
    }
    if writable_virtiofs {
        settings.push_str("    allow_writable_virtiofs = true\n");
    }
    config.replacen(uri, &settings, 1)
}

/// The uid QEMU runs as here (libvirt's Debian account).
fn qemu_uid() -> u32 {
    let output = std::process::Command::new("id")
        .args(["-u", "libvirt-qemu"])
        .output()
        .expect("id");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("libvirt-qemu's uid")
}

/// A task with the alloc's dirs plus a writable and a read-only
/// `volume_mount` (host dirs under the alloc's root), each with a file.
async fn task(plugin: &PluginClient, alloc: &Alloc, driver: &str) -> TaskConfig {
    let mut task = alloc.task_config(
        plugin
            .encode_task_config(&task_hcl(driver), &HashMap::new())
            .await
            .expect("encode"),
        160,
    );
    let root = alloc.root.path();
    for (name, mode) in [("rw", 0o777), ("ro", 0o755)] {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        chmod(&dir, mode);
        std::fs::write(dir.join("from-host"), format!("{name} from the host\n")).expect("write");
    }
    std::fs::write(
        alloc.task_dir().join("local/hello"),
        "local from the host\n",
    )
    .expect("write");
    std::fs::write(alloc.task_dir().join("secrets/token"), "s3cret\n").expect("write");
    task.mounts = vec![
        Mount {
            task_path: "/data-rw".into(),
            host_path: root.join("rw").display().to_string(),
            readonly: false,
            ..Default::default()
        },
        Mount {
            task_path: "/data-ro".into(),
            host_path: root.join("ro").display().to_string(),
            readonly: true,
            ..Default::default()
        },
    ];
    task
}

/// Runs `script` with `sh -c` in the guest: (exit code, stdout + stderr).
async fn guest_sh(plugin: &PluginClient, task_id: &str, script: &str) -> (i32, String) {
    let answer = plugin
        .driver()
        .exec_task(ExecTaskRequest {
            task_id: task_id.to_string(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout: prost_types::Duration::try_from(Duration::from_secs(60)).ok(),
        })
        .await
        .unwrap_or_else(|status| panic!("exec {script:?}: {status:?}"))
        .into_inner();
    let mut output = String::from_utf8_lossy(&answer.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&answer.stderr));
    (answer.result.map_or(-1, |r| r.exit_code), output)
}

/// The `<filesystem>` elements of a domain: (tag, driver type, readonly).
fn filesystems(domain: &str) -> (Vec<(String, String, bool)>, bool) {
    let output = std::process::Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "dumpxml", domain])
        .output()
        .expect("virsh dumpxml");
    let xml = String::from_utf8_lossy(&output.stdout).into_owned();
    let root = nomad_driver_virt::libvirt::xml::parse(&xml).expect("domain XML");
    let devices = root.child("devices").expect("devices");
    let shares = devices
        .children_named("filesystem")
        .map(|fs| {
            (
                fs.child("target")
                    .and_then(|t| t.attr("dir"))
                    .unwrap_or_default()
                    .to_string(),
                fs.child("driver")
                    .and_then(|d| d.attr("type"))
                    .unwrap_or("path")
                    .to_string(),
                fs.child("readonly").is_some(),
            )
        })
        .collect();
    let shared_memory = root
        .child("memoryBacking")
        .and_then(|backing| backing.child("access"))
        .and_then(|access| access.attr("mode"))
        == Some("shared");
    (shares, shared_memory)
}

/// Boots a task with `driver`, checks what the guest sees through each
/// share, and destroys it. `fstype` is what the guest's /proc/mounts must
/// show for every share. `insecure` sets both virtiofs opt-ins.
async fn shares_reach_the_guest(name: &str, driver: &str, insecure: bool, fstype: &str) {
    let alloc = Alloc::new(name);
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&plugin_config(&alloc, insecure, insecure), None)
        .await
        .expect("set config");
    let task = task(&plugin, &alloc, driver).await;
    let task_id = task.id.clone();
    let domain = vm::domain_name_of(&task);
    let _guard = DomainGuard(domain.clone());
    vm::start(&plugin, task).await.expect("StartTask");

    // The libvirt side: every share on the expected transport.
    let (shares, shared_memory) = filesystems(&domain);
    let driver_type = if fstype == "virtiofs" {
        "virtiofs"
    } else {
        "path"
    };
    assert_eq!(shares.len(), 5, "{shares:?}");
    // libvirt enforces read-only on 9p, and on virtiofs from 11 on; before
    // that the insecure setting leaves it to the guest's mount.
    let enforced = fstype == "9p" || daemon_major() >= 11;
    for (tag, driver, readonly) in &shares {
        assert_eq!(driver, driver_type, "{tag}: {shares:?}");
        let read_only_share = tag != "vol0";
        assert_eq!(
            *readonly,
            read_only_share && enforced,
            "<readonly/> of {tag}: {shares:?}"
        );
    }
    assert_eq!(shared_memory, fstype == "virtiofs", "memoryBacking");

    let deadline = Instant::now() + BOOT_LIMIT;
    tokio::task::block_in_place(|| alloc.wait_for_console("GUEST-READY", BOOT_LIMIT));
    // The agent may still be coming up.
    loop {
        let answer = plugin
            .driver()
            .exec_task(ExecTaskRequest {
                task_id: task_id.clone(),
                command: vec!["true".into()],
                timeout: prost_types::Duration::try_from(Duration::from_secs(10)).ok(),
            })
            .await;
        match answer {
            Ok(_) => break,
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(status) => panic!("agent not ready: {status:?}\n{}", alloc.console()),
        }
    }

    // Every share is mounted with the transport chosen.
    let (code, mounts) = guest_sh(&plugin, &task_id, "cat /proc/mounts").await;
    assert_eq!(code, 0, "{mounts}");
    for path in ["/alloc", "/local", "/secrets", "/data-rw", "/data-ro"] {
        assert!(
            mounts
                .lines()
                .any(|line| line.split_whitespace().nth(1) == Some(path)
                    && line.split_whitespace().nth(2) == Some(fstype)),
            "{path} is not a {fstype} mount:\n{mounts}\nconsole:\n{}",
            alloc.console()
        );
    }

    // Host to guest, through every kind of share.
    let (code, text) = guest_sh(
        &plugin,
        &task_id,
        "cat /local/hello /secrets/token /data-rw/from-host /data-ro/from-host",
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text,
        "local from the host\ns3cret\nrw from the host\nro from the host\n"
    );
    std::fs::write(alloc.task_dir().join("local/later"), "written after boot\n").expect("write");
    let (code, text) = guest_sh(&plugin, &task_id, "cat /local/later").await;
    assert_eq!((code, text.as_str()), (0, "written after boot\n"));

    // Guest to host through the writable share.
    let (code, text) = guest_sh(
        &plugin,
        &task_id,
        "echo from the guest > /data-rw/from-guest",
    )
    .await;
    assert_eq!(code, 0, "{text}");
    let from_guest = alloc.root.path().join("rw/from-guest");
    assert_eq!(
        std::fs::read_to_string(&from_guest).expect("guest's file"),
        "from the guest\n"
    );
    // Over 9p (mapped) guest root's file belongs to QEMU's user; over
    // virtiofs (opted in) to root: why writable virtiofs is opt-in.
    let owner = std::fs::metadata(&from_guest).expect("stat").uid();
    let expected_owner = if fstype == "9p" { qemu_uid() } else { 0 };
    assert_eq!(owner, expected_owner, "owner of the guest's file");

    // Read-only shares refuse writes in the guest, and nothing lands.
    for path in [
        "/data-ro/nope",
        "/secrets/nope",
        "/local/nope",
        "/alloc/nope",
    ] {
        let (code, text) = guest_sh(&plugin, &task_id, &format!("echo x > {path}")).await;
        assert_ne!(code, 0, "writing {path} succeeded: {text}");
    }
    assert!(!alloc.root.path().join("ro/nope").exists());
    assert!(!alloc.task_dir().join("secrets/nope").exists());

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

/// Every share over 9p, opened by QEMU as libvirt's user; read-only ones
/// carry `<readonly/>`. Before libvirt 11 that is what `auto` does without
/// the opt-ins (writable shares too, unlike Go); from 11 on `auto` puts
/// read-only shares on virtiofs, so the test forces 9p there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_p_shares_reach_the_guest() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let driver = if daemon_major() < 11 { "auto" } else { "9p" };
    shares_reach_the_guest("ninep", driver, false, "9p").await;
}

/// `auto` with `allow_insecure_readonly_mounts` and
/// `allow_writable_virtiofs`: every share over virtiofs (before libvirt 11
/// the read-only ones kept read-only by the guest's mount alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtiofs_shares_reach_the_guest() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    shares_reach_the_guest("vfs", "auto", true, "virtiofs").await;
}

/// A secrets dir QEMU's user cannot read (0700, root's) fails StartTask
/// before any volume or domain exists, naming the dir, the user and the
/// fix; so does read-only virtiofs where libvirt cannot enforce it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_qemu_cannot_serve_are_refused_before_boot() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let alloc = Alloc::new("refused");
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&alloc.plugin_config(), None)
        .await
        .expect("set config");
    let secrets = alloc.task_dir().join("secrets");
    chmod(&secrets, 0o700);

    // Forced 9p: from libvirt 11 `auto` would serve read-only secrets over
    // virtiofs.
    let task = task(&plugin, &alloc, "9p").await;
    let domain = vm::domain_name_of(&task);
    let _guard = DomainGuard(domain.clone());
    let status = vm::start(&plugin, task)
        .await
        .expect_err("a secrets dir QEMU cannot read");
    let message = status.message();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // Before libvirt 11 virtiofs needs the insecure setting to serve it.
    let other_fix = if daemon_major() < 11 {
        "allow_insecure_readonly_mounts = true"
    } else {
        "shared_dirs_driver = \"auto\" or \"virtiofs\""
    };
    for needle in [
        "the task's secrets dir (/secrets in the guest",
        &secrets.display().to_string(),
        "QEMU runs as libvirt-qemu",
        "mode 0700 owned by 0:0",
        "setfacl -m u:libvirt-qemu:rx",
        other_fix,
    ] {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }
    assert!(!message.contains("Permission denied"), "{message}");
    assert!(!vm::domain_exists(&domain));
    assert_eq!(vm::pool_volumes(&alloc.pool_name), Vec::<String>::new());

    // An ACL for QEMU's user is enough (the kernel has the last word): the
    // secrets dir passes, and the next closed share is the one named.
    let acl = std::process::Command::new("setfacl")
        .args(["-m", "u:libvirt-qemu:rx"])
        .arg(&secrets)
        .status();
    assert!(
        acl.is_ok_and(|status| status.success()),
        "setfacl failed: run tests/setup/host.sh (package acl)"
    );
    let task = self::task(&plugin, &alloc, "9p").await;
    let read_only_dir = alloc.root.path().join("ro");
    chmod(&read_only_dir, 0o700);
    let status = vm::start(&plugin, task)
        .await
        .expect_err("a read-only volume QEMU cannot read");
    let message = status.message();
    for needle in [
        "volume_mount 1 (/data-ro in the guest",
        "cannot be shared over 9p",
        "mode 0700",
    ] {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }
    assert!(!message.contains("secrets"), "{message}");
    assert_eq!(vm::pool_volumes(&alloc.pool_name), Vec::<String>::new());
    chmod(&read_only_dir, 0o755);

    // Forced virtiofs cannot be read-only before libvirt 11 without the
    // insecure setting.
    if daemon_major() < 11 {
        let task = self::task(&plugin, &alloc, "virtiofs").await;
        let domain = vm::domain_name_of(&task);
        let _guard = DomainGuard(domain.clone());
        let status = vm::start(&plugin, task)
            .await
            .expect_err("read-only virtiofs before libvirt 11");
        let message = status.message();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        for needle in [
            "shared_dirs_driver = \"virtiofs\"",
            "cannot make a virtiofs share read-only",
            "11.0.0",
            "allow_insecure_readonly_mounts = true",
        ] {
            assert!(message.contains(needle), "{needle:?} not in: {message}");
        }
        assert!(!vm::domain_exists(&domain));
        assert_eq!(vm::pool_volumes(&alloc.pool_name), Vec::<String>::new());
    }

    // Forced virtiofs with a writable share needs allow_writable_virtiofs
    // (read-only shares allowed on virtiofs here, so the writable one is
    // what stops it).
    plugin
        .set_config_hcl(&plugin_config(&alloc, true, false), None)
        .await
        .expect("set config");
    let task = self::task(&plugin, &alloc, "virtiofs").await;
    let domain = vm::domain_name_of(&task);
    let _guard = DomainGuard(domain.clone());
    let status = vm::start(&plugin, task)
        .await
        .expect_err("writable virtiofs without the opt-in");
    let message = status.message();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    for needle in [
        "shared_dirs_driver = \"virtiofs\": volume_mount 0 (/data-rw in the guest) is writable",
        "virtiofsd runs as root",
        "allow_writable_virtiofs = true",
    ] {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }
    assert!(!vm::domain_exists(&domain));
    assert_eq!(vm::pool_volumes(&alloc.pool_name), Vec::<String>::new());

    // A machine type QEMU lacks is reported as such, not read as "no
    // virtiofs" (which would quietly pick 9p).
    let hcl = task_hcl("auto").replace("disk {", "os {\n  machine = \"ndvtest-bogus\"\n}\ndisk {");
    let mut task = self::task(&plugin, &alloc, "auto").await;
    task.msgpack_driver_config = plugin
        .encode_task_config(&hcl, &HashMap::new())
        .await
        .expect("encode");
    let domain = vm::domain_name_of(&task);
    let _guard = DomainGuard(domain.clone());
    let status = vm::start(&plugin, task)
        .await
        .expect_err("a machine type QEMU lacks");
    let message = status.message();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    for needle in ["os.machine \"ndvtest-bogus\"", "domain capabilities", "q35"] {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }
    assert!(!vm::domain_exists(&domain));
    assert_eq!(vm::pool_volumes(&alloc.pool_name), Vec::<String>::new());
}

/// libvirtd's major version (`virsh version --daemon`).
fn daemon_major() -> u32 {
    let output = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "version", "--daemon"])
        .output()
        .expect("virsh version");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.lines()
        .find_map(|line| line.strip_prefix("Running against daemon: "))
        .and_then(|version| version.split('.').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no daemon version in {text:?}"))
}
