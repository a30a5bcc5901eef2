//! Storage against the real libvirtd (qemu:///system): uploads, conversion
//! with qemu-img, sparse files, shared parents and pruning, persistent pool
//! lifecycle. Needs root, libvirtd and qemu-img (tests/setup/host.sh); the
//! tests fail, not skip, when those are missing: CI must provide them.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nomad_driver_virt::libvirt::storage::{
    clone_volume, create_empty, create_from_image, create_overlay, delete_volume,
    ensure_directory_pool, ensure_parent, lookup_pool, pool_fingerprint, prune_unused_parents,
    refresh_pool, source_volume, upload_bytes, Pool,
};
use nomad_driver_virt::storage::volume::{
    image_cache_key, parent_volume_name, seed_volume_name, unique_suffix, write_image_to_device,
    STAGING_MARK,
};
use nomad_driver_virt::storage::{detect_format, image_virtual_size, ImageFormat, StorageError};
use virt::connect::Connect;

const MIB: u64 = 1 << 20;

fn directory_pool_xml(name: &str, path: &Path) -> String {
    format!(
        "<pool type='dir'><name>{name}</name><target><path>{}</path></target></pool>",
        path.display()
    )
}

const URI: &str = "qemu:///system";

fn system() -> Connect {
    Connect::open(Some(URI)).unwrap_or_else(|error| {
        panic!(
            "cannot reach libvirtd at {URI} ({}); run tests/setup/host.sh as root \
             to install and start it",
            error.message()
        )
    })
}

fn unique_name() -> String {
    format!("ndvtest-{}", unique_suffix())
}

/// A transient dir pool in a tempdir; destroyed (and undefined if
/// persistent) on drop, whatever the test did.
struct PoolGuard {
    conn: Connect,
    name: String,
    dir: tempfile::TempDir,
}

impl PoolGuard {
    fn transient() -> (PoolGuard, Pool) {
        let conn = system();
        let dir = tempfile::tempdir().unwrap();
        let name = unique_name();
        let path = dir.path().join("pool");
        std::fs::create_dir(&path).unwrap();
        conn.create_storage_pool_xml(&directory_pool_xml(&name, &path), 0)
            .expect("create a transient pool");
        let pool = lookup_pool(&conn, &name)
            .expect("look up the transient pool")
            .expect("the transient pool exists");
        (PoolGuard { conn, name, dir }, pool)
    }

