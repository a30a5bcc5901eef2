//! `validate`: checks a job file's virt tasks the way the plugin would see
//! them (the task schema through the hcldec emulation, then the driver's
//! own validation) plus what only the job file can tell (port labels,
//! network mode, memory), without libvirt or a plugin process.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use super::alloc::{self, AllocIdentity, HostCpu};
use super::job::{Group, JobFile, Task};
use super::{Diagnostic, Diagnostics};
use crate::config::client::{self, PLUGIN_BLOCK_LABEL};
use crate::config::plugin::Settings;
use crate::config::task::{self as task_config, TaskSpec};
use crate::config::ConfigErrors;
use crate::config::Problems;
use crate::nomad_client::hcldec::{self, HclDecodeError};

/// What a successful validation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Summary {
    /// A job file and its virt tasks.
    Job { job: String, tasks: Vec<String> },
    /// A Nomad client config with the plugin's block.
    ClientConfig,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Summary::Job { job, tasks } => write!(
                f,
                "job {job:?}, {} virt task{} ({})",
                tasks.len(),
                if tasks.len() == 1 { "" } else { "s" },
                tasks.join(", ")
            ),
            Summary::ClientConfig => {
                write!(f, "plugin \"{PLUGIN_BLOCK_LABEL}\" config")
            }
        }
    }
}

/// The scope prefix of a task's problems.
pub fn task_scope(task: &Task) -> String {
    format!("task \"{}\"", task.name)
}

