//! `artifact` blocks for the local runner, placed into the task directory
//! as Nomad's client (go-getter) places them for the common cases:
//!
//! - sources: `http://` and `https://` URLs (HTTPS when built with the
//!   `https` feature), `file://` paths, and local paths (relative ones
//!   against the job file's directory); other getters (git, s3, gcs, hg) are
//!   refused with advice;
//! - `options { checksum = "sha256:..." }` (also md5, sha1, sha512, or a
//!   bare hex value recognised by its length, as go-getter does) and
//!   `options { archive = false }` (or a forced archive type); the same
//!   `checksum` and `archive` may come in the URL's query;
//! - `mode`: "any" unpacks a recognised archive into the destination
//!   directory and puts any other file there under its own name; "file"
//!   writes the file at the destination path; "dir" requires an archive (or
//!   a local directory);
//! - `destination` is relative to the task directory (default `local/`) and
//!   can never leave it.
//!
//! Downloads are bounded (Nomad's `http_max_size` default, 100GB, and a
//! per-read timeout), verified before anything is unpacked, and unpacked
//! with the checks in [`super::unpack`].

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use sha2::Digest;

use super::job::{self, ArtifactSpec};
use super::unpack::{self, ArchiveKind, UnpackError};

/// Largest download accepted (Nomad's client `http_max_size` default).
pub const MAX_DOWNLOAD_BYTES: u64 = 100_000_000_000;
/// How long a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may stay silent while sending.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an artifact cannot be placed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact source {0} is not supported by the local runner; fetch it yourself and use a local path")]
    Unsupported(String),
    #[error("artifact: {0}")]
    Invalid(String),
    #[error("artifact {path}: cannot read it")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("artifact {path}: has no file name")]
    NoFileName { path: PathBuf },
    #[error("artifact {path}: cannot copy it to {to}")]
    Copy {
        path: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("artifact {url}: cannot download it")]
    Download {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("artifact {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("artifact {url}: is larger than {MAX_DOWNLOAD_BYTES} bytes")]
    TooLarge { url: String },
    #[error("artifact {url}: cannot write the download to {to}")]
    Save {
        url: String,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("artifact {source_name}: checksum mismatch: expected {kind}:{expected}, got {kind}:{actual}")]
    Checksum {
        source_name: String,
        kind: &'static str,
        expected: String,
        actual: String,
    },
    #[error("artifact {source_name}: cannot unpack it into {to}")]
    Unpack {
        source_name: String,
        to: PathBuf,
        #[source]
        source: UnpackError,
    },
}

/// Where an artifact comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Local(PathBuf),
    /// An `http://` or `https://` URL, without the go-getter options.
    Http(String),
}

/// How the fetched thing is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Any,
    File,
    Dir,
}

/// Whether and how to unpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    /// By the source's file name suffix.
    Detect,
    /// `archive = false`.
    Never,
    /// `archive = "tar.gz"` etc.
    Forced(ArchiveKind),
}

/// A checksum to verify the fetched file (the archive, before unpacking).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub kind: &'static str,
    /// Lower-case hex.
    pub expected: String,
}

impl Checksum {
    /// go-getter's `type:hex`, or a bare hex value whose length tells the type.
    pub fn parse(text: &str) -> Result<Checksum, String> {
        let (kind, value) = match text.split_once(':') {
            Some((kind, value)) => (kind.to_ascii_lowercase(), value),
            None => {
                let kind = match text.len() {
                    32 => "md5",
                    40 => "sha1",
                    64 => "sha256",
                    128 => "sha512",
                    _ => return Err(format!("checksum {text:?} has no type and its length fits none; write it as \"sha256:<hex>\"")),
                };
                (kind.to_string(), text)
            }
        };
        let (kind, length) = match kind.as_str() {
            "md5" => ("md5", 32),
            "sha1" => ("sha1", 40),
            "sha256" => ("sha256", 64),
            "sha512" => ("sha512", 128),
            "file" => {
                return Err(
                    "checksum files (\"file:...\") are not supported by the local runner; give the value as \"sha256:<hex>\"".into(),
                )
            }
            other => {
                return Err(format!(
                    "checksum type {other:?} is not one of md5, sha1, sha256, sha512"
                ))
            }
        };
        if value.len() != length || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "checksum {text:?}: a {kind} checksum is {length} hex digits"
            ));
        }
        Ok(Checksum {
            kind,
            expected: value.to_ascii_lowercase(),
        })
    }

    fn hasher(&self) -> Hasher {
        match self.kind {
            "md5" => Hasher::Md5(md5::Md5::new()),
            "sha1" => Hasher::Sha1(sha1::Sha1::new()),
            "sha512" => Hasher::Sha512(sha2::Sha512::new()),
            _ => Hasher::Sha256(sha2::Sha256::new()),
        }
    }
}

enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Sha1(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    fn hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::Md5(h) => h.finalize().to_vec(),
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// An artifact with its strings interpolated and its paths resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalArtifact {
    pub source: Source,
    /// Relative to the task directory.
    pub destination: PathBuf,
    pub mode: Mode,
    pub archive: Archive,
    pub checksum: Option<Checksum>,
}

impl LocalArtifact {
    /// The source as written, for messages.
    pub fn source_name(&self) -> String {
        match &self.source {
            Source::Local(path) => path.display().to_string(),
            Source::Http(url) => url.clone(),
        }
    }
}

fn text(
    expression: Option<&hcl::Expression>,
    env: &BTreeMap<String, String>,
    field: &str,
) -> Result<Option<String>, ArtifactError> {
    let Some(expression) = expression else {
        return Ok(None);
    };
    let value = job::eval_with_env(expression, env)
        .map_err(|message| ArtifactError::Invalid(format!("{field}: {message}")))?;
    match value {
        hcl::Value::String(text) => Ok(Some(text)),
        hcl::Value::Bool(flag) => Ok(Some(flag.to_string())),
        other => Err(ArtifactError::Invalid(format!(
            "{field} must be a string, not {other}"
        ))),
    }
}

/// Splits go-getter's `checksum` and `archive` out of a URL's query.
fn split_url_options(url: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), Vec::new());
    };
    let mut kept = Vec::new();
    let mut options = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some((key, value)) if key == "checksum" || key == "archive" => {
                options.push((
                    key.to_string(),
                    value.replace("%3A", ":").replace("%3a", ":"),
                ));
            }
            _ => kept.push(pair),
        }
    }
    if kept.is_empty() {
        (base.to_string(), options)
    } else {
        (format!("{base}?{}", kept.join("&")), options)
    }
}

/// A destination relative to the task dir, refusing anything that leaves it.
pub fn task_relative(destination: &str, what: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(destination.trim_start_matches('/'));
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{what} {destination:?} leaves the task directory"));
    }
    Ok(path)
}

/// Resolves an artifact block: interpolates it with the task env, parses
/// its source and options, and keeps the destination inside the task dir.
pub fn resolve(
    spec: &ArtifactSpec,
    env: &BTreeMap<String, String>,
    job_dir: &Path,
) -> Result<LocalArtifact, ArtifactError> {
    let raw = text(spec.source.as_ref(), env, "source")?
        .filter(|source| !source.is_empty())
        .ok_or_else(|| ArtifactError::Invalid("source is required".into()))?;
    // go-getter's forced-getter prefix for HTTP is accepted as a no-op.
    let written = raw.strip_prefix("http::").unwrap_or(&raw);
    let mut options: Vec<(String, String)> = Vec::new();
    let source = if written.starts_with("http://") || written.starts_with("https://") {
        if written.starts_with("https://") && !cfg!(feature = "https") {
            return Err(ArtifactError::Invalid(format!(
                "source {written:?}: this nomad-driver-virt was built without HTTPS support (cargo feature \"https\"); use an http:// URL or a local file"
            )));
        }
        let (url, url_options) = split_url_options(written);
        options.extend(url_options);
        Source::Http(url)
    } else if let Some(path) = written.strip_prefix("file://") {
        Source::Local(PathBuf::from(path))
    } else if written.contains("::") || written.contains("://") || looks_remote(written) {
        return Err(ArtifactError::Unsupported(raw));
    } else {
        Source::Local(PathBuf::from(written))
    };
    let source = match source {
        Source::Local(path) if !path.is_absolute() => Source::Local(job_dir.join(path)),
        other => other,
    };
    for (key, expression) in &spec.options {
        let value = text(Some(expression), env, &format!("options.{key}"))?.unwrap_or_default();
        options.push((key.clone(), value));
    }
    let mut checksum = None;
    let mut archive = Archive::Detect;
    for (key, value) in options {
        match key.as_str() {
            "checksum" => {
                checksum = Some(Checksum::parse(&value).map_err(ArtifactError::Invalid)?);
            }
            "archive" => {
                archive = match value.as_str() {
                    "false" => Archive::Never,
                    "true" | "" => Archive::Detect,
                    name => Archive::Forced(ArchiveKind::from_name(name).ok_or_else(|| {
                        ArtifactError::Invalid(format!(
                            "options.archive {name:?} is not one the local runner unpacks (tar, tar.gz, tgz, zip, gz) nor false"
                        ))
                    })?),
                }
            }
            other => tracing::warn!(
                "artifact {}: option {other:?} is ignored by the local runner",
                raw
            ),
        }
    }
    let destination = text(spec.destination.as_ref(), env, "destination")?
        .unwrap_or_else(|| "local/".to_string());
    let destination = task_relative(&destination, "destination").map_err(ArtifactError::Invalid)?;
    let mode = match text(spec.mode.as_ref(), env, "mode")?.as_deref() {
        None | Some("any") => Mode::Any,
        Some("file") => Mode::File,
        Some("dir") => Mode::Dir,
        Some(other) => {
            return Err(ArtifactError::Invalid(format!(
                "mode {other:?} is not one of \"any\", \"file\", \"dir\""
            )))
        }
    };
    Ok(LocalArtifact {
        source,
        destination,
        mode,
        archive,
        checksum,
    })
}