    fn persistent() -> PoolGuard {
        PoolGuard {
            conn: system(),
            name: unique_name(),
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        if let Ok(pool) = self.conn.lookup_storage_pool_by_name(&self.name) {
            if pool.is_active().unwrap_or(false) {
                let _ = pool.destroy();
            }
            if pool.is_persistent().unwrap_or(false) {
                let _ = pool.undefine();
            }
        }
    }
}

fn run(program: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let output = Command::new(program)
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}; run tests/setup/host.sh"));
    assert!(output.status.success(), "{program} {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn qemu_img_info(path: &Path) -> serde_json::Value {
    let out = run("qemu-img", &[&"info", &"-U", &"--output=json", &path]);
    serde_json::from_str(&out).expect("qemu-img info JSON")
}

fn assert_same_content(a: &Path, a_fmt: ImageFormat, b: &Path, b_fmt: ImageFormat) {
    run(
        "qemu-img",
        &[
            &"compare",
            &"-U",
            &"-f",
            &a_fmt.as_str(),
            &"-F",
            &b_fmt.as_str(),
            &a,
            &b,
        ],
    );
}

/// A 16 MiB image with data at 0, 5 MiB and the last block; raw and
/// qcow2 versions.
fn source_images(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("src.img");
    let mut bytes = vec![0u8; 16 * MIB as usize];
    bytes[..70_000].fill(0xab);
    bytes[5 * MIB as usize..5 * MIB as usize + 4096].fill(0x5a);
    let end = bytes.len();
    bytes[end - 512..].fill(0xff);
    std::fs::write(&raw, &bytes).unwrap();
    let qcow2 = dir.join("src.qcow2");
    run(
        "qemu-img",
        &[&"convert", &"-f", &"raw", &"-O", &"qcow2", &raw, &qcow2],
    );
    (raw, qcow2)
}

#[test]
fn upload_convert_and_resize() {
    if !common::host_ready(&[
        common::Need::Root,
        common::Need::Libvirtd,
        common::Need::Tool {
            program: "qemu-img",
            package: "qemu-utils",
        },
    ]) {
        return;
    }
    let (guard, pool) = PoolGuard::transient();
    let conn = &guard.conn;
    let (raw, qcow2) = source_images(guard.dir.path());

    // A blank qcow2 made by qemu-img create, as is.
    let blank = guard.dir.path().join("blank.qcow2");
    run(
        "qemu-img",
        &[&"create", &"-q", &"-f", &"qcow2", &blank, &"16M"],
    );
    let vol = create_from_image(
        conn,
        &pool,
        "blank.qcow2",
        &blank,
        ImageFormat::Qcow2,
        ImageFormat::Qcow2,
        None,
    )
    .unwrap();
    let path = vol.path().unwrap();
    let info = qemu_img_info(&path);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 16 * MIB, "{info}");
    assert_eq!(vol.capacity().unwrap(), 16 * MIB);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&blank).unwrap(),
        "an upload without conversion is a byte copy"
    );
    run("qemu-img", &[&"check", &"-U", &path]);

    // A qcow2 file smaller than the one libvirt pre-creates (196 KiB
    // for 16 MiB): libvirt's upload does not truncate, we do.
    let small = guard.dir.path().join("small.qcow2");
    run(
        "qemu-img",
        &[
            &"create",
            &"-q",
            &"-f",
            &"qcow2",
            &"-o",
            &"cluster_size=512",
            &small,
            &"16M",
        ],
    );
    let vol = create_from_image(
        conn,
        &pool,
        "small.qcow2",
        &small,
        ImageFormat::Qcow2,
        ImageFormat::Qcow2,
        None,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(vol.path().unwrap()).unwrap(),
        std::fs::read(&small).unwrap()
    );
    delete_volume(&pool, "small.qcow2").unwrap();

    // qcow2 → qcow2, grown to 32 MiB after the upload.
    let vol = create_from_image(
        conn,
        &pool,
        "grown.qcow2",
        &qcow2,
        ImageFormat::Qcow2,
        ImageFormat::Qcow2,
        Some(32 * MIB),
    )
    .unwrap();
    let path = vol.path().unwrap();
    assert_eq!(qemu_img_info(&path)["virtual-size"], 32 * MIB);
    assert_eq!(vol.capacity().unwrap(), 32 * MIB);
    assert_same_content(&qcow2, ImageFormat::Qcow2, &path, ImageFormat::Qcow2);
    run("qemu-img", &[&"check", &"-U", &path]);

    // qcow2 → raw through qemu-img convert, sparse, 24 MiB.
    let vol = create_from_image(
        conn,
        &pool,
        "vm_vdb.img",
        &qcow2,
        ImageFormat::Qcow2,
        ImageFormat::Raw,
        Some(24 * MIB),
    )
    .unwrap();
    let path = vol.path().unwrap();
    let info = qemu_img_info(&path);
    assert_eq!(info["format"], "raw", "{info}");
    assert_eq!(info["virtual-size"], 24 * MIB, "{info}");
    assert_same_content(&raw, ImageFormat::Raw, &path, ImageFormat::Raw);
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        allocated < 4 * MIB,
        "sparse upload allocated {allocated} bytes"
    );
    assert_eq!(detect_format(Path::new(&path)).unwrap(), ImageFormat::Raw);

    // raw → qcow2, and raw → raw at the image's own size.
    let vol = create_from_image(
        conn,
        &pool,
        "fromraw.qcow2",
        &raw,
        ImageFormat::Raw,
        ImageFormat::Qcow2,
        None,
    )
    .unwrap();
    let path = vol.path().unwrap();
    assert_eq!(qemu_img_info(&path)["format"], "qcow2");
    assert_same_content(&raw, ImageFormat::Raw, &path, ImageFormat::Qcow2);
    let vol = create_from_image(
        conn,
        &pool,
        "copy.img",
        &raw,
        ImageFormat::Raw,
        ImageFormat::Raw,
        Some(MIB),
    )
    .unwrap();
    let path = vol.path().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&raw).unwrap());
    assert_eq!(
        image_virtual_size(Path::new(&path), ImageFormat::Raw).unwrap(),
        16 * MIB
    );

    // An existing name is refused and the existing volume kept.
    let err = create_from_image(
        conn,
        &pool,
        "copy.img",
        &raw,
        ImageFormat::Raw,
        ImageFormat::Raw,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, StorageError::VolumeExists { .. }), "{err}");
    assert!(Path::new(&path).exists());

    for name in [
        "blank.qcow2",
        "grown.qcow2",
        "vm_vdb.img",
        "fromraw.qcow2",
        "copy.img",
    ] {
        delete_volume(&pool, name).unwrap();
        delete_volume(&pool, name).unwrap();
    }
    assert!(pool.volume_names().unwrap().is_empty());
    // No converted temporaries left behind by this process.
    let prefix = format!("nomad-virt-convert-{}-", std::process::id());
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn parent_overlay_and_prune() {
    if !common::host_ready(&[
        common::Need::Root,
        common::Need::Libvirtd,
        common::Need::Tool {
            program: "qemu-img",
            package: "qemu-utils",
        },
    ]) {
        return;
    }
    let (guard, pool) = PoolGuard::transient();
    let conn = &guard.conn;
    let (_raw, qcow2) = source_images(guard.dir.path());

    // Three starts at once share one upload.
    let parents: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| {
                    let conn = system();
                    let pool = lookup_pool(&conn, &guard.name).unwrap().unwrap();
                    ensure_parent(&conn, &pool, &qcow2, ImageFormat::Qcow2)
                        .unwrap()
                        .name()
                        .to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(parents.iter().all(|p| *p == parents[0]), "{parents:?}");
    let parent_name = parents[0].clone();
    assert!(parent_name.starts_with("nomad-virt-base-qcow2-"));
    refresh_pool(&pool).unwrap();
    assert_eq!(pool.volume_names().unwrap(), vec![parent_name.clone()]);
    let parent = ensure_parent(conn, &pool, &qcow2, ImageFormat::Qcow2).unwrap();
    let parent_path = parent.path().unwrap();
    assert_same_content(&qcow2, ImageFormat::Qcow2, &parent_path, ImageFormat::Qcow2);

    let overlay = create_overlay(
        &pool,
        "vm_vda.qcow2",
        &parent,
        ImageFormat::Qcow2,
        Some(64 * MIB),
    )
    .unwrap();
    let info = qemu_img_info(&overlay.path().unwrap());
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 64 * MIB, "{info}");
    assert_eq!(
        info["backing-filename"],
        parent_path.to_str().unwrap(),
        "{info}"
    );
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");

    // In use: never pruned, however idle.
    assert!(prune_unused_parents(conn, &pool, Duration::ZERO)
        .unwrap()
        .is_empty());
    delete_volume(&pool, "vm_vda.qcow2").unwrap();
    // Unused but recently used: kept.
    assert!(prune_unused_parents(conn, &pool, Duration::from_secs(3600))
        .unwrap()
        .is_empty());
    // A stale `.partial-` leftover of a crashed upload goes too.
    let stale = format!("{parent_name}{STAGING_MARK}0-0-0");
    create_empty(&pool, &stale, ImageFormat::Qcow2, MIB).unwrap();
    let mut pruned = prune_unused_parents(conn, &pool, Duration::ZERO).unwrap();
    pruned.sort();
    assert_eq!(pruned, vec![parent_name, stale]);
    assert!(pool.volume_names().unwrap().is_empty());
}