/// Checks one virt task's config with the given environment (used for
/// `${...}` interpolation, as the plugin-schema encoder will); returns the
/// typed config the driver would decode.
pub fn check_task(
    file: &JobFile,
    group: &Group,
    task: &Task,
    env: &BTreeMap<String, String>,
) -> Result<TaskSpec, Vec<Diagnostic>> {
    let scope = task_scope(task);
    let at = |line: usize, field: &str, message: String| {
        Diagnostic::new(&file.path, Some(line), message)
            .scoped(scope.clone())
            .field(field)
    };
    let Some(config) = &task.config else {
        return Err(vec![at(
            task.line,
            "config",
            "is required: a virt task needs config { disk { source { image = \"...\" } } }".into(),
        )]);
    };
    let env_map = env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let context = crate::nomad_client::interpolation_context(&env_map);
    let body = hcl::Body::from(config.body.clone());
    let value = hcldec::decode_body(&task_config::schema(), &body, &context).map_err(|error| {
        let diagnostic = match &error {
            HclDecodeError::Invalid {
                path,
                summary,
                detail,
            } => {
                let message = if detail.is_empty() {
                    summary.clone()
                } else {
                    format!("{summary}; {detail}")
                };
                at(file.line_of_config_field(config, path), path, message)
            }
            other => at(config.line, "", other.to_string()),
        };
        vec![diagnostic]
    })?;
    let bytes = crate::nomad::cty::to_msgpack(&value);
    let located = |error: ConfigErrors| {
        error
            .errors
            .iter()
            .map(|problem| {
                at(
                    file.line_of_config_field(config, &problem.field),
                    &problem.field,
                    problem.message.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    // The very function StartTask uses; no rule of the task config is
    // repeated here.
    let typed = task_config::parse_task_config(&bytes).map_err(located)?;

    let labels: BTreeSet<&str> = group
        .network
        .iter()
        .flat_map(|network| network.ports.iter().map(|port| port.label.as_str()))
        .collect();
    let mut problems = typed
        .check_port_labels(&labels, &format!("group {:?}", group.name))
        .err()
        .map(located)
        .unwrap_or_default();
    let mounts: BTreeSet<&str> = task.volume_mounts.iter().map(String::as_str).collect();
    // A computed destination could be any disk's: only Nomad knows.
    if !task.volume_mounts_computed {
        problems.extend(
            typed
                .check_volume_mounts(&mounts)
                .err()
                .map(located)
                .unwrap_or_default(),
        );
    }
    let memory = task.resources.memory.unwrap_or(alloc::DEFAULT_MEMORY_MB);
    if let Err(problem) = crate::task::plan::check_memory(memory) {
        problems.push(at(
            task.resources
                .memory_line
                .or(task.resources.line)
                .unwrap_or(task.line),
            "resources.memory",
            problem,
        ));
    }
    if problems.is_empty() {
        Ok(typed)
    } else {
        Err(problems)
    }
}

/// Problems with a group that hosts virt tasks.
pub fn check_group(file: &JobFile, group: &Group) -> Vec<Diagnostic> {
    let mut problems = Vec::new();
    if let Some(network) = &group.network {
        if let Some(mode) = network.mode.as_deref().filter(|mode| *mode != "host") {
            problems.push(
                Diagnostic::new(&file.path, network.mode_line, format!(
                    "{mode:?} is not supported by the virt driver (it isolates networking as \"host\"); remove mode, and map ports with network_interface {{ bridge {{ ports = [...] }} }}"
                ))
                .scoped(format!("group \"{}\"", group.name))
                .field("network.mode"),
            );
        }
    }
    problems
}

/// An environment with the right names and plausible values, for checking
/// interpolations without allocating anything.
pub fn placeholder_env(
    file: &JobFile,
    group: &Group,
    task: &Task,
) -> Result<BTreeMap<String, String>, Diagnostic> {
    let identity = AllocIdentity::new(&file.job, group, alloc::new_uuid(), "localhost".into());
    let mut next = *super::hostnet::DYNAMIC_PORTS.start();
    let ports = alloc::allocate_ports(group.network.as_ref(), Ipv4Addr::LOCALHOST, |_| {
        next += 1;
        Some(next)
    })
    .map_err(|message| {
        Diagnostic::new(&file.path, group.network.as_ref().map(|n| n.line), message)
            .scoped(format!("group \"{}\"", group.name))
    })?;
    // Host facts do not matter here; a big host keeps `cores` from failing.
    let host = HostCpu {
        cpus: 4096,
        mhz_per_core: 1000,
    };
    let resources = alloc::resolve_resources(&task.resources, host).map_err(|message| {
        Diagnostic::new(&file.path, task.resources.line, message).scoped(task_scope(task))
    })?;
    alloc::task_env(&identity, task, &resources, &ports).map_err(|(line, message)| {
        Diagnostic::new(&file.path, Some(line), message).scoped(task_scope(task))
    })
}

/// Validates every virt task of a job file, or the plugin block of a
/// Nomad client config (a file with `plugin` blocks and no `job`).
pub fn validate_file(path: &Path) -> Result<Summary, Diagnostics> {
    validate_file_with(path, None)
}

/// [`validate_file`], with a job's tasks also checked against the
/// operator's `allow_*` settings of `settings` (from a client config).
/// `allow_networks` needs libvirt (which network a bridge belongs to) and
/// the default macvtap devices are this host's: StartTask checks those.
pub fn validate_file_with(
    path: &Path,
    settings: Option<&Settings>,
) -> Result<Summary, Diagnostics> {
    let source = std::fs::read_to_string(path).map_err(|error| {
        Diagnostics(vec![Diagnostic::new(
            path,
            None,
            format!("cannot read it: {error}"),
        )])
    })?;
    validate_source_with(path, source, settings)
}

/// [`validate_file`] on text already read; `path` names the file in
/// messages and is where relative paths in the job resolve from.
pub fn validate_source(path: &Path, source: String) -> Result<Summary, Diagnostics> {
    validate_source_with(path, source, None)
}

/// [`validate_source`], checked against the operator's settings as in
/// [`validate_file_with`].
pub fn validate_source_with(
    path: &Path,
    source: String,
    settings: Option<&Settings>,
) -> Result<Summary, Diagnostics> {
    if let Ok(body) = client::parse(&source) {
        if client::is_client_config(&body) {
            return validate_client_config(path, &source, &body).map(|(summary, _)| summary);
        }
    }
    let file = JobFile::parse(path, source)?;
    let mut problems = Vec::new();
    let mut tasks = Vec::new();
    for group in &file.job.groups {
        let virt: Vec<&Task> = group.tasks.iter().filter(|task| task.is_virt()).collect();
        if virt.is_empty() {
            continue;
        }
        problems.extend(check_group(&file, group));
        for task in virt {
            tasks.push(task.name.clone());
            match placeholder_env(&file, group, task) {
                Ok(env) => match check_task(&file, group, task, &env) {
                    Ok(typed) => {
                        if let Some(settings) = settings {
                            problems.extend(check_policy(&file, task, &typed, settings));
                        }
                    }
                    Err(found) => problems.extend(found),
                },
                Err(problem) => problems.push(problem),
            }
        }
    }
    if tasks.is_empty() {
        problems.push(Diagnostic::new(
            path,
            Some(file.job.line),
            format!(
                "job {:?} has no task with driver = \"{}\"",
                file.job.id,
                crate::meta::PLUGIN_NAME
            ),
        ));
    }
    if problems.is_empty() {
        Ok(Summary::Job {
            job: file.job.id,
            tasks,
        })
    } else {
        Err(Diagnostics(problems))
    }
}

/// Problems of a checked task with the operator's `allow_*` settings.
pub fn check_policy(
    file: &JobFile,
    task: &Task,
    typed: &TaskSpec,
    settings: &Settings,
) -> Vec<Diagnostic> {
    let mut problems = Problems::default();
    crate::config::policy::check_task(
        typed,
        &settings.policy,
        &settings.default_pool,
        None,
        &mut problems,
    );
    let Err(errors) = problems.into_result("task config", ()) else {
        return Vec::new();
    };
    let line = |field: &str| {
        task.config
            .as_ref()
            .map_or(task.line, |config| file.line_of_config_field(config, field))
    };
    errors
        .errors
        .iter()
        .map(|problem| {
            // "disk[0].pool (unset: the default pool)" locates as disk[0].
            let located = problem.field.split(' ').next().unwrap_or_default();
            Diagnostic::new(&file.path, Some(line(located)), problem.message.clone())
                .scoped(task_scope(task))
                .field(&problem.field)
        })
        .collect()
}

/// The settings of the plugin block of a client config file, when `path`
/// is one and it is valid (its problems are reported when it is validated).
pub fn client_settings(path: &Path) -> Option<Settings> {
    let source = std::fs::read_to_string(path).ok()?;
    let body = client::parse(&source).ok()?;
    if !client::is_client_config(&body) {
        return None;
    }
    validate_client_config(path, &source, &body).ok()?.1
}

/// Checks a client config's `plugin "nomad-driver-virt" { config { ... } }`
/// against the plugin schema and the plugin's validation; returns its
/// settings when it has that block.
fn validate_client_config(
    path: &Path,
    source: &str,
    body: &hcl::edit::structure::Body,
) -> Result<(Summary, Option<Settings>), Diagnostics> {
    let starts: Vec<usize> = std::iter::once(0)
        .chain(source.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|span| starts.partition_point(|start| *start <= span.start))
    };
    let scope = format!("plugin \"{PLUGIN_BLOCK_LABEL}\"");
    let config = match client::plugin_config_block(body) {
        Ok(Some(config)) => config,
        Ok(None) => return Ok((Summary::ClientConfig, None)),
        Err(error) => {
            return Err(Diagnostics(vec![Diagnostic::new(
                path,
                None,
                error.to_string(),
            )]))
        }
    };
    use hcl::edit::Span as _;
    let at = |field: &str, message: String| {
        let line = line_of(super::job::locate(&config.body, field)).or(line_of(config.span()));
        Diagnostic::new(path, line, message)
            .scoped(scope.clone())
            .field(field)
    };
    let value = hcldec::decode_body(
        &crate::config::plugin::schema(),
        &hcl::Body::from(config.body.clone()),
        &hcl::eval::Context::new(),
    )
    .map_err(|error| {
        Diagnostics(vec![match &error {
            HclDecodeError::Invalid {
                path,
                summary,
                detail,
            } => at(path, format!("{summary}; {detail}")),
            other => at("", other.to_string()),
        }])
    })?;
    let bytes = crate::nomad::cty::to_msgpack(&value);
    let settings = crate::config::plugin::parse_plugin_config(&bytes).map_err(|error| {
        Diagnostics(
            error
                .errors
                .iter()
                .map(|e| at(&e.field, e.message.clone()))
                .collect(),
        )
    })?;
    Ok((Summary::ClientConfig, Some(settings)))
}

/// The `validate` command: 0 when every file is fine, 1 otherwise. A
/// client config among the files (the last, if several) sets the operator
/// settings the job files are checked against.
pub fn command(files: &[std::path::PathBuf]) -> i32 {
    let mut failed = false;
    let settings = files.iter().rev().find_map(|path| client_settings(path));
    for path in files {
        match validate_file_with(path, settings.as_ref()) {
            Ok(summary) => println!("{}: OK: {summary}", path.display()),
            Err(problems) => {
                failed = true;
                eprintln!("{problems}");
            }
        }
    }
    i32::from(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(job: &str) -> Vec<String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.hcl");
        std::fs::write(&path, job).expect("write");
        match validate_file(&path) {
            Ok(_) => Vec::new(),
            Err(problems) => problems
                .0
                .iter()
                .map(|p| {
                    let text = p.to_string();
                    text.split_once("job.hcl")
                        .map(|(_, rest)| rest.to_string())
                        .unwrap_or(text)
                })
                .collect(),
        }
    }

    fn job(config: &str) -> String {
        format!(
            "job \"j\" {{\n  group \"g\" {{\n    network {{\n      port \"http\" {{\n        to = 80\n      }}\n    }}\n    task \"t\" {{\n      driver = \"virt\"\n      config {{\n{config}\n      }}\n    }}\n  }}\n}}\n"
        )
    }

    const DISK: &str = "        disk {\n          source {\n            image = \"a.qcow2\"\n          }\n        }";

    #[test]
    fn a_good_job_passes() {
        let config = format!("{DISK}\n        hostname = \"${{NOMAD_TASK_NAME}}-vm\"\n        network_interface {{\n          bridge {{\n            name  = \"virbr0\"\n            ports = [\"http\"]\n          }}\n        }}");
        assert_eq!(problems(&job(&config)), Vec::<String>::new());
    }

    #[test]
    fn errors_name_line_task_and_field() {
        // Line 11 is the first line inside config.
        let unknown = problems(&job(&format!("        hostnme = \"x\"\n{DISK}")));
        assert_eq!(unknown.len(), 1, "{unknown:?}");
        assert!(
            unknown[0].starts_with(":11: task \"t\": hostnme: Unsupported argument;"),
            "{unknown:?}"
        );
        assert!(
            unknown[0].contains("Did you mean \"hostname\"?"),
            "{unknown:?}"
        );

        let wrong_type = problems(&job(&format!("{DISK}\n        cmds = 5")));
        assert!(
            wrong_type[0].starts_with(":16: task \"t\": cmds: Incorrect attribute value type"),
            "{wrong_type:?}"
        );

        let port = problems(&job(&format!(
            "{DISK}\n        network_interface {{\n          bridge {{\n            name = \"virbr0\"\n            ports = [\"http\", \"web\"]\n          }}\n        }}"
        )));
        assert_eq!(port.len(), 1, "{port:?}");
        assert!(
            port[0].starts_with(
                ":19: task \"t\": network_interface[0].bridge.ports[1]: \"web\" is not a port of group \"g\""
            ),
            "{port:?}"
        );

        let no_disk = problems(&job("        hostname = \"x\""));
        assert!(
            no_disk[0].starts_with(":10: task \"t\": disk: a VM needs at least one disk"),
            "{no_disk:?}"
        );
    }

    #[test]
    fn undefined_interpolations_are_errors() {
        let bad = problems(&job(&format!("{DISK}\n        hostname = \"${{attr.x}}\"")));
        assert!(bad[0].starts_with(":16: task \"t\": hostname:"), "{bad:?}");
    }

    #[test]
    fn client_configs_check_the_plugin_block() {
        let good = "plugin_dir = \"/p\"\nplugin \"nomad-driver-virt\" {\n  config {\n    accelerator = \"tcg\"\n  }\n}\n";
        assert_eq!(problems(good), Vec::<String>::new());
        let bad = good.replace("\"tcg\"", "\"fast\"");
        let found = problems(&bad);
        assert!(
            found[0].starts_with(":4: plugin \"nomad-driver-virt\": accelerator:"),
            "{found:?}"
        );
        let unknown = problems(&good.replace("accelerator", "acelerator"));
        assert!(
            unknown[0]
                .starts_with(":4: plugin \"nomad-driver-virt\": acelerator: Unsupported argument"),
            "{unknown:?}"
        );
    }

    #[test]
    fn jobs_without_virt_tasks_fail() {
        let other = "job \"j\" {\n  group \"g\" {\n    task \"t\" {\n      driver = \"docker\"\n    }\n  }\n}\n";
        let found = problems(other);
        assert!(
            found[0].contains("no task with driver = \"virt\""),
            "{found:?}"
        );
    }
}
