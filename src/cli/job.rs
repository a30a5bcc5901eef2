//! Reads a Nomad job file (HCL2 as `nomad job run` takes it) into what the
//! local runner and the validator need. The file is parsed once with
//! hcl-edit, which keeps source spans, so every problem can be reported as
//! FILE:LINE; values are evaluated with hcl-rs.
//!
//! Understood: `variable` defaults (`var.x`) and `locals` (`local.x`); the
//! job's name, region, namespace and datacenters; each group's `count` and
//! `network { mode  port "label" { static to host_network } }`; each task's
//! `driver`, `config`, `env`, `resources { cpu memory memory_max cores }`,
//! `kill_timeout`, `kill_signal`, `user`, `artifact` and `template` blocks. Everything
//! else Nomad knows (services, update, restart, ...) is ignored, except
//! that blocks the local runner cannot honour are reported as warnings.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hcl::edit::structure::{Attribute, Block, Body, Structure};
use hcl::edit::Span;
use hcl::eval::{Context, Evaluate};

use super::{Diagnostic, Diagnostics};

/// A parsed job file with its source, for locating problems.
#[derive(Debug, Clone)]
pub struct JobFile {
    pub path: PathBuf,
    pub source: String,
    line_starts: Vec<usize>,
    pub job: Job,
    /// Things Nomad would do that the local runner will not.
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, Clone)]
pub struct Job {
    /// The job's label (Nomad's job ID).
    pub id: String,
    /// `name`, defaulting to the ID.
    pub name: String,
    pub region: String,
    pub namespace: String,
    pub datacenters: Vec<String>,
    pub groups: Vec<Group>,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub line: usize,
    pub count: u64,
    pub count_line: Option<usize>,
    pub network: Option<Network>,
    pub tasks: Vec<Task>,
}

/// A group's `network` block.
#[derive(Debug, Clone)]
pub struct Network {
    pub mode: Option<String>,
    pub mode_line: Option<usize>,
    pub ports: Vec<PortSpec>,
    pub line: usize,
}

/// One `port "label" { ... }` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub label: String,
    /// `static`: the host port; a dynamic port is picked when unset.
    pub static_port: Option<u16>,
    /// `to`: the port inside the task; 0 when unset, -1 for "same as host".
    pub to: i32,
    pub host_network: Option<String>,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub line: usize,
    pub driver: Option<String>,
    pub config: Option<ConfigBlock>,
    /// The `env` block, unevaluated: Nomad interpolates it at run time.
    pub env: Vec<EnvEntry>,
    pub resources: Resources,
    pub kill_timeout: Option<Duration>,
    pub kill_signal: Option<String>,
    pub user: Option<String>,
    pub artifacts: Vec<ArtifactSpec>,
    pub templates: Vec<TemplateSpec>,
    /// `destination`s of the `volume_mount` blocks written as plain
    /// strings: what `disk { volume = "..." }` is matched against.
    pub volume_mounts: Vec<String>,
    /// Some `volume_mount` has a destination that is not a plain string
    /// (e.g. `"${...}"`, known only to Nomad), so unmatched disks cannot
    /// be told apart.
    pub volume_mounts_computed: bool,
}

impl Task {
    pub fn is_virt(&self) -> bool {
        self.driver.as_deref() == Some(crate::meta::PLUGIN_NAME)
    }
}

/// A task's `config` block: spans for locating fields, and its text.
#[derive(Debug, Clone)]
pub struct ConfigBlock {
    /// The block body as parsed, with spans into the job file.
    pub body: Body,
    pub line: usize,
    /// The HCL between the braces, as written.
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct EnvEntry {
    pub name: String,
    pub value: hcl::Expression,
    pub line: usize,
}

/// A task's `resources` block as written (defaults are applied later).
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub cpu: Option<i64>,
    pub memory: Option<i64>,
    pub memory_max: Option<i64>,
    pub cores: Option<i64>,
    pub line: Option<usize>,
    pub memory_line: Option<usize>,
}

