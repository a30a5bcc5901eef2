//! End to end through the plugin: what the guest sees of disks made from an
//! operator's pool volume (`source.volume`, cloned, never written) and of
//! disks on Nomad block volumes (`disk { volume = "/dev/..." }` matched to
//! the task's volume_mount): a read_only mount is read-only in the guest,
//! and a source image is written onto a writable one. One guest, checked
//! through the guest agent (issues 9.6, 9.7, 11.1, 11.2).

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::vm::{self, Alloc};
use nomad_driver_virt::nomad_client::PluginClient;
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, ExecTaskRequest, ExecTaskResponse, Mount,
};

const BOOT_LIMIT: Duration = Duration::from_secs(240);
const MIB: usize = 1 << 20;

/// A loop device over a file; detached on drop.
struct Loop {
    device: String,
}

impl Loop {
    fn attach(file: &Path) -> Loop {
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("run losetup (util-linux)");
        assert!(output.status.success(), "losetup: {output:?}");
        Loop {
            device: String::from_utf8_lossy(&output.stdout).trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).output();
    }
}

/// Removes the domain if a check panics before DestroyTask.
struct DomainGuard(String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        for action in ["destroy", "undefine"] {
            let _ = Command::new("virsh")
                .args(["-q", "-c", "qemu:///system", action, &self.0])
                .output();
        }
    }
}

/// A file of `size` bytes starting with `marker`.
fn marked_file(path: &Path, size: usize, marker: &str) {
    let mut bytes = vec![0u8; size];
    bytes[..marker.len()].copy_from_slice(marker.as_bytes());
    std::fs::write(path, bytes).expect("write");
}