#[test]
fn parent_published_by_another_process_is_used() {
    if !common::host_ready(&[
        common::Need::Root,
        common::Need::Libvirtd,
        common::Need::Tool {
            program: "qemu-img",
            package: "qemu-utils",
        },
    ]) {
        return;
    }
    let (guard, pool) = PoolGuard::transient();
    let conn = &guard.conn;
    let (_raw, qcow2) = source_images(guard.dir.path());
    let name = parent_volume_name(ImageFormat::Qcow2, &image_cache_key(&qcow2).unwrap());
    // Another process finished first; this pool has not seen it yet.
    let final_path = guard.dir.path().join("pool").join(&name);
    std::fs::copy(&qcow2, &final_path).unwrap();
    let parent = ensure_parent(conn, &pool, &qcow2, ImageFormat::Qcow2).unwrap();
    assert_eq!(parent.name(), name);
    assert_eq!(parent.path().unwrap(), final_path);
    assert_eq!(pool.volume_names().unwrap(), vec![name]);
}

#[test]
fn seed_bytes_round_trip() {
    if !common::host_ready(&[
        common::Need::Root,
        common::Need::Libvirtd,
        common::Need::Tool {
            program: "qemu-img",
            package: "qemu-utils",
        },
    ]) {
        return;
    }
    let (guard, pool) = PoolGuard::transient();
    let bytes: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
    let name = seed_volume_name("vm");
    let vol = upload_bytes(&guard.conn, &pool, &name, &bytes, ImageFormat::Raw).unwrap();
    assert_eq!(std::fs::read(vol.path().unwrap()).unwrap(), bytes);
    assert_eq!(vol.capacity().unwrap(), bytes.len() as u64);
    let mode = std::fs::metadata(vol.path().unwrap()).unwrap().mode();
    assert_eq!(mode & 0o777, 0o600);
    delete_volume(&pool, &name).unwrap();
    delete_volume(&pool, &name).unwrap();
}