/// An `artifact` block, unevaluated: its strings may use the task env.
#[derive(Debug, Clone)]
pub struct ArtifactSpec {
    pub source: Option<hcl::Expression>,
    pub destination: Option<hcl::Expression>,
    pub mode: Option<hcl::Expression>,
    /// The `options` block's attributes (e.g. `checksum`), unevaluated.
    pub options: Vec<(String, hcl::Expression)>,
    pub line: usize,
}

/// A `template` block, unevaluated: its strings may use the task env.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    pub data: Option<hcl::Expression>,
    pub source: Option<hcl::Expression>,
    pub destination: Option<hcl::Expression>,
    pub perms: Option<hcl::Expression>,
    pub left_delimiter: Option<hcl::Expression>,
    pub right_delimiter: Option<hcl::Expression>,
    /// Attributes the local runner does not act on (`env`, `change_mode`, ...).
    pub ignored: Vec<String>,
    pub line: usize,
}

/// Byte offsets where each line starts, for turning spans into line numbers.
fn line_starts(source: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(source.match_indices('\n').map(|(index, _)| index + 1))
        .collect()
}

/// The 1-based line of a byte offset.
fn line_at(starts: &[usize], offset: usize) -> usize {
    match starts.binary_search(&offset) {
        Ok(index) => index + 1,
        Err(index) => index,
    }
}

impl JobFile {
    /// Reads and parses a job file; every structural problem is reported.
    pub fn load(path: &Path) -> Result<JobFile, Diagnostics> {
        let source = std::fs::read_to_string(path).map_err(|error| {
            Diagnostics(vec![Diagnostic::new(
                path,
                None,
                format!("cannot read the job file: {error}"),
            )])
        })?;
        Self::parse(path, source)
    }

    /// Parses job file text; `path` is only used in messages.
    pub fn parse(path: &Path, source: String) -> Result<JobFile, Diagnostics> {
        let starts = line_starts(&source);
        let body = hcl::edit::parser::parse_body(&source).map_err(|error| {
            let location = error.location();
            Diagnostics(vec![Diagnostic::new(
                path,
                Some(location.line()),
                format!(
                    "invalid HCL at column {}: {}",
                    location.column(),
                    error.message()
                ),
            )])
        })?;
        let mut parser = Parser {
            path,
            source: &source,
            starts: &starts,
            context: Context::new(),
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let job = parser.job_file(&body);
        let Parser {
            problems, warnings, ..
        } = parser;
        match job {
            Some(job) if problems.is_empty() => Ok(JobFile {
                path: path.to_path_buf(),
                source,
                line_starts: starts,
                job,
                warnings,
            }),
            _ => Err(Diagnostics(problems)),
        }
    }

    /// The 1-based line of a span in this file.
    pub fn line_of(&self, span: Option<Range<usize>>) -> Option<usize> {
        span.map(|span| line_at(&self.line_starts, span.start))
    }

    /// The line of a field inside a task's config block, e.g.
    /// `network_interface[0].macvtap.mode`: the deepest part of the path
    /// that exists in the source (a missing attribute is reported at its
    /// block), else the config block's line.
    pub fn line_of_config_field(&self, config: &ConfigBlock, field: &str) -> usize {
        self.line_of(locate(&config.body, field))
            .unwrap_or(config.line)
    }
}

/// Splits `a[0].b.c[2]` into `[("a", [0]), ("b", []), ("c", [2])]`.
fn path_segments(path: &str) -> Vec<(&str, Vec<usize>)> {
    path.split('.')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (name, rest) = match part.find('[') {
                Some(index) => part.split_at(index),
                None => (part, ""),
            };
            let indices = rest
                .split(['[', ']'])
                .filter_map(|index| index.parse().ok())
                .collect();
            (name, indices)
        })
        .collect()
}

