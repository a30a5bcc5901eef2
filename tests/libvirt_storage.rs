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
    clone_volume, create_empty, create_from_image, create_from_image_with, create_overlay,
    delete_volume, ensure_directory_pool, ensure_parent, lookup_pool, pool_fingerprint,
    prune_unused_parents, refresh_pool, source_volume, upload_bytes, Pool,
};
use nomad_driver_virt::storage::copy::{copy_into, CopyMethod, CopyProgress};
use nomad_driver_virt::storage::parent_key::key_of;
use nomad_driver_virt::storage::qemu_img::write_to_device;
use nomad_driver_virt::storage::volume::{
    parent_volume_name, seed_volume_name, unique_suffix, STAGING_MARK,
};
use nomad_driver_virt::storage::{
    detect_format, image_virtual_size, ImageFile, ImageFormat, StorageError,
};
use virt::connect::Connect;

const MIB: u64 = 1 << 20;

fn directory_pool_xml(name: &str, path: &Path) -> String {
    format!(
        "<pool type='dir'><name>{name}</name><target><path>{}</path></target></pool>",
        path.display()
    )
}

const URI: &str = "qemu:///system";

/// A test image the test made itself, opened as the driver would hold it.
fn open(path: &Path) -> ImageFile {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ImageFile::from_file(file, path.display().to_string())
}

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
        &open(&blank),
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
        &open(&small),
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
        &open(&qcow2),
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
        &open(&qcow2),
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
    assert_eq!(
        detect_format(&open(Path::new(&path))).unwrap(),
        ImageFormat::Raw
    );

    // raw → qcow2, and raw → raw at the image's own size.
    let vol = create_from_image(
        conn,
        &pool,
        "fromraw.qcow2",
        &open(&raw),
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
        &open(&raw),
        ImageFormat::Raw,
        ImageFormat::Raw,
        Some(MIB),
    )
    .unwrap();
    let path = vol.path().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&raw).unwrap());
    assert_eq!(
        image_virtual_size(&open(Path::new(&path)), ImageFormat::Raw).unwrap(),
        16 * MIB
    );

    // An existing name is refused and the existing volume kept.
    let err = create_from_image(
        conn,
        &pool,
        "copy.img",
        &open(&raw),
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
                    ensure_parent(&conn, &pool, &open(&qcow2), ImageFormat::Qcow2)
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
    let parent = ensure_parent(conn, &pool, &open(&qcow2), ImageFormat::Qcow2).unwrap();
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
    let name = parent_volume_name(ImageFormat::Qcow2, &key_of(&std::fs::read(&qcow2).unwrap()));
    // Another process finished first; this pool has not seen it yet.
    let final_path = guard.dir.path().join("pool").join(&name);
    std::fs::copy(&qcow2, &final_path).unwrap();
    let parent = ensure_parent(conn, &pool, &open(&qcow2), ImageFormat::Qcow2).unwrap();
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
    assert_eq!(detect_format(&open(&path)).unwrap(), ImageFormat::Qcow2);
    assert_eq!(qcow2_virtual_size(&open(&path)).unwrap(), Some(16 << 20));
    check_image_safe(&open(&path), ImageFormat::Qcow2).unwrap();

    let overlay = dir.path().join("overlay.qcow2");
    run(
        "qemu-img",
        &[
            &"create", &"-q", &"-f", &"qcow2", &"-F", &"qcow2", &"-b", &path, &overlay,
        ],
    );
    let err = check_image_safe(&open(&overlay), ImageFormat::Qcow2).unwrap_err();
    assert!(err.to_string().contains("backing file"), "{err}");
}

fn storage_host_ready() -> bool {
    common::host_ready(&[
        common::Need::Root,
        common::Need::Libvirtd,
        common::Need::Tool {
            program: "qemu-img",
            package: "qemu-utils",
        },
        common::Need::Tool {
            program: "prlimit",
            package: "util-linux",
        },
    ])
}

