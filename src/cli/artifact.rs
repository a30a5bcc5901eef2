//! `artifact` blocks for the local runner: local files and directories are
//! copied into the task directory as Nomad's go-getter would place them;
//! remote sources are refused with advice, since fetching them is Nomad's
//! client's job, not the plugin's.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use super::job::{self, ArtifactSpec};

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
        source: std::io::Error,
    },
    #[error("artifact {path}: has no file name")]
    NoFileName { path: PathBuf },
    #[error("artifact {path}: cannot copy it to {to}")]
    Copy {
        path: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An artifact with its strings interpolated and its paths resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalArtifact {
    pub source: PathBuf,
    /// Relative to the task directory.
    pub destination: PathBuf,
    /// `mode = "file"`: the destination is the file itself.
    pub as_file: bool,
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
        other => Err(ArtifactError::Invalid(format!(
            "{field} must be a string, not {other}"
        ))),
    }
}

/// Resolves an artifact block: interpolates it with the task env, accepts
/// only local sources (`/path`, `file:///path`, or a path relative to the
/// job file's directory) and keeps the destination inside the task dir.
pub fn resolve(
    spec: &ArtifactSpec,
    env: &BTreeMap<String, String>,
    job_dir: &Path,
) -> Result<LocalArtifact, ArtifactError> {
    let source = text(spec.source.as_ref(), env, "source")?
        .filter(|source| !source.is_empty())
        .ok_or_else(|| ArtifactError::Invalid("source is required".into()))?;
    let local = if let Some(path) = source.strip_prefix("file://") {
        PathBuf::from(path)
    } else if source.contains("::") || source.contains("://") || looks_remote(&source) {
        return Err(ArtifactError::Unsupported(source));
    } else {
        PathBuf::from(&source)
    };
    let local = if local.is_absolute() {
        local
    } else {
        job_dir.join(local)
    };
    let destination = text(spec.destination.as_ref(), env, "destination")?
        .unwrap_or_else(|| "local/".to_string());
    let destination_path = PathBuf::from(destination.trim_start_matches('/'));
    if destination_path
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(ArtifactError::Invalid(format!(
            "destination {destination:?} leaves the task directory"
        )));
    }
    let mode = text(spec.mode.as_ref(), env, "mode")?.unwrap_or_else(|| "any".into());
    if !matches!(mode.as_str(), "any" | "file" | "dir") {
        return Err(ArtifactError::Invalid(format!(
            "mode {mode:?} is not one of \"any\", \"file\", \"dir\""
        )));
    }
    Ok(LocalArtifact {
        source: local,
        destination: destination_path,
        as_file: mode == "file",
    })
}

/// go-getter's shorthand forms for remote sources (github.com/..., bucket urls).
fn looks_remote(source: &str) -> bool {
    let first = source.split('/').next().unwrap_or_default();
    first.contains('.') && !first.starts_with('.') && !Path::new(source).exists()
}

/// Copies the artifact into `task_dir`: a file into the destination
/// directory (or to the destination itself with `mode = "file"`), a
/// directory's contents into the destination directory.
pub fn place(artifact: &LocalArtifact, task_dir: &Path) -> Result<PathBuf, ArtifactError> {
    let path = || artifact.source.clone();
    let copy_error = |to: &Path| {
        let to = to.to_path_buf();
        move |source| ArtifactError::Copy {
            path: artifact.source.clone(),
            to,
            source,
        }
    };
    let metadata = std::fs::metadata(&artifact.source).map_err(|source| ArtifactError::Read {
        path: path(),
        source,
    })?;
    let destination = task_dir.join(&artifact.destination);
    if metadata.is_dir() {
        copy_dir(&artifact.source, &destination).map_err(copy_error(&destination))?;
        return Ok(destination);
    }
    let target = if artifact.as_file {
        destination
    } else {
        let name = artifact
            .source
            .file_name()
            .ok_or_else(|| ArtifactError::NoFileName { path: path() })?;
        destination.join(name)
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(copy_error(parent))?;
    }
    std::fs::copy(&artifact.source, &target).map_err(copy_error(&target))?;
    Ok(target)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: &str, destination: Option<&str>, mode: Option<&str>) -> ArtifactSpec {
        // Parsed like the job file's strings, so `${...}` is a template.
        let string = |s: &str| {
            hcl::Expression::from(
                hcl::edit::parser::parse_expr(&format!("{s:?}")).expect("expression"),
            )
        };
        ArtifactSpec {
            source: Some(string(source)),
            destination: destination.map(string),
            mode: mode.map(string),
            options: vec![],
            line: 1,
        }
    }

    #[test]
    fn remote_sources_are_refused() {
        let env = BTreeMap::new();
        for source in [
            "https://example.com/a.tgz",
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
    fn local_files_and_dirs_are_copied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("page.html");
        std::fs::write(&source, "hi").expect("write");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
        std::fs::write(tree.join("sub/x"), "x").expect("write");
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
        assert_eq!(std::fs::read_to_string(placed).expect("read"), "hi");

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
}