/// Finds the span of the deepest existing part of `path` in `body`.
///
/// A block name without an index that matches several blocks points at the
/// second one: the field-level errors that name a block list as a whole are
/// about there being more than one (two interfaces, two primary disks).
pub fn locate(body: &Body, path: &str) -> Option<Range<usize>> {
    let mut found = None;
    let mut current_body = Some(body);
    let mut current_expr: Option<&hcl::edit::expr::Expression> = None;
    for (name, indices) in path_segments(path) {
        if let Some(body) = current_body.take() {
            let blocks: Vec<&Block> = body.get_blocks(name).collect();
            if !blocks.is_empty() {
                let index = match indices.first() {
                    Some(index) => *index,
                    None if blocks.len() > 1 => 1,
                    None => 0,
                };
                let block = blocks.get(index).or(blocks.last())?;
                found = block.span().or(found);
                current_body = Some(&block.body);
                continue;
            }
            let Some(attribute) = body.get_attribute(name) else {
                return found;
            };
            found = attribute.span().or(found);
            let mut expr = &attribute.value;
            for index in indices {
                match expr {
                    hcl::edit::expr::Expression::Array(array) => match array.get(index) {
                        Some(element) => {
                            found = element.span().or(found);
                            expr = element;
                        }
                        None => return found,
                    },
                    _ => return found,
                }
            }
            current_expr = Some(expr);
        } else if let Some(hcl::edit::expr::Expression::Object(object)) = current_expr.take() {
            let value = object.iter().find_map(|(key, value)| {
                let matches = match key {
                    hcl::edit::expr::ObjectKey::Ident(ident) => ident.as_str() == name,
                    hcl::edit::expr::ObjectKey::Expression(
                        hcl::edit::expr::Expression::String(text),
                    ) => text.as_str() == name,
                    _ => false,
                };
                matches.then(|| value.expr())
            })?;
            found = value.span().or(found);
            current_expr = Some(value);
        } else {
            return found;
        }
    }
    found
}

struct Parser<'a> {
    path: &'a Path,
    source: &'a str,
    starts: &'a [usize],
    context: Context<'static>,
    problems: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

/// Where a value sits, for messages: the scope and the attribute path.
struct At<'s> {
    scope: Option<&'s str>,
    field: String,
}

impl<'a> Parser<'a> {
    fn line(&self, span: Option<Range<usize>>) -> Option<usize> {
        span.map(|span| line_at(self.starts, span.start))
    }

    fn problem(
        &mut self,
        span: Option<Range<usize>>,
        scope: Option<&str>,
        field: &str,
        message: impl Into<String>,
    ) {
        let mut diagnostic = Diagnostic::new(self.path, self.line(span), message).field(field);
        if let Some(scope) = scope {
            diagnostic = diagnostic.scoped(scope);
        }
        self.problems.push(diagnostic);
    }

    fn warning(&mut self, span: Option<Range<usize>>, scope: &str, message: impl Into<String>) {
        self.warnings
            .push(Diagnostic::new(self.path, self.line(span), message).scoped(scope));
    }

    fn job_file(&mut self, body: &Body) -> Option<Job> {
        self.declare_variables(body);
        self.declare_locals(body);
        let jobs: Vec<&Block> = body.get_blocks("job").collect();
        match jobs.as_slice() {
            [] => {
                self.problem(
                    None,
                    None,
                    "",
                    "no job block found; a job file holds one job \"name\" { ... } block",
                );
                None
            }
            [job] => self.job(job),
            [_, second, ..] => {
                self.problem(
                    second.span(),
                    None,
                    "",
                    "more than one job block; a job file holds exactly one",
                );
                None
            }
        }
    }

    /// `variable "x" { default = ... }` blocks become `var.x`.
    fn declare_variables(&mut self, body: &Body) {
        let mut variables = hcl::Map::new();
        for block in body.get_blocks("variable") {
            let Some(name) = block.labels.first().map(|l| l.as_str().to_string()) else {
                self.problem(
                    block.span(),
                    None,
                    "variable",
                    "needs a name: variable \"name\" { ... }",
                );
                continue;
            };
            let value = match block.body.get_attribute("default") {
                Some(default) => {
                    let at = At {
                        scope: None,
                        field: format!("variable \"{name}\".default"),
                    };
                    self.eval(default, &at).unwrap_or(hcl::Value::Null)
                }
                None => {
                    self.problem(
                        block.span(),
                        None,
                        &format!("variable \"{name}\""),
                        "has no default; the local runner takes no -var flags, so give it a default",
                    );
                    hcl::Value::Null
                }
            };
            variables.insert(name, value);
        }
        self.context
            .declare_var("var", hcl::Value::Object(variables));
    }

