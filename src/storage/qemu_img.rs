//! `qemu-img` on images a job supplied, confined: the image is handed over
//! as the child's stdin and named `/proc/self/fd/0` (so the child opens
//! exactly the file the driver opened, never a path a job could swap), and
//! the child runs under `prlimit` with a cap on address space and CPU time
//! (so a crafted image cannot make it eat the host's memory or a core).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::images::ImageFile;
use super::volume::{unique_suffix, TempFile};
use super::{ImageFormat, StorageError};

/// Address-space cap for qemu-img: ample for converting (it streams in
/// small buffers; threads reserve arenas), far below a host's memory.
pub const MEMORY_LIMIT_BYTES: u64 = 2 << 30;
/// CPU-time cap for qemu-img, in seconds: converting tens of GiB takes
/// well under this; a decompression bomb or loop is stopped.
pub const CPU_LIMIT_SECONDS: u64 = 1200;

/// The path the child opens the image by: its own stdin.
const STDIN_IMAGE: &str = "/proc/self/fd/0";

/// `prlimit --as=.. --cpu=.. -- qemu-img <action>`, with `image` as stdin.
fn limited(image: &ImageFile, action: &'static str) -> Result<Command, StorageError> {
    let mut command = limited_program(image, "qemu-img")?;
    command.arg(action);
    Ok(command)
}

/// `prlimit --as=.. --cpu=.. -- <program>`, with `image` as stdin. prlimit
/// (util-linux) sets the limits and execs the program, keeping fd 0: no
/// `pre_exec` hook (which would need unsafe code) is needed.
fn limited_program(image: &ImageFile, program: &str) -> Result<Command, StorageError> {
    let stdin = image
        .file()
        .try_clone()
        .map_err(|error| image.io("hand over to qemu-img the image", error))?;
    let mut command = Command::new("prlimit");
    command
        .arg(format!("--as={MEMORY_LIMIT_BYTES}"))
        .arg(format!("--cpu={CPU_LIMIT_SECONDS}"))
        .args(["--", program])
        .stdin(Stdio::from(stdin));
    Ok(command)
}

/// A private copy of a qcow2 `image`, checked ([`super::check_image_safe`]):
/// what qemu-img then opens is exactly what was checked.
fn checked_private_copy(image: &ImageFile) -> Result<ImageFile, StorageError> {
    let private = image.private_copy()?;
    super::check_image_safe(&private, ImageFormat::Qcow2)?;
    Ok(private)
}

/// What qemu-img must open instead of `image`: a checked private copy when
/// the format is qcow2 (whose header qemu-img reads again and follows), none
/// for raw (read as plain bytes).
fn private_copy_if_qcow2(
    image: &ImageFile,
    format: ImageFormat,
) -> Result<Option<ImageFile>, StorageError> {
    match format {
        ImageFormat::Qcow2 => checked_private_copy(image).map(Some),
        ImageFormat::Raw => Ok(None),
    }
}

/// Converts `image` (in `from`) to `to` with qemu-img into a new 0600
/// temporary file in `std::env::temp_dir()`, removed on drop.
pub fn convert(
    image: &ImageFile,
    from: ImageFormat,
    to: ImageFormat,
) -> Result<TempFile, StorageError> {
    let private = private_copy_if_qcow2(image, from)?;
    let image = private.as_ref().unwrap_or(image);
    let path = std::env::temp_dir().join(format!(
        "nomad-virt-convert-{}.{}",
        unique_suffix(),
        to.extension()
    ));
    // Created 0600 first: qemu-img keeps the mode of an existing file, so
    // the guest data is never readable by others.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|error| StorageError::Io {
            action: "create temporary file",
            path: path.clone(),
            error,
        })?;
    let temp = TempFile { path };
    let output = limited(image, "convert")?
        .args(["-q", "-f", from.as_str(), "-O", to.as_str(), STDIN_IMAGE])
        .arg(&temp.path)
        .output()
        .map_err(|error| StorageError::QemuImgSpawn {
            action: "convert",
            path: image.shown_path(),
            error,
        })?;
    if !output.status.success() {
        return Err(StorageError::QemuImg {
            action: "convert",
            path: image.shown_path(),
            status: output.status.to_string(),
            // Only the job's name for the image, never the host's paths.
            stderr: String::from_utf8_lossy(&output.stderr)
                .trim()
                .replace(&*temp.path.to_string_lossy(), "<converted image>")
                .replace(STDIN_IMAGE, image.shown()),
        });
    }
    Ok(temp)
}

