//! The command-line tools around the plugin: `validate` checks a Nomad job
//! file's virt tasks without libvirt, `run` runs them on this machine through
//! the very plugin interface Nomad's client uses.

pub mod alloc;
pub mod artifact;
pub mod control;
pub mod exec;
pub mod hostnet;
pub mod job;
pub mod run;
pub mod template;
pub mod unpack;
pub mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a job file, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What the problem belongs to, e.g. `task "web"` or `group "vm"`.
    pub scope: Option<String>,
    /// The field path inside the scope, e.g. `network_interface[0].macvtap.mode`.
    pub field: Option<String>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Diagnostic {
    pub fn new(file: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            scope: None,
            field: None,
            message: message.into(),
        }
    }

    pub fn scoped(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        let field = field.into();
        self.field = (!field.is_empty()).then_some(field);
        self
    }
}

/// `text` with control characters escaped (`\u{1b}`), newlines too unless
/// `keep_newlines`: scopes, fields and messages carry names and values from
/// the job, and must not forge lines or move the terminal's cursor.
fn printable(text: &str, keep_newlines: bool) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_control() && !(keep_newlines && c == '\n');
    if !text.chars().any(bad) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if bad(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", printable(&self.file.display().to_string(), false))?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(scope) = &self.scope {
            write!(f, "{}: ", printable(scope, false))?;
        }
        if let Some(field) = &self.field {
            write!(f, "{}: ", printable(field, false))?;
        }
        write!(f, "{}", printable(&self.message, true))
    }
}

/// Every problem found in a job file, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, diagnostic) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

/// The command line when Nomad did not start us (no go-plugin cookie).
#[derive(Debug, clap::Parser)]
#[command(
    name = "nomad-driver-virt",
    version = crate::meta::PLUGIN_VERSION,
    disable_version_flag = true,
    about = "A Nomad task driver that runs virtual machines through libvirt",
    long_about = "A Nomad task driver that runs virtual machines through libvirt.\n\n\
        Nomad starts this binary from its plugin_dir; it is not meant to be run by \
        hand except through these commands."
)]
pub struct Cli {
    /// Print the plugin version.
    #[arg(short = 'v', long = "version", action = clap::ArgAction::Version)]
    version: Option<bool>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the job's virt tasks on this machine's libvirt, as a Nomad client would.
    Run(run::RunArgs),
    /// Check the job's virt tasks without libvirt.
    ///
    /// Checks every driver = "virt" task of each job file against the task
    /// config schema and the driver's validation, without libvirt. A Nomad
    /// client config (plugin blocks, no job) has its plugin
    /// "nomad-driver-virt" block checked instead. Problems are reported as
    /// FILE:LINE: task "NAME": FIELD: MESSAGE; the exit code is 1 if any.
    Validate {
        /// Job files or Nomad client configs.
        #[arg(required = true, value_name = "JOBFILE")]
        files: Vec<PathBuf>,
    },
    /// Run a command in a task's VM, from another terminal than `run`'s.
    ///
    /// Finds the running `nomad-driver-virt run` that owns TASK (through its
    /// private control socket) and runs the command in the guest through the
    /// QEMU guest agent, as `nomad alloc exec` does. The exit code is the
    /// command's; 1 if it could not run.
    Exec(exec::ExecArgs),
    /// Send a signal to a task of a running `run`, as `nomad alloc signal` does.
    Signal(exec::SignalArgs),
    /// Print the plugin version.
    Version,
}

/// `run`'s long flags also work with one dash (`-task web`), as Nomad's own
/// CLI spells flags; clap wants two.
const GO_STYLE_FLAGS: [&str; 4] = ["-plugin-config", "-task", "-state-dir", "-verbose"];