    /// `locals { ... }` blocks become `local.x`, evaluated in order.
    fn declare_locals(&mut self, body: &Body) {
        let mut locals = hcl::Map::new();
        for block in body.get_blocks("locals") {
            for attribute in block.body.attributes() {
                let at = At {
                    scope: None,
                    field: format!("local.{}", attribute.key.as_str()),
                };
                let value = self.eval(attribute, &at).unwrap_or(hcl::Value::Null);
                locals.insert(attribute.key.as_str().to_string(), value);
                self.context
                    .declare_var("local", hcl::Value::Object(locals.clone()));
            }
        }
        self.context
            .declare_var("local", hcl::Value::Object(locals));
    }

    fn label(&mut self, block: &Block, what: &str) -> Option<String> {
        match block.labels.as_slice() {
            [label] if !label.as_str().is_empty() => Some(label.as_str().to_string()),
            _ => {
                self.problem(
                    block.span(),
                    None,
                    what,
                    format!("needs exactly one name: {what} \"name\" {{ ... }}"),
                );
                None
            }
        }
    }

    fn eval(&mut self, attribute: &Attribute, at: &At<'_>) -> Option<hcl::Value> {
        let expression = hcl::Expression::from(attribute.value.clone());
        match expression.evaluate(&self.context) {
            Ok(value) => Some(value),
            Err(error) => {
                self.problem(
                    attribute.span(),
                    at.scope,
                    &at.field,
                    format!("cannot evaluate: {error}"),
                );
                None
            }
        }
    }

    fn string(&mut self, attribute: &Attribute, at: &At<'_>) -> Option<String> {
        match self.eval(attribute, at)? {
            hcl::Value::String(text) => Some(text),
            other => {
                self.problem(
                    attribute.span(),
                    at.scope,
                    &at.field,
                    format!("must be a string, not {other}"),
                );
                None
            }
        }
    }

    fn int(&mut self, attribute: &Attribute, at: &At<'_>, range: Range<i64>) -> Option<i64> {
        let value = self.eval(attribute, at)?;
        let number = match &value {
            hcl::Value::Number(number) => number.as_i64(),
            // Nomad's HCL decoding converts numeric strings.
            hcl::Value::String(text) => text.trim().parse().ok(),
            _ => None,
        };
        match number {
            Some(number) if range.contains(&number) => Some(number),
            Some(number) => {
                self.problem(
                    attribute.span(),
                    at.scope,
                    &at.field,
                    format!(
                        "{number} is out of range; use {} to {}",
                        range.start,
                        range.end - 1
                    ),
                );
                None
            }
            None => {
                self.problem(
                    attribute.span(),
                    at.scope,
                    &at.field,
                    format!("must be a whole number, not {value}"),
                );
                None
            }
        }
    }

    fn strings(&mut self, attribute: &Attribute, at: &At<'_>) -> Option<Vec<String>> {
        match self.eval(attribute, at)? {
            hcl::Value::Array(items) => {
                let mut strings = Vec::new();
                for item in items {
                    match item {
                        hcl::Value::String(text) => strings.push(text),
                        other => {
                            self.problem(
                                attribute.span(),
                                at.scope,
                                &at.field,
                                format!("must be a list of strings; {other} is not a string"),
                            );
                            return None;
                        }
                    }
                }
                Some(strings)
            }
            other => {
                self.problem(
                    attribute.span(),
                    at.scope,
                    &at.field,
                    format!("must be a list of strings, not {other}"),
                );
                None
            }
        }
    }

