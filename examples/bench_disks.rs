//! Disk preparation at scale: the disks of N tasks made from one image,
//! through the driver's own disk preparation (`Hypervisor::create_volume`,
//! what a start calls) on the local libvirtd, against a full copy per task.
//!
//! The image: a raw file of 2 GiB with 1 GiB of data (1 MiB of pseudo-random
//! bytes at every other MiB, holes between), so a copy costs something and
//! a copy that keeps holes costs half. Methods, 10 tasks each:
//!
//! - full copy per task: `cp --sparse=never` of the image into the pool
//!   directory (what a naive driver would do);
//! - not chained: a raw disk with `sparse = true` from the image
//!   (`VolumeContent::Copy`): a reflink where the filesystem offers one,
//!   else a sparse copy;
//! - chained: a qcow2 overlay per task on one shared parent
//!   (`VolumeContent::Overlay`); the first task uploads the parent;
//! - the two driver methods again with pool and image on a private XFS
//!   file system with reflinks (a loop file), when mkfs.xfs is installed.
//!
//! Measured per method: wall time of the N preparations plus one `syncfs`
//! of the pool's file system (so written data is on disk within the time);
//! the blocks the new files allocate (sum of st_blocks × 512 over the
//! pool's files, shared parent included); and the file system's used space
//! before and after (statvfs). st_blocks counts a reflinked file's shared
//! blocks in full, so on XFS only the statvfs delta shows what was really
//! written; on the shared root file system statvfs also sees other
//! processes, so there st_blocks is the measure.
//!
//!   cargo build --release && cargo run --release --example bench_disks
//!   cargo run --example bench_disks -- --short   # 64 MiB image, 3 tasks (CI)
//!
//! Needs root and libvirtd (tests/setup/host.sh). Everything it creates is
//! named ndvtest-* (pools, temp dirs) and removed, also on failure.

#[path = "common/mod.rs"]
mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::BoxError;
use nomad_driver_virt::config::plugin::DirectoryPool;
use nomad_driver_virt::hypervisor::libvirt::LibvirtHypervisor;
use nomad_driver_virt::hypervisor::{Hypervisor, VolumeContent};
use nomad_driver_virt::libvirt::Libvirt;
use nomad_driver_virt::nomad::driver_state::CreatedVolume;
use nomad_driver_virt::storage::copy::CopyProgress;
use nomad_driver_virt::storage::{ImageFile, ImageFormat};

const URI: &str = "qemu:///system";
const MIB: u64 = 1 << 20;

struct Shape {
    image_size: u64,
    tasks: usize,
}

/// One row of the table.
struct Row {
    method: String,
    filesystem: &'static str,
    wall: Duration,
    /// Each task's preparation, in order.
    tasks: Vec<Duration>,
    allocated: u64,
    fs_used: i128,
}

fn main() -> Result<(), BoxError> {
    let short = std::env::args().any(|arg| arg == "--short");
    let shape = if short {
        Shape {
            image_size: 64 * MIB,
            tasks: 3,
        }
    } else {
        Shape {
            image_size: 2048 * MIB,
            tasks: 10,
        }
    };
    if rustix::process::geteuid().as_raw() != 0 {
        return Err(
            "bench_disks: run as root (it uses qemu:///system and mounts a loop file)".into(),
        );
    }
    let hypervisor = LibvirtHypervisor::new(Libvirt::new(URI, None));
    hypervisor
        .ping()
        .map_err(|e| format!("libvirtd at {URI}: {e}; run tests/setup/host.sh"))?;

    let mut rows = Vec::new();
    let work = Workspace::new("ndvtest-bench-disks-")?;
    rows.extend(run_methods(
        &hypervisor,
        &shape,
        work.path(),
        "root fs (ext4)",
        true,
    )?);
    drop(work);

    if which("mkfs.xfs") {
        let xfs = XfsMount::new(shape.image_size * 2 + 512 * MIB)?;
        rows.extend(run_methods(
            &hypervisor,
            &shape,
            &xfs.path(),
            "XFS, reflink=1",
            false,
        )?);
    } else {
        eprintln!("bench_disks: mkfs.xfs missing (apt-get install xfsprogs): no XFS rows");
    }

    println!(
        "Disk preparation for {} tasks from one raw image of {} MiB ({} MiB of data, holes between), \
         through Hypervisor::create_volume on {URI}; wall time includes a syncfs of the pool's \
         file system, the task columns (each preparation) do not; {} build; load average {}",
        shape.tasks,
        shape.image_size / MIB,
        shape.image_size / 2 / MIB,
        common::profile(),
        common::load_average()
    );
    println!();
    println!("| method | pool file system | wall time (s) | first task (s) | later tasks, median (s) | allocated by the pool's files (st_blocks) | file system space used (statvfs delta) |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        let mut later: Vec<Duration> = row.tasks.iter().skip(1).copied().collect();
        later.sort();
        let median = later.get(later.len() / 2).copied().unwrap_or_default();
        println!(
            "| {} | {} | {:.2} | {:.3} | {:.3} | {} | {} |",
            row.method,
            row.filesystem,
            row.wall.as_secs_f64(),
            row.tasks.first().copied().unwrap_or_default().as_secs_f64(),
            median.as_secs_f64(),
            mib(row.allocated as i128),
            mib(row.fs_used),
        );
    }
    Ok(())
}