#[test]
fn persistent_pool_lifecycle() {
    if !common::host_ready(&[
        common::Need::Root,
        common::Need::Libvirtd,
        common::Need::Tool {
            program: "qemu-img",
            package: "qemu-utils",
        },
    ]) {
        return;
    }
    let guard = PoolGuard::persistent();
    let conn = &guard.conn;
    let path = guard.dir.path().join("a/b/pool");
    ensure_directory_pool(conn, &guard.name, &path).unwrap();
    let pool = conn.lookup_storage_pool_by_name(&guard.name).unwrap();
    assert!(path.is_dir(), "build created the directory");
    assert!(pool.is_active().unwrap() && pool.is_persistent().unwrap());
    assert!(pool.autostart().unwrap());
    ensure_directory_pool(conn, &guard.name, &path).unwrap();
    let err = ensure_directory_pool(conn, &guard.name, guard.dir.path()).unwrap_err();
    assert!(
        matches!(err, StorageError::PoolPathMismatch { .. }),
        "{err}"
    );
    let fingerprint = pool_fingerprint(conn).unwrap();
    assert!(fingerprint.contains(&(guard.name.clone(), true, "dir".into())));

    // Stopped, and its directory removed: built and started again.
    pool.destroy().unwrap();
    std::fs::remove_dir(&path).unwrap();
    ensure_directory_pool(conn, &guard.name, &path).unwrap();
    assert!(pool.is_active().unwrap() && path.is_dir());

    // Directory removed under an active pool: recovered too.
    std::fs::remove_dir(&path).unwrap();
    ensure_directory_pool(conn, &guard.name, &path).unwrap();
    assert!(pool.is_active().unwrap() && path.is_dir());
}

#[test]
fn pool_that_cannot_be_built_is_not_left_defined() {
    if !common::host_ready(&[
        common::Need::Root,
        common::Need::Libvirtd,
        common::Need::Tool {
            program: "qemu-img",
            package: "qemu-utils",
        },
    ]) {
        return;
    }
    let guard = PoolGuard::persistent();
    let file = guard.dir.path().join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let err = ensure_directory_pool(&guard.conn, &guard.name, &file.join("pool")).unwrap_err();
    assert!(matches!(err, StorageError::Pool { .. }), "{err}");
    assert!(err.to_string().contains("building the pool"), "{err}");
    let lookup = guard.conn.lookup_storage_pool_by_name(&guard.name);
    assert!(lookup.is_err(), "the failed pool was left defined");
}