    fn job(&mut self, block: &Block) -> Option<Job> {
        let id = self.label(block, "job")?;
        let line = self.line(block.span()).unwrap_or(1);
        let mut job = Job {
            name: id.clone(),
            id,
            region: "global".into(),
            namespace: "default".into(),
            datacenters: vec!["*".into()],
            groups: Vec::new(),
            line,
        };
        let scope = format!("job \"{}\"", job.id);
        let mut names = BTreeSet::new();
        for structure in &block.body {
            match structure {
                Structure::Attribute(attribute) => {
                    let key = attribute.key.as_str();
                    let at = At {
                        scope: Some(&scope),
                        field: key.to_string(),
                    };
                    match key {
                        "name" => job.name = self.string(attribute, &at).unwrap_or(job.name),
                        "region" => job.region = self.string(attribute, &at).unwrap_or(job.region),
                        "namespace" => {
                            job.namespace = self.string(attribute, &at).unwrap_or(job.namespace);
                        }
                        "datacenters" => {
                            if let Some(datacenters) = self.strings(attribute, &at) {
                                job.datacenters = datacenters;
                            }
                        }
                        _ => {}
                    }
                }
                Structure::Block(group) if group.ident.as_str() == "group" => {
                    if let Some(group_value) = self.group(group) {
                        if !names.insert(group_value.name.clone()) {
                            self.problem(
                                group.span(),
                                Some(&scope),
                                "",
                                format!("two groups are named {:?}", group_value.name),
                            );
                        }
                        job.groups.push(group_value);
                    }
                }
                Structure::Block(_) => {}
            }
        }
        if job.groups.is_empty() {
            self.problem(
                block.span(),
                Some(&scope),
                "",
                "has no group blocks; tasks live in group \"name\" { task \"name\" { ... } }",
            );
        }
        Some(job)
    }

    fn group(&mut self, block: &Block) -> Option<Group> {
        let name = self.label(block, "group")?;
        let scope = format!("group \"{name}\"");
        let mut group = Group {
            line: self.line(block.span()).unwrap_or(1),
            name,
            count: 1,
            count_line: None,
            network: None,
            tasks: Vec::new(),
        };
        let mut task_names = BTreeSet::new();
        for structure in &block.body {
            match structure {
                Structure::Attribute(attribute) if attribute.key.as_str() == "count" => {
                    let at = At {
                        scope: Some(&scope),
                        field: "count".into(),
                    };
                    if let Some(count) = self.int(attribute, &at, 0..i64::MAX) {
                        group.count = count as u64;
                        group.count_line = self.line(attribute.span());
                    }
                }
                Structure::Attribute(_) => {}
                Structure::Block(inner) => match inner.ident.as_str() {
                    "network" => {
                        if group.network.is_some() {
                            self.problem(
                                inner.span(),
                                Some(&scope),
                                "network",
                                "only one network block is allowed per group",
                            );
                        } else {
                            group.network = Some(self.network(inner, &scope));
                        }
                    }
                    "task" => {
                        if let Some(task) = self.task(inner) {
                            if !task_names.insert(task.name.clone()) {
                                self.problem(
                                    inner.span(),
                                    Some(&scope),
                                    "",
                                    format!("two tasks are named {:?}", task.name),
                                );
                            }
                            group.tasks.push(task);
                        }
                    }
                    "volume" => self.warning(
                        inner.span(),
                        &scope,
                        "volume blocks are not mounted by the local runner",
                    ),
                    _ => {}
                },
            }
        }
        if group.tasks.is_empty() {
            self.problem(block.span(), Some(&scope), "", "has no task blocks");
        }
        Some(group)
    }

    fn network(&mut self, block: &Block, scope: &str) -> Network {
        let mut network = Network {
            mode: None,
            mode_line: None,
            ports: Vec::new(),
            line: self.line(block.span()).unwrap_or(1),
        };
        let mut labels = BTreeSet::new();
        for structure in &block.body {
            match structure {
                Structure::Attribute(attribute) if attribute.key.as_str() == "mode" => {
                    let at = At {
                        scope: Some(scope),
                        field: "network.mode".into(),
                    };
                    network.mode = self.string(attribute, &at);
                    network.mode_line = self.line(attribute.span());
                }
                Structure::Block(port) if port.ident.as_str() == "port" => {
                    let Some(port) = self.port(port, scope) else {
                        continue;
                    };
                    if !labels.insert(port.label.clone()) {
                        self.problem(
                            block.span(),
                            Some(scope),
                            &format!("network.port \"{}\"", port.label),
                            "is defined twice; port labels must be unique",
                        );
                    }
                    network.ports.push(port);
                }
                _ => {}
            }
        }
        network
    }

