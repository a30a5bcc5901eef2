//! The command-line tools around the plugin: `validate` checks a Nomad job
//! file's virt tasks without libvirt, `run` runs them on this machine through
//! the very plugin interface Nomad's client uses.

pub mod alloc;
pub mod artifact;
pub mod hostnet;
pub mod job;
pub mod run;
pub mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

/// Logging for the commands: human lines on stderr (no timestamps, colour
/// only on a terminal); `NOMAD_DRIVER_VIRT_LOG_LEVEL` sets the level.
pub fn init_logging() {
    use std::io::IsTerminal as _;
    let level =
        crate::plugin::hclog::env_level().unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .with_max_level(level)
        .try_init();
}

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

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(scope) = &self.scope {
            write!(f, "{scope}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)
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

/// Usage of the `run` command.
pub const RUN_USAGE: &str = "usage: nomad-driver-virt run JOBFILE [--plugin-config FILE] [--task NAME] [--state-dir DIR] [--verbose]

Runs the job's driver = \"virt\" tasks on this machine's libvirt, through the
plugin interface Nomad uses. Ctrl-C stops the VMs (within each task's
kill_timeout) and removes them; the exit code is the task's.

  --plugin-config FILE  a Nomad client config whose plugin \"nomad-driver-virt\"
                        block configures the plugin (default: plugin defaults)
  --task NAME           run only this task
  --state-dir DIR       where allocation directories go
                        (default /var/lib/nomad-driver-virt/run)
  --verbose             also show the plugin's own log lines
";

/// Usage of the `validate` command.
pub const VALIDATE_USAGE: &str = "usage: nomad-driver-virt validate JOBFILE...

Checks every driver = \"virt\" task of each job file against the task config
schema and the driver's validation, without libvirt. A Nomad client config
(plugin blocks, no job) has its plugin \"nomad-driver-virt\" block checked
instead. Problems are reported as FILE:LINE: task \"NAME\": FIELD: MESSAGE;
the exit code is 1 if any.
";
