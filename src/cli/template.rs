//! `template` blocks for the local runner: inline `data` or a local
//! `source` rendered into the task directory with the task's environment,
//! written at `destination` with `perms`, as Nomad's template hook does after
//! the artifacts are in place.
//!
//! The renderer understands the part of consul-template's language that
//! needs nothing but the task: text, `{{ env "NAME" }}` (Nomad's task
//! environment, "" when unset), string literals, the pipeline functions
//! `toUpper`, `toLower` and `trimSpace`, comments and the `{{-`/`-}}` trim
//! markers, and custom delimiters. Functions that read Consul, Vault or
//! Nomad (`key`, `service`, `secret`, `nomadVar`, ...) are refused naming
//! the function and what it needs; so are control blocks (`if`, `range`,
//! ...) and anything else it does not know, rather than rendering wrong.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::job::{self, TemplateSpec};
use super::unpack;
use crate::fsopen::{open_beneath, open_local, Links, OpenError, Root};

/// Largest template source read, and largest rendered output.
pub const MAX_TEMPLATE_BYTES: u64 = 16 * 1024 * 1024;

/// Why a template cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template: {0}")]
    Invalid(String),
    #[error("template: function {function:?} needs {needs}, which the local runner does not have; run the job under Nomad, or put the value in the template")]
    NeedsCluster {
        function: String,
        needs: &'static str,
    },
    #[error("template: {what} is not supported by the local runner's renderer (it renders text, env lookups and toUpper/toLower/trimSpace)")]
    Unsupported { what: String },
    #[error("template source {path}: cannot read it")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("template source {path}: is larger than {MAX_TEMPLATE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("template destination {path}: cannot write it")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("template destination {path:?}")]
    Destination {
        path: PathBuf,
        #[source]
        source: unpack::UnpackError,
    },
}

/// Where the template text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Data(String),
    /// A file; relative paths are inside the task directory, as in Nomad.
    Source(PathBuf),
}

/// A template block with its strings interpolated and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTemplate {
    pub body: Body,
    /// Relative to the task directory.
    pub destination: PathBuf,
    pub perms: u32,
    pub left: String,
    pub right: String,
}

fn text(
    expression: Option<&hcl::Expression>,
    env: &BTreeMap<String, String>,
    field: &str,
) -> Result<Option<String>, TemplateError> {
    let Some(expression) = expression else {
        return Ok(None);
    };
    let value = job::eval_with_env(expression, env)
        .map_err(|message| TemplateError::Invalid(format!("{field}: {message}")))?;
    match value {
        hcl::Value::String(text) => Ok(Some(text)),
        hcl::Value::Number(number) => Ok(Some(number.to_string())),
        other => Err(TemplateError::Invalid(format!(
            "{field} must be a string, not {other}"
        ))),
    }
}

/// Resolves a template block; inline `data` is rendered once here so a
/// refused function is reported before anything is created.
pub fn resolve(
    spec: &TemplateSpec,
    env: &BTreeMap<String, String>,
) -> Result<LocalTemplate, TemplateError> {
    let data = text(spec.data.as_ref(), env, "data")?;
    let source = text(spec.source.as_ref(), env, "source")?.filter(|s| !s.is_empty());
    let body = match (data, source) {
        (Some(_), Some(_)) => {
            return Err(TemplateError::Invalid(
                "set either data or source, not both".into(),
            ))
        }
        (Some(data), None) => Body::Data(data),
        (None, Some(source)) => {
            let path = PathBuf::from(&source);
            if !path.is_absolute() {
                super::artifact::task_relative(&source, "source")
                    .map_err(TemplateError::Invalid)?;
            }
            Body::Source(path)
        }
        (None, None) => {
            return Err(TemplateError::Invalid(
                "needs data = \"...\" or source = \"path\"".into(),
            ))
        }
    };
    let destination = text(spec.destination.as_ref(), env, "destination")?
        .filter(|d| !d.is_empty())
        .ok_or_else(|| TemplateError::Invalid("destination is required".into()))?;
    let destination = unpack::clean_relative(Path::new(destination.trim_start_matches('/')))
        .ok_or_else(|| {
            TemplateError::Invalid(format!(
                "destination {destination:?} leaves the task directory"
            ))
        })?;
    let perms = match text(spec.perms.as_ref(), env, "perms")? {
        None => 0o644,
        Some(perms) => u32::from_str_radix(&perms, 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
            .ok_or_else(|| {
                TemplateError::Invalid(format!(
                    "perms {perms:?} is not an octal mode such as \"644\""
                ))
            })?,
    };
    let left = text(spec.left_delimiter.as_ref(), env, "left_delimiter")?
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "{{".into());
    let right = text(spec.right_delimiter.as_ref(), env, "right_delimiter")?
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "}}".into());
    let template = LocalTemplate {
        body,
        destination,
        perms,
        left,
        right,
    };
    if let Body::Data(data) = &template.body {
        render(data, &template.left, &template.right, env)?;
    }
    Ok(template)
}