    fn port(&mut self, block: &Block, scope: &str) -> Option<PortSpec> {
        let label = self.label(block, "port")?;
        let field = format!("network.port \"{label}\"");
        if crate::config::names::PortLabel::parse(&label).is_err() {
            self.problem(
                block.span(),
                Some(scope),
                &field,
                "is not a valid port label: use letters, digits, '_' and '-'",
            );
        }
        let mut port = PortSpec {
            label,
            static_port: None,
            to: 0,
            host_network: None,
            line: self.line(block.span()).unwrap_or(1),
        };
        for attribute in block.body.attributes() {
            let key = attribute.key.as_str();
            let at = At {
                scope: Some(scope),
                field: format!("{field}.{key}"),
            };
            match key {
                "static" => {
                    port.static_port = self.int(attribute, &at, 1..65536).map(|p| p as u16);
                }
                "to" => port.to = self.int(attribute, &at, -1..65536).unwrap_or(0) as i32,
                "host_network" => port.host_network = self.string(attribute, &at),
                _ => {}
            }
        }
        Some(port)
    }

    fn task(&mut self, block: &Block) -> Option<Task> {
        let name = self.label(block, "task")?;
        let scope = format!("task \"{name}\"");
        let mut task = Task {
            line: self.line(block.span()).unwrap_or(1),
            name,
            driver: None,
            config: None,
            env: Vec::new(),
            resources: Resources::default(),
            kill_timeout: None,
            kill_signal: None,
            user: None,
            artifacts: Vec::new(),
            templates: Vec::new(),
            volume_mounts: Vec::new(),
            volume_mounts_computed: false,
        };
        for structure in &block.body {
            match structure {
                Structure::Attribute(attribute) => {
                    let key = attribute.key.as_str();
                    let at = At {
                        scope: Some(&scope),
                        field: key.to_string(),
                    };
                    match key {
                        "driver" => task.driver = self.string(attribute, &at),
                        "kill_timeout" => {
                            if let Some(text) = self.string(attribute, &at) {
                                match crate::config::units::parse_duration(&text) {
                                    Ok(timeout) => task.kill_timeout = Some(timeout),
                                    Err(error) => self.problem(
                                        attribute.span(),
                                        Some(&scope),
                                        key,
                                        error.to_string(),
                                    ),
                                }
                            }
                        }
                        "kill_signal" => task.kill_signal = self.string(attribute, &at),
                        "user" => task.user = self.string(attribute, &at),
                        _ => {}
                    }
                }
                Structure::Block(inner) => match inner.ident.as_str() {
                    "config" => {
                        if task.config.is_some() {
                            self.problem(
                                inner.span(),
                                Some(&scope),
                                "config",
                                "only one config block is allowed per task",
                            );
                        } else {
                            task.config = Some(self.config_block(inner));
                        }
                    }
                    "env" => {
                        for attribute in inner.body.attributes() {
                            task.env.push(EnvEntry {
                                name: attribute.key.as_str().to_string(),
                                value: hcl::Expression::from(attribute.value.clone()),
                                line: self.line(attribute.span()).unwrap_or(1),
                            });
                        }
                    }
                    "resources" => task.resources = self.resources(inner, &scope),
                    "artifact" => task.artifacts.push(self.artifact(inner)),
                    "template" => task.templates.push(self.template(inner)),
                    "volume_mount" => {
                        match inner
                            .body
                            .get_attribute("destination")
                            .map(|a| hcl::Expression::from(a.value.clone()))
                        {
                            Some(hcl::Expression::String(destination)) => {
                                task.volume_mounts.push(destination);
                            }
                            _ => task.volume_mounts_computed = true,
                        }
                        self.warning(
                            inner.span(),
                            &scope,
                            "volume_mount blocks are not mounted by the local runner",
                        );
                    }
                    _ => {}
                },
            }
        }
        if task.driver.is_none() {
            self.problem(
                block.span(),
                Some(&scope),
                "driver",
                "is required, e.g. driver = \"virt\"",
            );
        }
        Some(task)
    }

    fn config_block(&mut self, block: &Block) -> ConfigBlock {
        // The text between the braces, exactly as written (heredocs and
        // interpolations included), for the plugin-schema encoder.
        let text = block_inner_text(self.source, block);
        ConfigBlock {
            body: block.body.clone(),
            line: self.line(block.span()).unwrap_or(1),
            text,
        }
    }