/// go-getter's shorthand forms for remote sources (github.com/..., bucket urls).
fn looks_remote(source: &str) -> bool {
    let first = source.split('/').next().unwrap_or_default();
    first.contains('.') && !first.starts_with('.') && !Path::new(source).exists()
}

/// The last path segment of a URL, without query or fragment.
fn url_file_name(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let after_scheme = path.split_once("://").map_or(path, |(_, rest)| rest);
    let (_, path) = after_scheme.split_once('/')?;
    let name = path.rsplit('/').next()?;
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_string())
}

/// Places the artifact into `task_dir`; returns what was written.
pub fn place(artifact: &LocalArtifact, task_dir: &Path) -> Result<PathBuf, ArtifactError> {
    let destination = task_dir.join(&artifact.destination);
    // A local file is opened once here (never through a symlink, a regular
    // file) and copied from that descriptor; a directory is copied entry
    // by entry the same way.
    let mut local_file = None;
    let name = match &artifact.source {
        Source::Local(path) => {
            match crate::fsopen::open_local(path) {
                Ok(file) => local_file = Some(file),
                Err(crate::fsopen::OpenError::NotRegular("directory")) => {
                    copy_dir(path, &destination).map_err(|source| ArtifactError::Copy {
                        path: path.clone(),
                        to: destination.clone(),
                        source,
                    })?;
                    return Ok(destination);
                }
                Err(error) => {
                    return Err(ArtifactError::Read {
                        path: path.clone(),
                        source: error.into(),
                    })
                }
            }
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .ok_or_else(|| ArtifactError::NoFileName { path: path.clone() })?
        }
        Source::Http(url) => url_file_name(url).unwrap_or_else(|| "index.html".into()),
    };
    let kind = match (artifact.archive, artifact.mode) {
        (Archive::Never, _) => None,
        (Archive::Forced(kind), _) => Some(kind),
        (Archive::Detect, Mode::File) => None,
        (Archive::Detect, _) => ArchiveKind::detect(&name).map_err(|suffix| {
            ArtifactError::Invalid(format!(
                "{}: unpacking .{suffix} archives is not supported by the local runner; unpack it yourself, or set options {{ archive = false }} to keep it as is",
                artifact.source_name()
            ))
        })?,
    };
    if kind.is_none() && artifact.mode == Mode::Dir {
        return Err(ArtifactError::Invalid(format!(
            "{}: mode = \"dir\" needs an archive or a local directory",
            artifact.source_name()
        )));
    }
    let target = if artifact.mode == Mode::File {
        destination.clone()
    } else {
        destination.join(&name)
    };
    let parent = target.parent().unwrap_or(task_dir).to_path_buf();
    fs::create_dir_all(&parent).map_err(|source| ArtifactError::Copy {
        path: PathBuf::from(artifact.source_name()),
        to: parent.clone(),
        source,
    })?;
    // Fetched next to where it goes, verified, then moved or unpacked.
    let fetched = parent.join(format!(".{name}.artifact-{}", std::process::id()));
    let _ = fs::remove_file(&fetched);
    let result = fetch(artifact, local_file, &fetched).and_then(|()| match kind {
        None => fs::rename(&fetched, &target)
            .map(|()| target.clone())
            .map_err(|source| ArtifactError::Copy {
                path: fetched.clone(),
                to: target.clone(),
                source,
            }),
        Some(kind) => unpack::unpack(kind, &fetched, &destination, &name)
            .map(|()| destination.clone())
            .map_err(|source| ArtifactError::Unpack {
                source_name: artifact.source_name(),
                to: destination.clone(),
                source,
            }),
    });
    let _ = fs::remove_file(&fetched);
    result
}