#[test]
fn qemu_img_qcow2_is_detected_and_backing_files_refused() {
    if !common::host_ready(&[
        common::Need::Root,
        common::Need::Libvirtd,
        common::Need::Tool {
            program: "qemu-img",
            package: "qemu-utils",
        },
    ]) {
        return;
    }
    use nomad_driver_virt::storage::{check_image_safe, qcow2_virtual_size};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("real.qcow2");
    run(
        "qemu-img",
        &[&"create", &"-q", &"-f", &"qcow2", &path, &"16M"],
    );
    assert_eq!(detect_format(&path).unwrap(), ImageFormat::Qcow2);
    assert_eq!(qcow2_virtual_size(&path).unwrap(), Some(16 << 20));
    check_image_safe(&path, ImageFormat::Qcow2).unwrap();

    let overlay = dir.path().join("overlay.qcow2");
    run(
        "qemu-img",
        &[
            &"create", &"-q", &"-f", &"qcow2", &"-F", &"qcow2", &"-b", &path, &overlay,
        ],
    );
    let err = check_image_safe(&overlay, ImageFormat::Qcow2).unwrap_err();
    assert!(err.to_string().contains("backing file"), "{err}");
}

fn file_digest(path: &Path) -> (Vec<u8>, i64, i64) {
    let meta = std::fs::metadata(path).unwrap();
    (
        std::fs::read(path).unwrap(),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

/// Issues 9.7 and 11.1: a job's `source.volume` is cloned into a new
/// volume (resized, format honoured) or overlaid (chained); the source's
/// bytes and mtime never change. Driver-owned names, backing-file qcow2
/// and unknown volumes are refused before anything is created.
#[test]
fn source_volumes_are_cloned_never_written() {
    if !common::host_ready(&[
        common::Need::Root,
        common::Need::Libvirtd,
        common::Need::Tool {
            program: "qemu-img",
            package: "qemu-utils",
        },
    ]) {
        return;
    }
    let (guard, pool) = PoolGuard::transient();
    let pool_dir = guard.dir.path().join("pool");
    let (raw, qcow2) = source_images(guard.dir.path());
    std::fs::copy(&raw, pool_dir.join("base.img")).unwrap();
    std::fs::copy(&qcow2, pool_dir.join("base.qcow2")).unwrap();
    refresh_pool(&pool).unwrap();
    let before_raw = file_digest(&pool_dir.join("base.img"));
    let before_qcow2 = file_digest(&pool_dir.join("base.qcow2"));

    let source = source_volume(&pool, "base.img").unwrap();
    assert_eq!(source.format, ImageFormat::Raw);
    assert_eq!(source.capacity, 16 * MIB);
    // raw -> qcow2, grown to 32 MiB.
    let clone = clone_volume(
        &pool,
        "vm_vda.qcow2",
        &source,
        ImageFormat::Qcow2,
        Some(32 * MIB),
        true,
    )
    .unwrap();
    let info = qemu_img_info(&clone.path().unwrap());
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 32 * MIB, "{info}");
    assert!(info.get("backing-filename").is_none(), "{info}");
    // The first 16 MiB are the source's bytes.
    let head = guard.dir.path().join("head.img");
    run(
        "qemu-img",
        &[
            &"convert",
            &"-U",
            &"-O",
            &"raw",
            &clone.path().unwrap(),
            &head,
        ],
    );
    let head_bytes = std::fs::read(&head).unwrap();
    assert_eq!(
        &head_bytes[..16 * MIB as usize],
        &std::fs::read(&raw).unwrap()[..]
    );

    // qcow2 -> raw, not sparse: the whole file is allocated.
    let source = source_volume(&pool, "base.qcow2").unwrap();
    assert_eq!(source.format, ImageFormat::Qcow2);
    let clone = clone_volume(
        &pool,
        "vm_vdb.img",
        &source,
        ImageFormat::Raw,
        Some(24 * MIB),
        false,
    )
    .unwrap();
    let path = clone.path().unwrap();
    assert_eq!(qemu_img_info(&path)["format"], "raw");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 24 * MIB);
    assert!(
        meta.blocks() * 512 >= 24 * MIB,
        "sparse = false allocates the file: {} blocks",
        meta.blocks()
    );
    // A sparse raw clone is not fully allocated.
    let sparse = clone_volume(
        &pool,
        "vm_vdc.img",
        &source,
        ImageFormat::Raw,
        Some(64 * MIB),
        true,
    )
    .unwrap();
    let meta = std::fs::metadata(sparse.path().unwrap()).unwrap();
    assert!(meta.blocks() * 512 < 32 * MIB, "{} blocks", meta.blocks());

    // chained: a qcow2 overlay whose backing file is the source.
    let overlay = create_overlay(
        &pool,
        "vm_vdd.qcow2",
        &source.volume,
        source.format,
        Some(20 * MIB),
    )
    .unwrap();
    let info = qemu_img_info(&overlay.path().unwrap());
    assert_eq!(
        info["backing-filename"],
        pool_dir.join("base.qcow2").to_string_lossy().as_ref(),
        "{info}"
    );
    assert_eq!(info["virtual-size"], 20 * MIB, "{info}");

    assert_eq!(file_digest(&pool_dir.join("base.img")), before_raw);
    assert_eq!(file_digest(&pool_dir.join("base.qcow2")), before_qcow2);

    // Refused: another task's disk, a seed, a shared parent, the overlay
    // just made (it has a backing file), an unknown volume.
    for name in [
        "vm_vda.qcow2",
        "vm_cidata.iso",
        "nomad-virt-base-raw-00ff.img",
    ] {
        let err = source_volume(&pool, name).unwrap_err();
        assert!(
            matches!(err, StorageError::DriverOwnedVolume { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains("name another volume"), "{err}");
    }
    std::fs::copy(overlay.path().unwrap(), pool_dir.join("chain.qcow2")).unwrap();
    let err = source_volume(&pool, "chain.qcow2").unwrap_err();
    assert!(
        matches!(err, StorageError::UnsafeSourceVolume { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("backing file"), "{err}");
    let err = source_volume(&pool, "missing.img").unwrap_err();
    assert!(matches!(err, StorageError::VolumeNotFound { .. }), "{err}");
}

/// Issue 11.2: an image is written onto a Nomad volume's device as raw
/// bytes; an image larger than the device is refused before any write.
/// (A regular file stands in for the block device; the e2e test uses a
/// loop device.)
#[test]
fn an_image_is_written_onto_a_volume_device() {
    if !common::host_ready(&[common::Need::Tool {
        program: "qemu-img",
        package: "qemu-utils",
    }]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, qcow2) = source_images(dir.path());
    let device = dir.path().join("device");
    std::fs::write(&device, vec![0x11u8; 20 * MIB as usize]).unwrap();
    write_image_to_device(&qcow2, ImageFormat::Qcow2, &device).unwrap();
    let written = std::fs::read(&device).unwrap();
    let source = std::fs::read(&raw).unwrap();
    assert_eq!(&written[..source.len()], &source[..]);
    assert!(
        written[source.len()..].iter().all(|&b| b == 0x11),
        "bytes past the image are left alone"
    );
    let small = dir.path().join("small-device");
    std::fs::write(&small, vec![0x22u8; MIB as usize]).unwrap();
    let err = write_image_to_device(&raw, ImageFormat::Raw, &small).unwrap_err();
    assert!(matches!(err, StorageError::UnsafeImage { .. }), "{err}");
    assert!(err.to_string().contains("exceeds"), "{err}");
    assert!(std::fs::read(&small).unwrap().iter().all(|&b| b == 0x22));
}