/// Rewrites Go-style single-dash long flags to clap's `--flag`; nothing
/// after `--` (an `exec` command's own arguments) is touched.
pub fn normalize_flags(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut verbatim = false;
    args.into_iter()
        .map(|arg| {
            let name = arg.split_once('=').map_or(arg.as_str(), |(name, _)| name);
            if verbatim {
                arg
            } else if arg == "--" {
                verbatim = true;
                arg
            } else if GO_STYLE_FLAGS.contains(&name) {
                format!("-{arg}")
            } else {
                arg
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// Found by tests/fuzz.rs: task and group labels and map keys a job
    /// spells with HCL escapes reached the terminal raw, so a label could
    /// clear the screen or print a fake "ok" line.
    #[test]
    fn diagnostics_escape_control_characters() {
        let diagnostic = Diagnostic::new(Path::new("job.hcl"), Some(3), "bad\nvalue \u{7}")
            .scoped("task \"\u{1b}[2J\nfake: ok\"")
            .field("signal_commands.\r");
        assert_eq!(
            diagnostic.to_string(),
            "job.hcl:3: task \"\\u{1b}[2J\\nfake: ok\": signal_commands.\\r: bad\nvalue \\u{7}"
        );
    }

    use super::*;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let args = std::iter::once("nomad-driver-virt")
            .chain(args.iter().copied())
            .map(String::from);
        Cli::try_parse_from(normalize_flags(args))
    }

    #[test]
    fn run_arguments() {
        let Some(Command::Run(args)) = parse(&[
            "run",
            "job.hcl",
            "--plugin-config",
            "c.hcl",
            "--task=web",
            "--verbose",
        ])
        .expect("parses")
        .command
        else {
            panic!("not run");
        };
        assert_eq!(
            args,
            run::RunArgs {
                job_file: "job.hcl".into(),
                plugin_config: Some("c.hcl".into()),
                task: Some("web".into()),
                state_dir: run::DEFAULT_STATE_DIR.into(),
                verbose: true,
            }
        );
        let Some(Command::Run(go_style)) =
            parse(&["run", "-task", "web", "-state-dir=/s", "-v", "job.hcl"])
                .expect("parses")
                .command
        else {
            panic!("not run");
        };
        assert_eq!(go_style.task.as_deref(), Some("web"));
        assert_eq!(go_style.state_dir, PathBuf::from("/s"));
        assert!(go_style.verbose);
        for bad in [
            &["run"][..],
            &["run", "a", "b"],
            &["run", "a", "--task"],
            &["run", "a", "--bogus"],
        ] {
            let error = parse(bad).expect_err("usage error");
            assert_eq!(error.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn validate_needs_files_and_version_prints() {
        assert_eq!(parse(&["validate"]).expect_err("no files").exit_code(), 2);
        assert_eq!(
            parse(&["validate", "--strict", "a"])
                .expect_err("flag")
                .exit_code(),
            2
        );
        assert!(matches!(
            parse(&["validate", "a.hcl", "b.hcl"]).expect("parses").command,
            Some(Command::Validate { files }) if files.len() == 2
        ));
        for flag in ["-v", "--version"] {
            let shown = parse(&[flag]).expect_err("version exits");
            assert_eq!(shown.kind(), clap::error::ErrorKind::DisplayVersion);
            assert_eq!(
                shown.to_string().trim(),
                format!("nomad-driver-virt {}", crate::meta::PLUGIN_VERSION)
            );
        }
        assert!(matches!(
            parse(&["version"]).expect("parses").command,
            Some(Command::Version)
        ));
        assert!(parse(&[]).expect("parses").command.is_none());
        let Some(Command::Exec(exec)) = parse(&["exec", "web", "--", "find", "-task"])
            .expect("parses")
            .command
        else {
            panic!("not exec");
        };
        assert_eq!(
            exec.command,
            ["find", "-task"],
            "nothing after -- is rewritten"
        );
        assert!(matches!(
            parse(&["signal", "web", "SIGHUP"]).expect("parses").command,
            Some(Command::Signal(args)) if args.task == "web" && args.signal == "SIGHUP"
        ));
        assert_eq!(parse(&["bogus"]).expect_err("unknown").exit_code(), 2);
    }
}