/// Copies or downloads the source to `to` (a new file), checking the
/// checksum if one was given. `local` is the local source already opened.
fn fetch(
    artifact: &LocalArtifact,
    mut local: Option<fs::File>,
    to: &Path,
) -> Result<(), ArtifactError> {
    let mut output = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(|source| ArtifactError::Save {
            url: artifact.source_name(),
            to: to.to_path_buf(),
            source,
        })?;
    let mut hasher = artifact.checksum.as_ref().map(Checksum::hasher);
    match &artifact.source {
        Source::Local(path) => {
            let mut input = match local.take() {
                Some(file) => file,
                None => crate::fsopen::open_local(path).map_err(|error| ArtifactError::Read {
                    path: path.clone(),
                    source: error.into(),
                })?,
            };
            copy_hashing(&mut input, &mut output, hasher.as_mut(), u64::MAX).map_err(|source| {
                ArtifactError::Copy {
                    path: path.clone(),
                    to: to.to_path_buf(),
                    source,
                }
            })?;
        }
        Source::Http(url) => download(url, &mut output, hasher.as_mut(), to)?,
    }
    if let (Some(checksum), Some(hasher)) = (&artifact.checksum, hasher) {
        let actual = hasher.hex();
        if actual != checksum.expected {
            return Err(ArtifactError::Checksum {
                source_name: artifact.source_name(),
                kind: checksum.kind,
                expected: checksum.expected.clone(),
                actual,
            });
        }
    }
    Ok(())
}

fn download(
    url: &str,
    output: &mut fs::File,
    hasher: Option<&mut Hasher>,
    to: &Path,
) -> Result<(), ArtifactError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_per_read(Some(READ_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .map_err(|source| ArtifactError::Download {
            url: url.to_string(),
            source: Box::new(source),
        })?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(ArtifactError::Status {
            url: url.to_string(),
            status,
        });
    }
    let mut body = response.body_mut().as_reader();
    match copy_hashing(&mut body, output, hasher, MAX_DOWNLOAD_BYTES) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::FileTooLarge => Err(ArtifactError::TooLarge {
            url: url.to_string(),
        }),
        Err(source) => Err(ArtifactError::Save {
            url: url.to_string(),
            to: to.to_path_buf(),
            source,
        }),
    }
}

/// Copies at most `limit` bytes, feeding the hasher; more is an error.
fn copy_hashing(
    input: &mut dyn Read,
    output: &mut fs::File,
    mut hasher: Option<&mut Hasher>,
    limit: u64,
) -> io::Result<u64> {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        let read = match input.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        total += read as u64;
        if total > limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "the source is larger than the limit",
            ));
        }
        let chunk = &buffer[..read];
        if let Some(hasher) = hasher.as_deref_mut() {
            hasher.update(chunk);
        }
        output.write_all(chunk)?;
    }
    output.flush()?;
    Ok(total)
}