/// A parent's name is the digest of the bytes uploaded: two different
/// images written at the same path (and with the same name, size and
/// mtime) get different parents, and the same bytes from another file
/// share one.
#[test]
fn parent_key_is_the_digest_of_the_bytes_uploaded() {
    if !storage_host_ready() {
        return;
    }
    let (guard, pool) = PoolGuard::transient();
    let conn = &guard.conn;
    let path = guard.dir.path().join("base.img");
    let first = vec![0x11u8; MIB as usize];
    let mut second = first.clone();
    second[MIB as usize / 2] = 0x22;
    std::fs::write(&path, &first).unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let a = ensure_parent(conn, &pool, &open(&path), ImageFormat::Raw).unwrap();
    assert_eq!(
        a.name(),
        parent_volume_name(ImageFormat::Raw, &key_of(&first))
    );
    assert_eq!(std::fs::read(a.path().unwrap()).unwrap(), first);
    // Reused while unchanged.
    let again = ensure_parent(conn, &pool, &open(&path), ImageFormat::Raw).unwrap();
    assert_eq!(again.name(), a.name());

    // Same path, same size, mtime put back: other bytes, another parent.
    std::fs::write(&path, &second).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let b = ensure_parent(conn, &pool, &open(&path), ImageFormat::Raw).unwrap();
    assert_ne!(b.name(), a.name());
    assert_eq!(
        b.name(),
        parent_volume_name(ImageFormat::Raw, &key_of(&second))
    );
    assert_eq!(std::fs::read(b.path().unwrap()).unwrap(), second);
    // The first parent still holds the first image's bytes.
    assert_eq!(std::fs::read(a.path().unwrap()).unwrap(), first);

    // The first bytes again, from another file: the first parent, shared.
    let copy = guard.dir.path().join("copy.img");
    std::fs::write(&copy, &first).unwrap();
    let c = ensure_parent(conn, &pool, &open(&copy), ImageFormat::Raw).unwrap();
    assert_eq!(c.name(), a.name());
    refresh_pool(&pool).unwrap();
    let mut names = pool.volume_names().unwrap();
    names.sort();
    let mut expected = vec![a.name().to_string(), b.name().to_string()];
    expected.sort();
    assert_eq!(names, expected, "no staging volume left behind");
    for name in expected {
        delete_volume(&pool, &name).unwrap();
    }
}