fn snapshot(path: &Path) -> (Vec<u8>, i64, i64) {
    let meta = std::fs::metadata(path).expect("stat");
    (
        std::fs::read(path).expect("read"),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

async fn exec(
    plugin: &PluginClient,
    task_id: &str,
    script: &str,
) -> Result<ExecTaskResponse, tonic::Status> {
    plugin
        .driver()
        .exec_task(ExecTaskRequest {
            task_id: task_id.to_string(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout: prost_types::Duration::try_from(Duration::from_secs(30)).ok(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Per guest virtio disk: (name, size in 512-byte sectors, ro flag, first
/// bytes as printable text).
fn parse_disks(stdout: &[u8]) -> Vec<(String, u64, String, String)> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(4, ' ');
            Some((
                parts.next()?.to_string(),
                parts.next()?.parse().ok()?,
                parts.next()?.to_string(),
                parts.next().unwrap_or("").to_string(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_and_block_disks_as_the_guest_sees_them() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let alloc = Alloc::new("disks");
    let work = tempfile::Builder::new()
        .prefix("ndvtest-disks-")
        .tempdir()
        .expect("tempdir");

    // The operator's volume, already in the pool's directory.
    let base = alloc.pool_dir().join("ndvtest-base-data.img");
    marked_file(&base, 8 * MIB, "ndvtest-clone-src");
    let base_before = snapshot(&base);
    // Two Nomad block volumes: one mounted read_only, one written from an
    // image the job names.
    let ro_file = work.path().join("ro.img");
    marked_file(&ro_file, 4 * MIB, "ndvtest-readonly");
    let rw_file = work.path().join("rw.img");
    marked_file(&rw_file, 6 * MIB, "ndvtest-untouched");
    let ro_before = snapshot(&ro_file);
    let ro_loop = Loop::attach(&ro_file);
    let rw_loop = Loop::attach(&rw_file);
    marked_file(
        &alloc.task_dir().join("written.img"),
        MIB,
        "ndvtest-written",
    );

    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&alloc.plugin_config(), None)
        .await
        .expect("set config");
    let config = r#"
disk {
  primary = true
  chained = true
  source {
    image = "guest.qcow2"
  }
}
disk {
  size = "16MiB"
  source {
    volume = "ndvtest-base-data.img"
  }
}
disk {
  volume = "/dev/vdc"
}
disk {
  volume = "/dev/vdd"
  source {
    image = "written.img"
  }
}
"#;
    let mut task = alloc.task_config(
        plugin
            .encode_task_config(config, &HashMap::new())
            .await
            .expect("encode"),
        192,
    );
    task.mounts = vec![
        Mount {
            task_path: "/dev/vdc".into(),
            host_path: ro_loop.device.clone(),
            readonly: true,
            ..Default::default()
        },
        Mount {
            task_path: "/dev/vdd".into(),
            host_path: rw_loop.device.clone(),
            readonly: false,
            ..Default::default()
        },
    ];
    let task_id = task.id.clone();
    let domain = vm::domain_name_of(&task);
    let _guard = DomainGuard(domain.clone());
    vm::start(&plugin, task).await.expect("StartTask");

    // The domain XML: the source volume is not attached; the block disks
    // carry their mount's read_only and the destination's device name.
    let xml = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "dumpxml", &domain])
        .output()
        .expect("dumpxml");
    let xml = String::from_utf8_lossy(&xml.stdout).into_owned();
    assert!(!xml.contains("ndvtest-base-data.img"), "{xml}");
    assert!(xml.contains("<target dev='vdc' bus='virtio'/>"), "{xml}");
    assert!(xml.contains("<target dev='vdd' bus='virtio'/>"), "{xml}");

    let booted = Instant::now();
    loop {
        match exec(&plugin, &task_id, "true").await {
            Ok(_) => break,
            Err(status) if booted.elapsed() < BOOT_LIMIT => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(status) => panic!(
                "agent not ready within {BOOT_LIMIT:?}: {status:?}\n{}",
                alloc.console()
            ),
        }
    }
    let listing = exec(
        &plugin,
        &task_id,
        "for d in /sys/block/vd*; do n=${d##*/}; \
         echo \"$n $(cat $d/size) $(cat $d/ro) $(dd if=/dev/$n bs=32 count=1 2>/dev/null | tr -c 'a-z-' '.')\"; done",
    )
    .await
    .expect("list disks");
    let disks = parse_disks(&listing.stdout);
    let find = |sectors: u64| {
        disks
            .iter()
            .find(|disk| disk.1 == sectors)
            .unwrap_or_else(|| panic!("no disk of {sectors} sectors in {disks:?}"))
            .clone()
    };
    let clone = find(16 * MIB as u64 / 512);
    assert_eq!(clone.2, "0", "the clone is writable: {disks:?}");
    assert!(clone.3.starts_with("ndvtest-clone-src"), "{disks:?}");
    let read_only = find(4 * MIB as u64 / 512);
    assert_eq!(read_only.2, "1", "read_only mount: {disks:?}");
    assert!(read_only.3.starts_with("ndvtest-readonly"), "{disks:?}");
    let written = find(6 * MIB as u64 / 512);
    assert_eq!(written.2, "0", "{disks:?}");
    assert!(
        written.3.starts_with("ndvtest-written"),
        "the image was written onto the volume: {disks:?}"
    );

    // Writes: refused on the read_only disk, fine on the clone.
    let attempt = exec(
        &plugin,
        &task_id,
        &format!(
            "echo ndvtest-guest-wrote | dd of=/dev/{} conv=fsync 2>/dev/null; echo ro=$?; \
             echo ndvtest-guest-wrote | dd of=/dev/{} conv=fsync 2>/dev/null; echo rw=$?",
            read_only.0, clone.0
        ),
    )
    .await
    .expect("write attempts");
    let said = String::from_utf8_lossy(&attempt.stdout).into_owned();
    assert!(said.contains("rw=0"), "{said}");
    assert!(
        !said.contains("ro=0"),
        "a read_only disk took a write: {said}"
    );

    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id: task_id.clone(),
            force: true,
        })
        .await
        .expect("DestroyTask");
    assert!(!vm::domain_exists(&domain));
    assert_eq!(snapshot(&ro_file), ro_before, "the read_only volume");
    assert_eq!(snapshot(&base), base_before, "the source volume");
    assert!(std::fs::read(&rw_file)
        .expect("read")
        .starts_with(b"ndvtest-written"));
    // The shared parent of the chained primary disk stays for reuse.
    let left: Vec<String> = vm::pool_volumes(&alloc.pool_name)
        .into_iter()
        .filter(|name| !name.starts_with(nomad_driver_virt::storage::PARENT_PREFIX))
        .collect();
    assert_eq!(
        left,
        vec!["ndvtest-base-data.img".to_string()],
        "only the operator's volume is left"
    );
    drop((ro_loop, rw_loop));
}