/// Copies a local directory tree. Symlinks in it are refused, not
/// followed, and each file is opened once without following links.
fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{:?} is a symbolic link; the local runner does not follow links in artifact directories",
                    entry.file_name()
                ),
            ));
        } else if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            let mut input = crate::fsopen::open_local(&entry.path())?;
            let mut output = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)?;
            io::copy(&mut input, &mut output)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> hcl::Expression {
        // Parsed like the job file's strings, so `${...}` is a template.
        hcl::Expression::from(hcl::edit::parser::parse_expr(&format!("{s:?}")).expect("expression"))
    }

    fn spec(source: &str, destination: Option<&str>, mode: Option<&str>) -> ArtifactSpec {
        ArtifactSpec {
            source: Some(string(source)),
            destination: destination.map(string),
            mode: mode.map(string),
            options: vec![],
            line: 1,
        }
    }

    #[test]
    fn other_getters_are_refused() {
        let env = BTreeMap::new();
        for source in [
            "git::https://github.com/x/y",
            "s3::https://bucket/x",
            "github.com/hashicorp/nomad",
        ] {
            let error = resolve(&spec(source, None, None), &env, Path::new("/")).expect_err(source);
            assert_eq!(
                error.to_string(),
                format!("artifact source {source} is not supported by the local runner; fetch it yourself and use a local path")
            );
        }
    }

    #[test]
    fn checksums_parse_like_go_getter() {
        let sha256 = "a".repeat(64);
        assert_eq!(
            Checksum::parse(&format!("sha256:{sha256}")).expect("typed"),
            Checksum {
                kind: "sha256",
                expected: sha256.clone()
            }
        );
        assert_eq!(Checksum::parse(&sha256).expect("bare").kind, "sha256");
        assert_eq!(Checksum::parse(&"b".repeat(32)).expect("bare").kind, "md5");
        assert!(Checksum::parse("sha256:abc").is_err());
        assert!(Checksum::parse("crc32:abcd").is_err());
        assert!(Checksum::parse("file:http://x/SHA256SUMS").is_err());
    }

    #[test]
    fn url_options_and_names() {
        let (url, options) =
            split_url_options("http://h/a.tgz?x=1&checksum=md5%3Aabc&archive=false");
        assert_eq!(url, "http://h/a.tgz?x=1");
        assert_eq!(
            options,
            [
                ("checksum".to_string(), "md5:abc".to_string()),
                ("archive".into(), "false".into())
            ]
        );
        assert_eq!(
            url_file_name("http://h/d/a.img?x=1").as_deref(),
            Some("a.img")
        );
        assert_eq!(url_file_name("http://h/"), None);
        assert_eq!(url_file_name("http://h"), None);
    }

    #[test]
    fn local_symlinks_are_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        fs::write(&secret, "host secret").expect("write");
        std::os::unix::fs::symlink(&secret, dir.path().join("page.html")).expect("symlink");
        let tree = dir.path().join("tree");
        fs::create_dir_all(&tree).expect("mkdir");
        std::os::unix::fs::symlink(&secret, tree.join("x")).expect("symlink");
        let task_dir = dir.path().join("task");
        let env = BTreeMap::new();
        let artifact =
            resolve(&spec("file://page.html", None, None), &env, dir.path()).expect("resolve");
        let err = place(&artifact, &task_dir).expect_err("a symlink source");
        let reason = std::error::Error::source(&err).map(ToString::to_string);
        assert!(matches!(err, ArtifactError::Read { .. }), "{err}");
        assert!(
            reason
                .as_deref()
                .is_some_and(|r| r.contains("symbolic link")),
            "{reason:?}"
        );
        let artifact =
            resolve(&spec("tree", Some("local/t"), None), &env, dir.path()).expect("resolve");
        let err = place(&artifact, &task_dir).expect_err("a symlink in a tree");
        assert!(matches!(err, ArtifactError::Copy { .. }), "{err}");
        assert!(!task_dir.join("local/t/x").exists());
    }

    #[test]
    fn local_files_and_dirs_are_copied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("page.html");
        fs::write(&source, "hi").expect("write");
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("sub")).expect("mkdir");
        fs::write(tree.join("sub/x"), "x").expect("write");
        let task_dir = dir.path().join("task");
        let env = BTreeMap::from([("NOMAD_TASK_NAME".to_string(), "web".to_string())]);

        let artifact = resolve(&spec("file://page.html", None, None), &env, dir.path());
        // file:// with a relative path resolves against the job dir too.
        let placed = place(&artifact.expect("resolve"), &task_dir).expect("place");
        assert_eq!(placed, task_dir.join("local/page.html"));

        let artifact = resolve(
            &spec(
                &source.display().to_string(),
                Some("local/${NOMAD_TASK_NAME}.html"),
                Some("file"),
            ),
            &env,
            dir.path(),
        )
        .expect("resolve");
        let placed = place(&artifact, &task_dir).expect("place");
        assert_eq!(placed, task_dir.join("local/web.html"));
        assert_eq!(fs::read_to_string(placed).expect("read"), "hi");

        let artifact =
            resolve(&spec("tree", Some("local/t"), None), &env, dir.path()).expect("resolve");
        place(&artifact, &task_dir).expect("place dir");
        assert!(task_dir.join("local/t/sub/x").is_file());

        let escape = resolve(&spec("tree", Some("../../etc"), None), &env, dir.path());
        assert!(matches!(escape, Err(ArtifactError::Invalid(_))));
        let missing =
            resolve(&spec("/nonexistent/file", None, None), &env, dir.path()).expect("resolves");
        assert!(place(&missing, &task_dir).is_err());
    }

    #[test]
    fn local_checksum_is_verified() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("f"), "abc").expect("write");
        let env = BTreeMap::new();
        let mut with = spec("f", None, None);
        // sha256("abc")
        with.options = vec![(
            "checksum".into(),
            string("sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        )];
        let artifact = resolve(&with, &env, dir.path()).expect("resolve");
        place(&artifact, &dir.path().join("task")).expect("matches");
        with.options = vec![(
            "checksum".into(),
            string(&format!("md5:{}", "0".repeat(32))),
        )];
        let artifact = resolve(&with, &env, dir.path()).expect("resolve");
        let error = place(&artifact, &dir.path().join("task2")).expect_err("mismatch");
        assert!(matches!(error, ArtifactError::Checksum { .. }), "{error}");
        assert!(!dir.path().join("task2/local/f").exists());
    }
}