    fn resources(&mut self, block: &Block, scope: &str) -> Resources {
        let mut resources = Resources {
            line: self.line(block.span()),
            ..Resources::default()
        };
        for attribute in block.body.attributes() {
            let key = attribute.key.as_str();
            let at = At {
                scope: Some(scope),
                field: format!("resources.{key}"),
            };
            match key {
                "cpu" => resources.cpu = self.int(attribute, &at, 1..i64::from(i32::MAX)),
                "memory" => {
                    resources.memory = self.int(attribute, &at, 1..i64::from(i32::MAX));
                    resources.memory_line = self.line(attribute.span());
                }
                "memory_max" => {
                    resources.memory_max = self.int(attribute, &at, 0..i64::from(i32::MAX));
                }
                "cores" => resources.cores = self.int(attribute, &at, 1..4097),
                _ => {}
            }
        }
        if resources.cpu.is_some() && resources.cores.is_some() {
            self.problem(
                block.span(),
                Some(scope),
                "resources",
                "set either cpu or cores, not both",
            );
        }
        if let (Some(memory), Some(max)) = (resources.memory, resources.memory_max) {
            if max != 0 && max < memory {
                self.problem(
                    block.span(),
                    Some(scope),
                    "resources.memory_max",
                    format!("{max} is less than memory ({memory}); raise it or remove it"),
                );
            }
        }
        resources
    }

    fn artifact(&mut self, block: &Block) -> ArtifactSpec {
        let attribute = |name: &str| {
            block
                .body
                .get_attribute(name)
                .map(|a| hcl::Expression::from(a.value.clone()))
        };
        ArtifactSpec {
            source: attribute("source"),
            destination: attribute("destination"),
            mode: attribute("mode"),
            options: block
                .body
                .get_blocks("options")
                .flat_map(|options| options.body.attributes())
                .map(|a| {
                    (
                        a.key.as_str().to_string(),
                        hcl::Expression::from(a.value.clone()),
                    )
                })
                .collect(),
            line: self.line(block.span()).unwrap_or(1),
        }
    }

    fn template(&mut self, block: &Block) -> TemplateSpec {
        let attribute = |name: &str| {
            block
                .body
                .get_attribute(name)
                .map(|a| hcl::Expression::from(a.value.clone()))
        };
        const USED: [&str; 6] = [
            "data",
            "source",
            "destination",
            "perms",
            "left_delimiter",
            "right_delimiter",
        ];
        TemplateSpec {
            data: attribute("data"),
            source: attribute("source"),
            destination: attribute("destination"),
            perms: attribute("perms"),
            left_delimiter: attribute("left_delimiter"),
            right_delimiter: attribute("right_delimiter"),
            ignored: block
                .body
                .attributes()
                .map(|a| a.key.as_str().to_string())
                .chain(block.body.blocks().map(|b| b.ident.as_str().to_string()))
                .filter(|key| !USED.contains(&key.as_str()))
                .collect(),
            line: self.line(block.span()).unwrap_or(1),
        }
    }
}

/// The HCL between a block's braces, exactly as written in `source`
/// (heredocs and interpolations included); re-formatted from the parsed
/// body if the span is unavailable.
pub fn block_inner_text(source: &str, block: &Block) -> String {
    crate::config::client::block_inner_text(source, block)
}

/// Evaluates an expression from the job (an env value, an artifact field)
/// with the task environment, as Nomad interpolates them at run time.
pub fn eval_with_env(
    expression: &hcl::Expression,
    env: &BTreeMap<String, String>,
) -> Result<hcl::Value, String> {
    let env: std::collections::HashMap<String, String> =
        env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let context = crate::nomad_client::interpolation_context(&env);
    expression.evaluate(&context).map_err(|e| e.to_string())
}