/// Writes `image` (in `format`) onto the block device `device` (a Nomad
/// volume) as raw bytes from offset 0, confined like [`convert`]. Refused
/// before any write: unsafe images ([`super::check_image_safe`]) and images
/// whose virtual size exceeds the device.
pub fn write_to_device(
    image: &ImageFile,
    format: ImageFormat,
    device: &Path,
) -> Result<(), StorageError> {
    use std::io::{Seek, SeekFrom};
    let private = private_copy_if_qcow2(image, format)?;
    let image = private.as_ref().unwrap_or(image);
    let virtual_size = super::image_virtual_size(image, format)?;
    let device_size = std::fs::File::open(device)
        .and_then(|mut file| file.seek(SeekFrom::End(0)))
        .map_err(|error| StorageError::Io {
            action: "read the size of block device",
            path: device.to_path_buf(),
            error,
        })?;
    if virtual_size > device_size {
        return Err(StorageError::UnsafeImage {
            path: image.shown_path(),
            reason: format!(
                "its virtual size ({virtual_size} bytes) exceeds the volume's block device \
                 ({device_size} bytes); request a larger volume (capacity_min)"
            ),
        });
    }
    // -n: write into the existing device instead of creating a file.
    let output = limited(image, "convert")?
        .args(["-q", "-n", "-f", format.as_str(), "-O", "raw", STDIN_IMAGE])
        .arg(device)
        .output()
        .map_err(|error| StorageError::QemuImgSpawn {
            action: "write",
            path: image.shown_path(),
            error,
        })?;
    if !output.status.success() {
        return Err(StorageError::QemuImg {
            action: "write",
            path: image.shown_path(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr)
                .trim()
                .replace(STDIN_IMAGE, image.shown()),
        });
    }
    Ok(())
}

/// Where [`write_to_rbd`] writes: an RBD image reached through librbd
/// with a cephx key read from `key_file` (base64, 0600, removed by its owner).
#[derive(Debug)]
pub struct RbdTarget<'a> {
    pub ceph_pool: &'a str,
    pub image: &'a str,
    pub username: &'a str,
    /// Monitors as (host, port); port 0 lets librados pick the defaults.
    pub hosts: Vec<(&'a str, u16)>,
    pub key_file: &'a Path,
}

impl RbdTarget<'_> {
    /// qemu's `--target-image-opts` for the image. Every part is a checked
    /// Ceph name or monitor address (no ',' or '='), so nothing needs
    /// escaping; checked again here.
    fn image_opts(&self) -> Result<String, String> {
        let mut opts = format!(
            "driver=rbd,pool={},image={},user={},key-secret=sec0",
            self.ceph_pool, self.image, self.username
        );
        for (index, (host, port)) in self.hosts.iter().enumerate() {
            opts.push_str(&format!(
                ",server.{index}.host={host},server.{index}.port={port}"
            ));
        }
        let parts = [self.ceph_pool, self.image, self.username];
        if parts
            .iter()
            .chain(self.hosts.iter().map(|(host, _)| host))
            .any(|part| part.is_empty() || part.contains([',', '=', '@', '/', ' ']))
        {
            return Err(format!("unsafe RBD target {opts:?}"));
        }
        Ok(opts)
    }
}