/// Renders the template and writes it into `task_dir`; returns the path.
pub fn place(
    template: &LocalTemplate,
    task_dir: &Path,
    env: &BTreeMap<String, String>,
) -> Result<PathBuf, TemplateError> {
    let source_text;
    let text = match &template.body {
        Body::Data(data) => data,
        Body::Source(path) => {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                task_dir.join(path)
            };
            source_text = read_bounded(&path, task_dir)?;
            &source_text
        }
    };
    let rendered = render(text, &template.left, &template.right, env)?;
    let target = unpack::prepare(
        task_dir,
        &template.destination,
        &template.destination.display().to_string(),
    )
    .map_err(|source| TemplateError::Destination {
        path: template.destination.clone(),
        source,
    })?;
    let write_error = |source| TemplateError::Write {
        path: target.clone(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(template.perms)
        .open(&target)
        .map_err(write_error)?;
    file.write_all(rendered.as_bytes()).map_err(write_error)?;
    fs::set_permissions(&target, fs::Permissions::from_mode(template.perms))
        .map_err(write_error)?;
    Ok(target)
}

/// Reads a template source; one inside the task dir must stay inside it.
fn read_bounded(path: &Path, task_dir: &Path) -> Result<String, TemplateError> {
    let read_error = |source| TemplateError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Opened once, never through a symlink: inside the task dir beneath
    // it (one link only, as a job could link a host file in), elsewhere as
    // the runner's own file.
    let opened = match path.strip_prefix(task_dir) {
        Ok(rest) => {
            let root = Root::open(task_dir, Links::Single).map_err(read_error)?;
            open_beneath(&root, rest)
        }
        Err(_) => open_local(path),
    };
    let file = opened.map_err(|error| match error {
        OpenError::Escapes => TemplateError::Invalid(format!(
            "source {} leads outside the task directory",
            path.display()
        )),
        other => read_error(other.into()),
    })?;
    let mut text = String::new();
    file.take(MAX_TEMPLATE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if text.len() as u64 > MAX_TEMPLATE_BYTES {
        return Err(TemplateError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

/// What a function that needs the cluster needs.
fn cluster_need(function: &str) -> Option<&'static str> {
    const CONSUL: [&str; 14] = [
        "key",
        "keyExists",
        "keyOrDefault",
        "ls",
        "safeLs",
        "tree",
        "safeTree",
        "service",
        "services",
        "connect",
        "caRoots",
        "caLeaf",
        "datacenters",
        "node",
    ];
    const VAULT: [&str; 4] = ["secret", "secrets", "pkiCert", "writeToFile"];
    if CONSUL.contains(&function) || function == "nodes" {
        Some("Consul")
    } else if VAULT.contains(&function) {
        Some("Vault")
    } else if function.starts_with("nomad") {
        Some("the Nomad API (variables and services)")
    } else {
        None
    }
}

/// Renders consul-template text with only the task environment.
pub fn render(
    text: &str,
    left: &str,
    right: &str,
    env: &BTreeMap<String, String>,
) -> Result<String, TemplateError> {
    let mut out = String::new();
    let mut rest = text;
    let mut trim_next = false;
    while let Some(start) = rest.find(left) {
        let mut literal = &rest[..start];
        if trim_next {
            literal = literal.trim_start();
        }
        let after = &rest[start + left.len()..];
        let trim_before =
            after.starts_with("- ") || after.starts_with("-\t") || after.starts_with("-\n");
        if trim_before {
            literal = literal.trim_end();
        }
        out.push_str(literal);
        let end = after.find(right).ok_or_else(|| {
            TemplateError::Invalid(format!(
                "an action opened with {left:?} is never closed with {right:?}"
            ))
        })?;
        let mut action = &after[..end];
        if trim_before {
            action = &action[1..];
        }
        trim_next = action.ends_with(" -") || action.ends_with("\t-") || action.ends_with("\n-");
        if trim_next {
            action = &action[..action.len() - 1];
        }
        out.push_str(&action_value(action.trim(), env)?);
        if out.len() as u64 > MAX_TEMPLATE_BYTES {
            return Err(TemplateError::Invalid(format!(
                "renders to more than {MAX_TEMPLATE_BYTES} bytes"
            )));
        }
        rest = &after[end + right.len()..];
    }
    out.push_str(if trim_next { rest.trim_start() } else { rest });
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Text(String),
    Word(String),
    Pipe,
}

fn tokens(action: &str) -> Result<Vec<Token>, TemplateError> {
    let mut tokens = Vec::new();
    let mut chars = action.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            ' ' | '\t' | '\n' | '\r' => {
                chars.next();
            }
            '|' => {
                chars.next();
                tokens.push(Token::Pipe);
            }
            '"' => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        None => {
                            return Err(TemplateError::Invalid(format!(
                                "unterminated string in {{{{ {action} }}}}"
                            )))
                        }
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some('t') => value.push('\t'),
                            Some('r') => value.push('\r'),
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            other => {
                                return Err(TemplateError::Invalid(format!(
                                    "unsupported escape \\{} in {{{{ {action} }}}}",
                                    other.map(String::from).unwrap_or_default()
                                )))
                            }
                        },
                        Some(other) => value.push(other),
                    }
                }
                tokens.push(Token::Text(value));
            }
            '`' => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        None => {
                            return Err(TemplateError::Invalid(format!(
                                "unterminated raw string in {{{{ {action} }}}}"
                            )))
                        }
                        Some('`') => break,
                        Some(other) => value.push(other),
                    }
                }
                tokens.push(Token::Text(value));
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || c == '|' || c == '"' || c == '`' {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
        }
    }
    Ok(tokens)
}