/// A sibling task swaps the image's path between a good image, a symlink
/// to a host secret and a hard link to it, in a tight loop, while the
/// driver opens the image and uploads it (a copy, a conversion through
/// qemu-img, a shared parent) hundreds of times: the secret's bytes never
/// reach a volume.
#[test]
fn swapping_the_image_never_uploads_the_secret() {
    use nomad_driver_virt::storage::open_image;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    if !storage_host_ready() {
        return;
    }
    let (guard, pool) = PoolGuard::transient();
    let conn = &guard.conn;
    let alloc = guard.dir.path().join("alloc");
    let task = guard.dir.path().join("web");
    let outside = guard.dir.path().join("outside");
    for dir in [&alloc, &task, &outside] {
        std::fs::create_dir(dir).unwrap();
    }
    const MARKER: &[u8] = b"ndvtest host secret ";
    let secret_bytes = MARKER.repeat(64);
    let secret = outside.join("secret");
    std::fs::write(&secret, &secret_bytes).unwrap();
    // Good images: raw, and the same as qcow2 for the conversion path.
    let good_raw = vec![0x5au8; 64 * 1024];
    let raw_master = outside.join("good.img");
    std::fs::write(&raw_master, &good_raw).unwrap();
    let qcow2_master = outside.join("good.qcow2");
    run(
        "qemu-img",
        &[
            &"convert",
            &"-f",
            &"raw",
            &"-O",
            &"qcow2",
            &raw_master,
            &qcow2_master,
        ],
    );
    let good_qcow2 = std::fs::read(&qcow2_master).unwrap();
    let contains_secret = |bytes: &[u8]| bytes.windows(MARKER.len()).any(|w| w == MARKER);

    for (round, (good, iterations)) in [(&good_raw, 300), (&good_qcow2, 40)]
        .into_iter()
        .enumerate()
    {
        let target = task.join("disk.img");
        std::fs::write(&target, good).unwrap();
        let stop = AtomicBool::new(false);
        // Swap cycles done; each open waits for a new one, so on a loaded
        // machine the swapper cannot be starved into one state.
        let swaps = AtomicU64::new(0);
        let (opened, refused) = std::thread::scope(|scope| {
            scope.spawn(|| {
                // Each state is held for a few microseconds (busy, no
                // sleep), so each is seen whatever the scheduler does.
                let hold = || {
                    swaps.fetch_add(1, Ordering::Relaxed);
                    let start = std::time::Instant::now();
                    while start.elapsed() < Duration::from_micros(30) {
                        std::hint::spin_loop();
                    }
                };
                let good_staged = task.join("staged-good");
                let bad_staged = task.join("staged-bad");
                let _ = std::fs::write(&good_staged, good);
                while !stop.load(Ordering::Relaxed) {
                    let _ = std::fs::rename(&good_staged, &target);
                    hold();
                    let _ = std::fs::write(&good_staged, good);
                    let _ = std::fs::remove_file(&bad_staged);
                    let _ = std::os::unix::fs::symlink(&secret, &bad_staged);
                    let _ = std::fs::rename(&bad_staged, &target);
                    hold();
                    let _ = std::fs::remove_file(&bad_staged);
                    let _ = std::fs::hard_link(&secret, &bad_staged);
                    let _ = std::fs::rename(&bad_staged, &target);
                    hold();
                }
            });
            let (mut opened, mut refused) = (0, 0);
            let mut last_swap = 0;
            // Stops the swapper even when an assertion below panics, so
            // the scope can join it and the test fails instead of hanging.
            let _stop = StopOnDrop(&stop);
            for i in 0..iterations {
                wait_for_swap(&swaps, &mut last_swap);
                let image = match open_image("disk.img", &[], &alloc, &task) {
                    Ok(image) => image,
                    Err(err) => {
                        refused += 1;
                        let message = err.to_string();
                        assert!(!message.contains(&*outside.to_string_lossy()), "{message}");
                        continue;
                    }
                };
                opened += 1;
                let format = detect_format(&image).unwrap();
                let name = format!("ndvtest-race-{round}-{i}.img");
                // Raw: a copy, and every third a shared parent. qcow2:
                // converted to raw by qemu-img from the descriptor.
                let vol = if round == 0 && i % 3 == 0 {
                    ensure_parent(conn, &pool, &image, format).unwrap()
                } else {
                    create_from_image(conn, &pool, &name, &image, format, ImageFormat::Raw, None)
                        .unwrap()
                };
                let uploaded = std::fs::read(vol.path().unwrap()).unwrap();
                assert!(!contains_secret(&uploaded), "the secret reached a volume");
                assert_eq!(&uploaded[..good_raw.len()], &good_raw[..], "{name}");
                delete_volume(&pool, vol.name()).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            (opened, refused)
        });
        assert!(
            opened > 0 && refused > 0,
            "round {round}: {opened} opened, {refused} refused"
        );
    }
    refresh_pool(&pool).unwrap();
    assert!(pool.volume_names().unwrap().is_empty());
}

/// Waits (bounded) until the swapper has swapped since `last`.
fn wait_for_swap(swaps: &std::sync::atomic::AtomicU64, last: &mut u64) {
    use std::sync::atomic::Ordering;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while swaps.load(Ordering::Relaxed) == *last && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
    *last = swaps.load(Ordering::Relaxed);
}

/// Sets the flag when dropped (also while unwinding).
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// qemu-img's complaint about a broken image names the image as the job
/// wrote it: not `/proc/self/fd/0`, not the host's temporary file.
#[test]
fn qemu_img_errors_name_only_what_the_job_wrote() {
    if !storage_host_ready() {
        return;
    }
    let (guard, pool) = PoolGuard::transient();
    let path = guard.dir.path().join("broken.qcow2");
    // A qcow2 header our checks accept (v3, no backing or data file) with
    // an impossible cluster size, which qemu-img rejects.
    let mut header = vec![0u8; 512];
    header[..4].copy_from_slice(b"QFI\xfb");
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    header[24..32].copy_from_slice(&MIB.to_be_bytes());
    header[100..104].copy_from_slice(&104u32.to_be_bytes());
    std::fs::write(&path, &header).unwrap();
    let image = ImageFile::from_file(std::fs::File::open(&path).unwrap(), "local/broken.qcow2");
    let err = create_from_image(
        &guard.conn,
        &pool,
        "ndvtest-broken.img",
        &image,
        ImageFormat::Qcow2,
        ImageFormat::Raw,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, StorageError::QemuImg { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("local/broken.qcow2"), "{message}");
    assert!(!message.contains("/proc/self/fd"), "{message}");
    assert!(
        !message.contains(&*std::env::temp_dir().to_string_lossy()),
        "{message}"
    );
    assert!(pool.volume_names().unwrap().is_empty());
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
    // Named `.img`: the format comes from the content, not the name.
    std::fs::copy(overlay.path().unwrap(), pool_dir.join("chain.img")).unwrap();
    // source_volume refreshes no pool: a file copied in is unknown until
    // the operator refreshes it.
    assert!(matches!(
        source_volume(&pool, "chain.img").unwrap_err(),
        StorageError::VolumeNotFound { .. }
    ));
    refresh_pool(&pool).unwrap();
    let err = source_volume(&pool, "chain.img").unwrap_err();
    assert!(
        matches!(err, StorageError::UnsafeSourceVolume { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("backing file"), "{err}");
    // A volume made raw whose bytes become a qcow2 header naming a host
    // file: either libvirt re-probes it (refused for the backing file) or
    // it stays raw and is cloned as raw bytes, never opened as qcow2.
    create_empty(&pool, "written.img", ImageFormat::Raw, MIB).unwrap();
    std::fs::copy(overlay.path().unwrap(), pool_dir.join("written.img")).unwrap();
    match source_volume(&pool, "written.img") {
        Ok(source) => {
            assert_eq!(source.format, ImageFormat::Raw);
            let copy =
                clone_volume(&pool, "vm_vde.img", &source, ImageFormat::Raw, None, true).unwrap();
            // A byte copy (libvirt copied raw, not qcow2's virtual disk).
            let written = std::fs::read(pool_dir.join("written.img")).unwrap();
            let copied = std::fs::read(copy.path().unwrap()).unwrap();
            assert!(copied.starts_with(&written), "the clone is the raw bytes");
            delete_volume(&pool, "vm_vde.img").unwrap();
        }
        Err(err) => assert!(err.to_string().contains("backing file"), "{err}"),
    }
    // A link in the pool directory to a host file is no source.
    std::fs::write(guard.dir.path().join("host-file"), b"host secret").unwrap();
    std::os::unix::fs::symlink(
        guard.dir.path().join("host-file"),
        pool_dir.join("linked.img"),
    )
    .unwrap();
    refresh_pool(&pool).unwrap();
    match source_volume(&pool, "linked.img") {
        Err(err) => assert!(err.to_string().contains("not a regular file"), "{err}"),
        Ok(source) => panic!("a link was accepted: {source:?}"),
    }
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
    write_to_device(&open(&qcow2), ImageFormat::Qcow2, &device).unwrap();
    let written = std::fs::read(&device).unwrap();
    let source = std::fs::read(&raw).unwrap();
    assert_eq!(&written[..source.len()], &source[..]);
    assert!(
        written[source.len()..].iter().all(|&b| b == 0x11),
        "bytes past the image are left alone"
    );
    let small = dir.path().join("small-device");
    std::fs::write(&small, vec![0x22u8; MIB as usize]).unwrap();
    let err = write_to_device(&open(&raw), ImageFormat::Raw, &small).unwrap_err();
    assert!(matches!(err, StorageError::UnsafeImage { .. }), "{err}");
    assert!(err.to_string().contains("exceeds"), "{err}");
    assert!(std::fs::read(&small).unwrap().iter().all(|&b| b == 0x22));
}

/// A raw image of `size` bytes with data in 1 MiB runs at `data_at` (MiB
/// offsets), holes elsewhere.
fn sparse_image(path: &Path, size: u64, data_at: &[u64]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    for (index, at) in data_at.iter().enumerate() {
        let byte = 1 + (index % 250) as u8;
        file.write_all_at(&vec![byte; MIB as usize], at * MIB)
            .unwrap();
    }
    file.sync_all().unwrap();
}

fn free_bytes(path: &Path) -> u64 {
    let stat = rustix::fs::statvfs(path).expect("statvfs");
    stat.f_bfree * stat.f_frsize
}

/// Non-chained disks in a directory pool are filled on this host, not
/// streamed: byte-identical, holes kept, libvirt's file (mode 0600) kept,
/// grown to the size asked for, the bytes counted.
#[test]
fn copies_into_a_directory_pool_keep_holes_and_count_bytes() {
    if !storage_host_ready() {
        return;
    }
    let (guard, pool) = PoolGuard::transient();
    let conn = &guard.conn;
    let image = guard.dir.path().join("big.img");
    sparse_image(&image, 64 * MIB, &[0, 7, 8, 40, 63]);
    let progress = CopyProgress::new();
    let vol = create_from_image_with(
        conn,
        &pool,
        "vm_vda.img",
        &open(&image),
        ImageFormat::Raw,
        ImageFormat::Raw,
        (Some(96 * MIB), Some(64 * MIB)),
        true,
        Some(&progress),
    )
    .unwrap();
    assert_eq!(progress.get(), (64 * MIB, 64 * MIB));
    let path = vol.path().unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 96 * MIB);
    assert_eq!(meta.mode() & 0o7777, 0o600, "libvirt's mode is kept");
    assert!(
        meta.blocks() * 512 <= 10 * MIB,
        "{} bytes allocated for 5 MiB of data",
        meta.blocks() * 512
    );
    let copied = std::fs::read(&path).unwrap();
    let source = std::fs::read(&image).unwrap();
    assert!(copied[..source.len()] == source[..], "bytes differ");
    assert!(copied[source.len()..].iter().all(|&b| b == 0));
    assert_eq!(vol.capacity().unwrap(), 96 * MIB);

    // sparse = false: the same bytes, every block allocated.
    let vol = create_from_image_with(
        conn,
        &pool,
        "vm_vdc.img",
        &open(&image),
        ImageFormat::Raw,
        ImageFormat::Raw,
        (Some(80 * MIB), None),
        false,
        Some(&progress),
    )
    .unwrap();
    let path = vol.path().unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 80 * MIB);
    assert!(meta.blocks() * 512 >= 80 * MIB, "allocated in full");
    assert_eq!(meta.mode() & 0o7777, 0o600);
    let copied = std::fs::read(&path).unwrap();
    assert!(copied[..source.len()] == source[..], "bytes differ");

    // qcow2 to qcow2 is a byte copy too, grown by libvirt afterwards.
    let qcow2 = guard.dir.path().join("big.qcow2");
    run(
        "qemu-img",
        &[&"convert", &"-f", &"raw", &"-O", &"qcow2", &image, &qcow2],
    );
    let vol = create_from_image_with(
        conn,
        &pool,
        "vm_vdb.qcow2",
        &open(&qcow2),
        ImageFormat::Qcow2,
        ImageFormat::Qcow2,
        (Some(128 * MIB), None),
        true,
        Some(&progress),
    )
    .unwrap();
    let path = vol.path().unwrap();
    assert_eq!(qemu_img_info(&path)["virtual-size"], 128 * MIB);
    assert_same_content(&image, ImageFormat::Raw, &path, ImageFormat::Qcow2);
    run("qemu-img", &[&"check", &"-U", &path]);
    for name in ["vm_vda.img", "vm_vdb.qcow2", "vm_vdc.img"] {
        delete_volume(&pool, name).unwrap();
    }
}

/// An XFS file system with reflinks on a loop file in a temp dir,
/// unmounted (the loop device detaches with it) and removed on drop.
struct XfsMount {
    dir: tempfile::TempDir,
}

impl XfsMount {
    fn new() -> XfsMount {
        let dir = tempfile::Builder::new()
            .prefix("ndvtest-xfs-")
            .tempdir()
            .unwrap();
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(512 * MIB)
            .unwrap();
        run("mkfs.xfs", &[&"-q", &"-m", &"reflink=1", &image]);
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        run("mount", &[&"-o", &"loop", &image, &mount]);
        XfsMount { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.path()).status();
    }
}

/// On a filesystem with reflinks, a non-chained copy writes (next to)
/// nothing: the volume shares the image's extents, and is still a copy
/// (writing the volume leaves the image alone).
#[test]
fn copies_on_a_reflink_filesystem_share_extents() {
    if !storage_host_ready()
        || !common::host_ready(&[
            common::Need::Tool {
                program: "mkfs.xfs",
                package: "xfsprogs",
            },
            common::Need::Tool {
                program: "mount",
                package: "mount",
            },
        ])
    {
        return;
    }
    let xfs = XfsMount::new();
    let conn = system();
    let pool_dir = xfs.path().join("pool");
    std::fs::create_dir(&pool_dir).unwrap();
    let name = unique_name();
    conn.create_storage_pool_xml(&directory_pool_xml(&name, &pool_dir), 0)
        .expect("create a transient pool");
    let _pool_guard = PoolGuard {
        conn: system(),
        name: name.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let pool = lookup_pool(&conn, &name).unwrap().unwrap();
    let image = xfs.path().join("image.img");
    let data: Vec<u64> = (0..64).collect();
    sparse_image(&image, 128 * MIB, &data);

    let free_before = free_bytes(&xfs.path());
    let progress = CopyProgress::new();
    let vol = create_from_image_with(
        &conn,
        &pool,
        "vm_vda.img",
        &open(&image),
        ImageFormat::Raw,
        ImageFormat::Raw,
        (None, Some(128 * MIB)),
        true,
        Some(&progress),
    )
    .unwrap();
    let used = free_before.saturating_sub(free_bytes(&xfs.path()));
    assert!(
        used < 8 * MIB,
        "a reflink copy of 64 MiB of data used {used} bytes of the file system"
    );
    assert_eq!(progress.get(), (128 * MIB, 128 * MIB));
    let path = vol.path().unwrap();
    assert!(std::fs::read(&path).unwrap() == std::fs::read(&image).unwrap());
    // Copy on write: the volume changes, the image does not.
    {
        use std::os::unix::fs::FileExt;
        let disk = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        disk.write_all_at(&[0xee; 4096], 0).unwrap();
    }
    let source = std::fs::read(&image).unwrap();
    assert_eq!(source[0], 1, "writing the volume changed the image");
    delete_volume(&pool, "vm_vda.img").unwrap();

    // A shared parent is a reflink too, named by the digest of its bytes
    // (smaller: hashing is slow in debug builds).
    let small = xfs.path().join("small.img");
    sparse_image(&small, 32 * MIB, &[0, 1, 2, 3, 8, 9, 10, 11, 30, 31]);
    let free_before = free_bytes(&xfs.path());
    let parent = ensure_parent(&conn, &pool, &open(&small), ImageFormat::Raw).unwrap();
    let used = free_before.saturating_sub(free_bytes(&xfs.path()));
    assert!(
        used < 4 * MIB,
        "a reflinked parent of 10 MiB of data used {used} bytes"
    );
    let bytes = std::fs::read(&small).unwrap();
    assert_eq!(
        parent.name(),
        parent_volume_name(ImageFormat::Raw, &key_of(&bytes))
    );
    delete_volume(&pool, parent.name()).unwrap();

    // The method chosen here is the reflink (copy_file_range would share
    // extents on XFS too; this tells them apart).
    let dest = std::fs::File::create(xfs.path().join("clone.img")).unwrap();
    let source = std::fs::File::open(&image).unwrap();
    assert_eq!(
        copy_into(&source, &dest, 128 * MIB, None).unwrap(),
        CopyMethod::Reflink
    );
    // Across file systems (the temp dir's): a sparse copy, same bytes.
    let other = tempfile::Builder::new()
        .prefix("ndvtest")
        .tempdir()
        .unwrap();
    let dest = std::fs::File::create(other.path().join("copy.img")).unwrap();
    assert_eq!(
        copy_into(&source, &dest, 128 * MIB, None).unwrap(),
        CopyMethod::Sparse
    );
    assert!(
        std::fs::read(other.path().join("copy.img")).unwrap() == std::fs::read(&image).unwrap()
    );
}