/// An env value as Nomad stores it: strings, numbers and bools as text.
pub fn env_value_text(value: &hcl::Value) -> Result<String, String> {
    match value {
        hcl::Value::String(text) => Ok(text.clone()),
        hcl::Value::Number(number) => Ok(number.to_string()),
        hcl::Value::Bool(flag) => Ok(flag.to_string()),
        hcl::Value::Null => Ok(String::new()),
        other => Err(format!("must be a string, number or bool, not {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = r#"variable "mem" {
  default = 512
}

job "web" {
  datacenters = ["dc1"]

  group "g" {
    network {
      port "http" {
        static = 8080
        to     = 80
      }
      port "ssh" {
        to = -1
      }
    }

    task "vm" {
      driver       = "virt"
      kill_timeout = "10s"

      config {
        hostname = "${NOMAD_TASK_NAME}"
        disk {
          source {
            image = "a.qcow2"
          }
        }
        network_interface {
          bridge {
            name  = "virbr0"
            ports = ["http", "ssh"]
          }
        }
      }

      env {
        GREETING = "hi ${NOMAD_TASK_NAME}"
        PORT     = 8080
      }

      resources {
        memory = var.mem
        cores  = 2
      }

      artifact {
        source = "/tmp/x"
      }
    }
  }
}
"#;

    fn parse(text: &str) -> Result<JobFile, Diagnostics> {
        JobFile::parse(Path::new("job.hcl"), text.to_string())
    }

    #[test]
    fn reads_a_job() {
        let file = parse(JOB).expect("parses");
        let job = &file.job;
        assert_eq!(job.id, "web");
        assert_eq!(job.datacenters, ["dc1"]);
        let group = &job.groups[0];
        let network = group.network.as_ref().expect("network");
        assert_eq!(
            network.ports[0],
            PortSpec {
                label: "http".into(),
                static_port: Some(8080),
                to: 80,
                host_network: None,
                line: 10,
            }
        );
        assert_eq!(network.ports[1].to, -1);
        let task = &group.tasks[0];
        assert!(task.is_virt());
        assert_eq!(task.kill_timeout, Some(Duration::from_secs(10)));
        assert_eq!(task.resources.memory, Some(512));
        assert_eq!(task.resources.cores, Some(2));
        assert_eq!(task.env.len(), 2);
        assert_eq!(task.artifacts.len(), 1);
        let config = task.config.as_ref().expect("config");
        assert_eq!(config.line, 23);
        assert!(config.text.contains("hostname = \"${NOMAD_TASK_NAME}\""));
        assert!(hcl::parse(&config.text).is_ok());
        assert_eq!(
            file.line_of_config_field(config, "network_interface[0].bridge.ports[1]"),
            33
        );
        assert_eq!(
            file.line_of_config_field(config, "network_interface[0].bridge.name"),
            32
        );
        assert_eq!(
            file.line_of_config_field(config, "disk[0].source.image"),
            27
        );
        // Missing attributes are reported at their block.
        assert_eq!(file.line_of_config_field(config, "disk[0].size"), 25);
        assert_eq!(file.line_of_config_field(config, "nothing"), 23);
    }

    #[test]
    fn env_values_interpolate() {
        let file = parse(JOB).expect("parses");
        let env = BTreeMap::from([("NOMAD_TASK_NAME".to_string(), "vm".to_string())]);
        let task = &file.job.groups[0].tasks[0];
        let values: Vec<String> = task
            .env
            .iter()
            .map(|entry| {
                env_value_text(&eval_with_env(&entry.value, &env).expect("eval")).expect("text")
            })
            .collect();
        assert_eq!(values, ["hi vm", "8080"]);
    }

    #[test]
    fn problems_have_lines() {
        let broken = "job \"x\" {\n  group \"g\" {\n    count = \"many\"\n    task \"t\" {\n      kill_timeout = \"soon\"\n    }\n  }\n}\n";
        let problems = parse(broken).expect_err("invalid").0;
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|t| t.starts_with("job.hcl:3: group \"g\": count: must be a whole number")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("job.hcl:5: task \"t\": kill_timeout:")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("job.hcl:4: task \"t\": driver: is required")),
            "{text:?}"
        );
        let syntax = parse("job \"x\" {\n  group \"g\" {\n    count = \n").expect_err("syntax");
        assert_eq!(syntax.0[0].line, Some(3), "{syntax}");
        assert!(parse("").expect_err("empty").0[0]
            .message
            .contains("no job block"));
    }

    #[test]
    fn several_blocks_without_index_point_at_the_second() {
        let body = hcl::edit::parser::parse_body("a {}\na {}\n").expect("parse");
        let span = locate(&body, "a").expect("found");
        assert_eq!(span.start, 5);
    }
}