/// Writes `image` (in `format`) into the existing, freshly created (all
/// zero) RBD image `target` as raw bytes, confined like [`convert`]:
/// qemu-img reads the descriptor the driver opened and writes through
/// librbd, skipping zero blocks (`--target-is-zero`), so the RBD image
/// stays sparse. The key reaches qemu-img in a file, never on its command
/// line. The image must fit: `capacity` is the RBD image's size.
pub fn write_to_rbd(
    image: &ImageFile,
    format: ImageFormat,
    target: &RbdTarget<'_>,
    capacity: u64,
) -> Result<(), StorageError> {
    let private = private_copy_if_qcow2(image, format)?;
    let image = private.as_ref().unwrap_or(image);
    let virtual_size = super::image_virtual_size(image, format)?;
    if virtual_size > capacity {
        return Err(StorageError::GrewAfterCheck {
            path: image.shown_path(),
            found: format!("its virtual size is {virtual_size} bytes, more"),
            cap: capacity,
        });
    }
    let opts = target
        .image_opts()
        .map_err(|reason| StorageError::UnsafeImage {
            path: image.shown_path(),
            reason,
        })?;
    let output = limited(image, "convert")?
        .args(["-q", "-n", "--target-is-zero", "-f", format.as_str()])
        .arg("--object")
        .arg(format!(
            "secret,id=sec0,format=base64,file={}",
            target.key_file.display()
        ))
        .args(["--target-image-opts", STDIN_IMAGE])
        .arg(&opts)
        .output()
        .map_err(|error| StorageError::QemuImgSpawn {
            action: "write to RBD",
            path: image.shown_path(),
            error,
        })?;
    if !output.status.success() {
        return Err(StorageError::QemuImg {
            action: "write to RBD",
            path: image.shown_path(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr)
                .trim()
                .replace(&*target.key_file.to_string_lossy(), "<key file>")
                .replace(STDIN_IMAGE, image.shown()),
        });
    }
    Ok(())
}