/// Evaluates one action: a pipeline of commands.
fn action_value(action: &str, env: &BTreeMap<String, String>) -> Result<String, TemplateError> {
    if action.starts_with("/*") && action.ends_with("*/") {
        return Ok(String::new());
    }
    let tokens = tokens(action)?;
    let mut value: Option<String> = None;
    for command in tokens.split(|token| *token == Token::Pipe) {
        let Some((first, args)) = command.split_first() else {
            return Err(TemplateError::Invalid(format!(
                "empty command in {{{{ {action} }}}}"
            )));
        };
        let mut texts = Vec::new();
        for arg in args {
            match arg {
                Token::Text(text) => texts.push(text.clone()),
                Token::Word(word) => {
                    return Err(TemplateError::Unsupported {
                        what: format!("the argument {word:?} in {{{{ {action} }}}}"),
                    })
                }
                Token::Pipe => {}
            }
        }
        if let Some(previous) = value.take() {
            texts.push(previous);
        }
        value = Some(match first {
            Token::Text(text) if texts.is_empty() => text.clone(),
            Token::Text(_) | Token::Pipe => {
                return Err(TemplateError::Invalid(format!(
                    "a string cannot take arguments in {{{{ {action} }}}}"
                )))
            }
            Token::Word(word) => call(word, &texts, env, action)?,
        });
    }
    value.ok_or_else(|| TemplateError::Invalid("empty action {{ }}".into()))
}