fn mib(bytes: i128) -> String {
    format!("{:.0} MiB", bytes as f64 / MIB as f64)
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The image: `size` bytes, 1 MiB of pseudo-random data at every other MiB.
fn write_image(path: &Path, size: u64) -> Result<(), BoxError> {
    let file = File::create(path)?;
    file.set_len(size)?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut block = vec![0u8; MIB as usize];
    for at in (0..size / MIB).step_by(2) {
        for chunk in block.chunks_mut(8) {
            // xorshift64: cheap bytes that no filesystem could compress.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        file.write_all_at(&block, at * MIB)?;
    }
    file.sync_all()?;
    Ok(())
}

/// The three methods (or the driver's two) in `dir`, each with its own
/// pool directory; everything made is removed before returning.
fn run_methods(
    hypervisor: &LibvirtHypervisor,
    shape: &Shape,
    dir: &Path,
    filesystem: &'static str,
    with_full_copy: bool,
) -> Result<Vec<Row>, BoxError> {
    let image_path = dir.join("image.img");
    write_image(&image_path, shape.image_size)?;
    let mut rows = Vec::new();
    if with_full_copy {
        let pool_dir = dir.join("full-copy");
        std::fs::create_dir(&pool_dir)?;
        let before = fs_used(&pool_dir)?;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for task in 0..shape.tasks {
            let task_started = Instant::now();
            let status = Command::new("cp")
                .arg("--sparse=never")
                .arg(&image_path)
                .arg(pool_dir.join(format!("task-{task}.img")))
                .status()?;
            if !status.success() {
                return Err(format!("cp failed: {status}").into());
            }
            tasks.push(task_started.elapsed());
        }
        syncfs(&pool_dir)?;
        rows.push(Row {
            method: "full copy per task (`cp --sparse=never`)".into(),
            filesystem,
            wall: started.elapsed(),
            tasks,
            allocated: allocated(&pool_dir)?,
            fs_used: fs_used(&pool_dir)? - before,
        });
        std::fs::remove_dir_all(&pool_dir)?;
    }
    for chained in [false, true] {
        let pool = BenchPool::new(hypervisor, dir, if chained { "chained" } else { "copy" })?;
        let image = ImageFile::from_file(File::open(&image_path)?, "image.img");
        let before = fs_used(&pool.path)?;
        let progress = CopyProgress::new();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for task in 0..shape.tasks {
            let task_started = Instant::now();
            let name = format!(
                "ndvtest-bench-{task}_vda.{}",
                if chained { "qcow2" } else { "img" }
            );
            let content = if chained {
                VolumeContent::Overlay {
                    image: &image,
                    image_format: ImageFormat::Raw,
                    capacity: None,
                    cap: Some(shape.image_size),
                    progress: Some(&progress),
                }
            } else {
                VolumeContent::Copy {
                    image: &image,
                    image_format: ImageFormat::Raw,
                    format: ImageFormat::Raw,
                    capacity: None,
                    sparse: true,
                    cap: Some(shape.image_size),
                    progress: Some(&progress),
                }
            };
            hypervisor
                .create_volume(&pool.name, &name, content)
                .map_err(|e| format!("task {task}: {e}"))?;
            tasks.push(task_started.elapsed());
        }
        syncfs(&pool.path)?;
        let wall = started.elapsed();
        rows.push(Row {
            method: if chained {
                "chained: overlay per task on one shared parent (driver)".into()
            } else {
                "not chained: raw copy per task, `sparse = true` (driver)".into()
            },
            filesystem,
            wall,
            tasks,
            allocated: allocated(&pool.path)?,
            fs_used: fs_used(&pool.path)? - before,
        });
        drop(pool);
    }
    std::fs::remove_file(&image_path)?;
    Ok(rows)
}

/// Sum of st_blocks × 512 over the regular files in `dir`.
fn allocated(dir: &Path) -> Result<u64, BoxError> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

fn fs_used(path: &Path) -> Result<i128, BoxError> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(i128::from(stat.f_blocks - stat.f_bfree) * i128::from(stat.f_frsize))
}

fn syncfs(path: &Path) -> Result<(), BoxError> {
    let dir = File::open(path)?;
    rustix::fs::syncfs(&dir)?;
    Ok(())
}

/// A temp dir named `prefix*`, readable by QEMU's user; removed on drop.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new(prefix: &str) -> Result<Workspace, BoxError> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        Ok(Workspace { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A driver pool (made as the plugin makes its pools) in `dir/<label>`;
/// its volumes, shared parents included, and the pool itself are removed
/// on drop.
struct BenchPool<'a> {
    hypervisor: &'a LibvirtHypervisor,
    name: String,
    path: PathBuf,
}