/// Copies RBD image `source` into the existing, freshly created (all zero)
/// RBD image `target` through librbd, skipping zero blocks. Both name the
/// same cluster and key file. Runs under the same limits as the rest.
pub fn copy_rbd_to_rbd(source: &RbdTarget<'_>, target: &RbdTarget<'_>) -> Result<(), StorageError> {
    let shown = PathBuf::from(format!("rbd:{}/{}", source.ceph_pool, source.image));
    let unsafe_target = |reason: String| StorageError::UnsafeImage {
        path: shown.clone(),
        reason,
    };
    let from = source.image_opts().map_err(unsafe_target)?;
    let to = target.image_opts().map_err(unsafe_target)?;
    let output = Command::new("prlimit")
        .arg(format!("--as={MEMORY_LIMIT_BYTES}"))
        .arg(format!("--cpu={CPU_LIMIT_SECONDS}"))
        .args(["--", "qemu-img", "convert", "-q", "-n", "--target-is-zero"])
        .arg("--object")
        .arg(format!(
            "secret,id=sec0,format=base64,file={}",
            target.key_file.display()
        ))
        .args(["--image-opts", &from, "--target-image-opts", &to])
        .stdin(Stdio::null())
        .output()
        .map_err(|error| StorageError::QemuImgSpawn {
            action: "copy RBD image",
            path: shown.clone(),
            error,
        })?;
    if !output.status.success() {
        return Err(StorageError::QemuImg {
            action: "copy RBD image",
            path: shown,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr)
                .trim()
                .replace(&*target.key_file.to_string_lossy(), "<key file>"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn the_child_gets_the_descriptor_and_the_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x");
        std::fs::write(&path, b"image bytes").expect("write");
        let image = ImageFile::from_file(File::open(&path).expect("open"), "x");
        // The path is gone: only the descriptor can still reach the bytes.
        std::fs::remove_file(&path).expect("remove");
        let output = limited_program(&image, "sh")
            .expect("command")
            .args(["-c", &format!("cat /proc/self/limits; cat {STDIN_IMAGE}")])
            .output()
            .expect("run prlimit (util-linux)");
        assert!(output.status.success(), "{output:?}");
        let out = String::from_utf8_lossy(&output.stdout);
        let limit = |name: &str| {
            out.lines()
                .find(|line| line.starts_with(name))
                .and_then(|line| line[name.len()..].split_whitespace().next())
                .map(str::to_string)
        };
        assert_eq!(
            limit("Max cpu time"),
            Some(CPU_LIMIT_SECONDS.to_string()),
            "{out}"
        );
        assert_eq!(
            limit("Max address space"),
            Some(MEMORY_LIMIT_BYTES.to_string()),
            "{out}"
        );
        assert!(out.ends_with("image bytes"), "{out}");
        let command = limited(&image, "convert").expect("command");
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(args[2..], ["--", "qemu-img", "convert"]);
    }

    /// The checked qcow2 is the one qemu-img reads: a tenant who rewrites
    /// the original in place after the check (adding a backing file that
    /// names a host file) changes nothing in the conversion.
    #[test]
    fn qemu_img_reads_the_private_copy_that_was_checked() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let qemu_img = |args: &[&str]| {
            let output = Command::new("qemu-img")
                .args(args)
                .output()
                .expect("qemu-img");
            assert!(output.status.success(), "{args:?}: {output:?}");
        };
        let original = dir.path().join("job.qcow2");
        let attack = dir.path().join("attack.qcow2");
        let secret = dir.path().join("host-secret");
        std::fs::write(&secret, b"HOST-SECRET-BYTES").expect("secret");
        let original_arg = original.to_str().expect("utf-8");
        qemu_img(&["create", "-q", "-f", "qcow2", original_arg, "1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            secret.to_str().expect("utf-8"),
            attack.to_str().expect("utf-8"),
            "1M",
        ]);
        let image = ImageFile::from_file(File::open(&original).expect("open"), "job.qcow2");

        let private = checked_private_copy(&image).expect("a clean image passes");
        let meta = private.file().metadata().expect("stat");
        assert_eq!(meta.nlink(), 0, "the copy has no name");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        // The same inode now holds a header with a backing file.
        std::fs::write(&original, std::fs::read(&attack).expect("attack")).expect("rewrite");
        assert!(super::super::check_image_safe(&image, ImageFormat::Qcow2).is_err());
        let converted = convert(&private, ImageFormat::Qcow2, ImageFormat::Raw).expect("convert");
        let bytes = std::fs::read(&converted.path).expect("read");
        assert_eq!(bytes.len(), 1 << 20);
        assert!(
            bytes.iter().all(|byte| *byte == 0),
            "host bytes reached the disk"
        );
        // Converting the rewritten image itself checks what it reads.
        match convert(&image, ImageFormat::Qcow2, ImageFormat::Raw) {
            Ok(_) => panic!("a backing file must be refused"),
            Err(refused) => assert!(refused.to_string().contains("job.qcow2"), "{refused}"),
        }
    }

    #[test]
    fn rbd_target_options_refuse_separators() {
        let key = Path::new("/run/k");
        let target = RbdTarget {
            ceph_pool: "p",
            image: "v.img",
            username: "nomad",
            hosts: vec![("127.0.0.1", 6789), ("::1", 0)],
            key_file: key,
        };
        assert_eq!(
            target.image_opts().unwrap(),
            "driver=rbd,pool=p,image=v.img,user=nomad,key-secret=sec0,\
             server.0.host=127.0.0.1,server.0.port=6789,server.1.host=::1,server.1.port=0"
        );
        let bad = RbdTarget {
            image: "v,file=/etc/shadow",
            ..target
        };
        assert!(bad.image_opts().is_err());
    }
}