fn call(
    function: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    action: &str,
) -> Result<String, TemplateError> {
    const KEYWORDS: [&str; 11] = [
        "if", "else", "end", "range", "with", "define", "template", "block", "break", "continue",
        "nil",
    ];
    let one = || match args {
        [arg] => Ok(arg.clone()),
        _ => Err(TemplateError::Invalid(format!(
            "{function} takes one string in {{{{ {action} }}}}"
        ))),
    };
    match function {
        "env" => Ok(env.get(&one()?).cloned().unwrap_or_default()),
        "toUpper" => Ok(one()?.to_uppercase()),
        "toLower" => Ok(one()?.to_lowercase()),
        "trimSpace" => Ok(one()?.trim().to_string()),
        _ if KEYWORDS.contains(&function) => Err(TemplateError::Unsupported {
            what: format!("{{{{ {function} }}}}"),
        }),
        _ if function.starts_with('.') || function.starts_with('$') => {
            Err(TemplateError::Unsupported {
                what: format!("{function:?} in {{{{ {action} }}}}"),
            })
        }
        _ => match cluster_need(function) {
            Some(needs) => Err(TemplateError::NeedsCluster {
                function: function.to_string(),
                needs,
            }),
            None => Err(TemplateError::Unsupported {
                what: format!("the function {function:?}"),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("NOMAD_TASK_NAME".to_string(), "web".to_string()),
            ("GREETING".to_string(), "  Hi  ".to_string()),
        ])
    }

    fn render_default(text: &str) -> Result<String, TemplateError> {
        render(text, "{{", "}}", &env())
    }

    #[test]
    fn env_and_pipelines() {
        assert_eq!(
            render_default(
                "task={{ env \"NOMAD_TASK_NAME\" }} up={{ env \"NOMAD_TASK_NAME\" | toUpper }}"
            )
            .expect("render"),
            "task=web up=WEB"
        );
        assert_eq!(
            render_default("[{{ env `GREETING` | trimSpace }}]{{ env \"MISSING\" }}")
                .expect("render"),
            "[Hi]"
        );
        assert_eq!(
            render_default("a  {{- /* note */ -}}  b").expect("render"),
            "ab"
        );
        assert_eq!(
            render_default("no actions \\o/").expect("render"),
            "no actions \\o/"
        );
        assert_eq!(
            render("<% env \"NOMAD_TASK_NAME\" %> {{ x }}", "<%", "%>", &env()).expect("render"),
            "web {{ x }}"
        );
    }

    #[test]
    fn cluster_functions_are_refused_by_name() {
        for (text, function, needs) in [
            ("{{ key \"app/config\" }}", "key", "Consul"),
            ("{{ service \"db\" }}", "service", "Consul"),
            ("{{ secret \"kv/x\" }}", "secret", "Vault"),
            (
                "{{ nomadVar \"nomad/jobs/x\" }}",
                "nomadVar",
                "the Nomad API (variables and services)",
            ),
        ] {
            match render_default(text) {
                Err(TemplateError::NeedsCluster {
                    function: f,
                    needs: n,
                }) => {
                    assert_eq!((f.as_str(), n), (function, needs));
                }
                other => panic!("{text}: {other:?}"),
            }
            let message = render_default(text).expect_err(text).to_string();
            assert!(message.contains(&format!("{function:?}")), "{message}");
        }
        for text in [
            "{{ if true }}x{{ end }}",
            "{{ .Name }}",
            "{{ printf \"%s\" \"x\" }}",
            "{{ env",
        ] {
            assert!(render_default(text).is_err(), "{text}");
        }
    }

    #[test]
    fn sources_in_the_task_dir_are_opened_safely() {
        let dir = tempfile::tempdir().expect("tempdir");
        let task_dir = dir.path().join("task");
        fs::create_dir_all(task_dir.join("local")).expect("mkdir");
        let secret = dir.path().join("secret");
        fs::write(&secret, "host secret").expect("write");
        fs::write(task_dir.join("local/ok.tpl"), "ok").expect("write");
        std::os::unix::fs::symlink(&secret, task_dir.join("local/link.tpl")).expect("symlink");
        fs::hard_link(&secret, task_dir.join("local/hard.tpl")).expect("hard link");
        let read = |name: &str| read_bounded(&task_dir.join(name), &task_dir);
        assert_eq!(read("local/ok.tpl").expect("ok"), "ok");
        for name in ["local/link.tpl", "local/hard.tpl"] {
            let err = read(name).expect_err(name);
            let reason = std::error::Error::source(&err).map(ToString::to_string);
            let message = format!("{err}: {reason:?}");
            assert!(!message.contains(&*secret.to_string_lossy()), "{message}");
            assert!(matches!(err, TemplateError::Read { .. }), "{message}");
        }
        let err = read_bounded(&task_dir.join("../secret"), &task_dir).expect_err("escape");
        assert!(matches!(err, TemplateError::Invalid(_)), "{err}");
    }

    #[test]
    fn places_with_perms_inside_the_task_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let string = |s: &str| {
            hcl::Expression::from(hcl::edit::parser::parse_expr(&format!("{s:?}")).expect("expr"))
        };
        let spec = TemplateSpec {
            data: Some(string("name={{ env \"NOMAD_TASK_NAME\" }}\n")),
            source: None,
            destination: Some(string("local/${NOMAD_TASK_NAME}.conf")),
            perms: Some(string("600")),
            left_delimiter: None,
            right_delimiter: None,
            ignored: vec![],
            line: 1,
        };
        let template = resolve(&spec, &env()).expect("resolve");
        let path = place(&template, dir.path(), &env()).expect("place");
        assert_eq!(path, dir.path().join("local/web.conf"));
        assert_eq!(fs::read_to_string(&path).expect("read"), "name=web\n");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let outside = TemplateSpec {
            destination: Some(string("../x")),
            ..spec.clone()
        };
        assert!(resolve(&outside, &env()).is_err());
        let refused = TemplateSpec {
            data: Some(string("{{ key \"x\" }}")),
            ..spec
        };
        assert!(matches!(
            resolve(&refused, &env()),
            Err(TemplateError::NeedsCluster { .. })
        ));
    }
}