impl<'a> BenchPool<'a> {
    fn new(
        hypervisor: &'a LibvirtHypervisor,
        dir: &Path,
        label: &str,
    ) -> Result<BenchPool<'a>, BoxError> {
        let path = dir.join(label);
        let name = format!("ndvtest-bench-disks-{label}-{}", std::process::id());
        hypervisor.prepare_pool(&DirectoryPool {
            name: name.clone(),
            path: path.clone(),
        })?;
        Ok(BenchPool {
            hypervisor,
            name,
            path,
        })
    }
}

impl Drop for BenchPool<'_> {
    fn drop(&mut self) {
        for volume in self.hypervisor.volume_names(&self.name).unwrap_or_default() {
            let created = CreatedVolume {
                pool: self.name.clone(),
                name: volume.clone(),
            };
            if let Err(error) = self.hypervisor.delete_volume(&created) {
                eprintln!("bench_disks: cannot delete volume {volume}: {error}");
            }
        }
        for action in ["pool-destroy", "pool-undefine"] {
            let _ = Command::new("virsh")
                .args(["-q", "-c", URI, action, &self.name])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// An XFS file system with reflinks on a sparse loop file in a temp dir;
/// unmounted (the loop device goes with it) and removed on drop.
struct XfsMount {
    work: Workspace,
}

impl XfsMount {
    fn new(size: u64) -> Result<XfsMount, BoxError> {
        let work = Workspace::new("ndvtest-bench-xfs-")?;
        let image = work.path().join("fs.img");
        File::create(&image)?.set_len(size)?;
        let run = |program: &str, args: &[&std::ffi::OsStr]| -> Result<(), BoxError> {
            let output = Command::new(program).args(args).output()?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{program} failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )
                .into())
            }
        };
        run(
            "mkfs.xfs",
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                image.as_os_str(),
            ],
        )?;
        let mount = work.path().join("mnt");
        std::fs::create_dir(&mount)?;
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                mount.as_os_str(),
            ],
        )?;
        std::fs::set_permissions(&mount, std::fs::Permissions::from_mode(0o755))?;
        Ok(XfsMount { work })
    }

    fn path(&self) -> PathBuf {
        self.work.path().join("mnt")
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.path()).status();
    }
}
