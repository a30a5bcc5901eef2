//! The thin edge that runs `iptables`, `iptables-save` and
//! `iptables-restore` (never through a shell: every argument is its own argv
//! entry, batches go on stdin). Everything here is synchronous; call it from
//! a blocking thread.
//!
//! Facts this relies on (iptables 1.8.9, nf_tables backend, verified):
//! - `iptables-restore --noflush` applies each `*table` ... `COMMIT` section
//!   atomically, but commits section by section: when the filter section of
//!   a batch fails, the nat section before it has already been committed.
//!   [`Iptables::apply`] therefore undoes, on failure, the sections that
//!   ended before the line iptables-restore blames (the rules it appended
//!   to shared chains, and the per-task chains it created).
//! - `--test` only parses, so it does not catch rules the kernel rejects.
//! - Deleting by spec is slow as single execs (~14 ms each) but fast in a
//!   restore batch, so removal also goes through one batch.
//! - `iptables -S <chain>` and a restore batch read only the chains they
//!   name (nf_tables backend), while `iptables-save` reads every chain and
//!   costs ~0.3 s per table with 400 tasks installed. Adding and removing a
//!   task therefore never runs `iptables-save`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::rules::{
    base_chains, delete_line_for, find_saved, is_valid_interface_name, our_tables,
    parent_jump_args, parse_save, removal_lines, restore_batch, table_batch, table_lines,
    tables_of, task_removal_batch, validate_rule, validate_tag, BatchOp, IptablesRule, RuleError,
    SavedRule, TASK_CHAINS,
};

/// The lock every plugin process on the host shares, so two plugins (or two
/// threads) never interleave a read-modify-write of the driver's chains.
pub const HOST_LOCK_PATH: &str = "/run/nomad-driver-virt.iptables.lock";

/// How long to wait for the lock before giving up; holders only run a few
/// short iptables commands.
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// What happened to a failed batch's partial effects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollback {
    /// None of the batch had been committed.
    NothingApplied,
    /// Tables committed before the failing one were cleaned up again.
    Undone { rules: usize },
    /// Cleaning up failed: some rules of the batch may remain.
    Failed { reason: String },
    /// No rollback is attempted (removal and init are idempotent; retry).
    NotAttempted,
}

impl fmt::Display for Rollback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rollback::NothingApplied => write!(f, "nothing of the batch was applied"),
            Rollback::Undone { rules } => write!(
                f,
                "{rules} rule(s) already committed from earlier tables were removed again"
            ),
            Rollback::Failed { reason } => write!(
                f,
                "removing the partly applied batch FAILED, rules may remain: {reason}"
            ),
            Rollback::NotAttempted => write!(f, "the operation is idempotent and can be retried"),
        }
    }
}

/// Failures running the iptables binaries.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("invalid network namespace name {0:?}")]
    InvalidNetns(String),
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// Boxed: the details are large and errors travel by value.
    #[error("{0}")]
    Restore(Box<RestoreFailure>),
    /// The `iptables` crate failed; its errors are not `Send`, so the
    /// text is what remains of them.
    #[error("iptables failed while {action}: {message}")]
    Crate { action: String, message: String },
    #[error("lock file {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("gave up after {waited:?} waiting for the lock on {}", path.display())]
    LockTimeout { path: PathBuf, waited: Duration },
}

/// A failed `iptables-restore` batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreFailure {
    pub command: String,
    pub status: String,
    pub stderr: String,
    /// 1-based line of the batch iptables-restore complained about.
    pub line: Option<usize>,
    /// That line's text.
    pub offending: Option<String>,
    pub rollback: Rollback,
}

impl fmt::Display for RestoreFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed ({})", self.command, self.status)?;
        match (self.line, &self.offending) {
            (Some(n), Some(text)) => write!(f, " at batch line {n} `{text}`")?,
            (Some(n), None) => write!(f, " at batch line {n}")?,
            _ => {}
        }
        write!(f, ": {}; {}", self.stderr, self.rollback)
    }
}

/// Runs the iptables binaries on the host or, for tests, inside a network
/// namespace (`ip netns exec <name>` in front of every command).
#[derive(Debug, Clone)]
pub struct Iptables {
    prefix: Vec<String>,
    lock_path: PathBuf,
}

struct Ran {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Holds the exclusive flock; closing the file on drop releases it.
struct LockGuard {
    _file: File,
}

impl Iptables {
    /// The host's own ruleset, locked with [`HOST_LOCK_PATH`].
    pub fn host() -> Self {
        Iptables {
            prefix: Vec::new(),
            lock_path: PathBuf::from(HOST_LOCK_PATH),
        }
    }

    /// The ruleset of network namespace `name`, with a lock file of its own.
    pub fn in_netns(name: &str) -> Result<Self, IptablesError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !valid {
            return Err(IptablesError::InvalidNetns(name.to_string()));
        }
        Ok(Iptables {
            prefix: ["ip", "netns", "exec", name]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            lock_path: PathBuf::from(format!("/run/nomad-driver-virt.iptables.netns-{name}.lock")),
        })
    }

    /// Uses another lock file (tests, or hosts without `/run`).
    pub fn with_lock_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.lock_path = path.into();
        self
    }

    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }

    /// Creates the driver's shared chains and the jumps to them (at
    /// position 1 of their parents) where missing. Idempotent; duplicate
    /// jumps left by anything else are reduced to one. Runs under the lock,
    /// so concurrent plugins cannot both add a jump. Reads only the built-in
    /// parent chains (and a shared chain whose jump is missing), never the
    /// per-task chains, so its cost does not grow with the number of tasks.
    pub fn init(&self) -> Result<(), IptablesError> {
        let _lock = self.lock()?;
        let mut batch = String::new();
        for table in our_tables() {
            let mut lines = Vec::new();
            for (_, chain, parent) in base_chains().into_iter().filter(|(t, ..)| *t == table) {
                let listed = self.list_chain(table, parent)?.unwrap_or_default();
                let jump = parent_jump_args(chain);
                let jumps: Vec<SavedRule> = parse_save(&listed)
                    .into_iter()
                    .filter(|r| r.chain == parent)
                    .collect();
                let count = jumps.iter().filter(|r| r.args == jump).count();
                let first = jumps.first().is_some_and(|r| r.args == jump);
                // A jump proves the chain exists (nf_tables refuses dangling
                // jumps); without one, look. `-N`, not a `:CHAIN`
                // declaration: with --noflush the latter would flush an
                // existing chain, `-N` fails instead.
                if count == 0 && self.list_chain(table, chain)?.is_none() {
                    lines.push(format!("-N {chain}"));
                }
                // Our jump must stay first: libvirt re-inserts its own
                // jumps (with a REJECT for new inbound connections) at the
                // top of FORWARD when its networks restart.
                if count != 1 || !first {
                    let spec = jump.join(" ");
                    for _ in 0..count {
                        lines.push(format!("-D {parent} {spec}"));
                    }
                    lines.push(format!("-I {parent} 1 {spec}"));
                }
            }
            batch.push_str(&table_batch(table, &lines));
        }
        if batch.is_empty() {
            return Ok(());
        }
        tracing::debug!(batch = %batch, "creating iptables chains and jumps");
        self.restore(&batch, Rollback::NotAttempted)
    }

    /// Appends `rules` (all tables) in one `iptables-restore --noflush`
    /// batch, creating the per-task chains they use first. On failure
    /// nothing of the batch stays: `iptables-restore` commits table by
    /// table, so the tables whose section ended before the failing line are
    /// undone again (their jumps deleted, their new chains flushed and
    /// deleted; a `-N` that succeeded proves the chain is ours), and the
    /// error says so. No listing of existing rules is needed either way.
    pub fn apply(&self, rules: &[IptablesRule]) -> Result<(), IptablesError> {
        if rules.is_empty() {
            return Ok(());
        }
        for rule in rules {
            validate_rule(rule)?;
        }
        let tables = tables_of(rules);
        let mut batch = String::new();
        // (table, line number of its COMMIT)
        let mut commits = Vec::new();
        for table in &tables {
            batch.push_str(&table_batch(
                table,
                &table_lines(rules, table, BatchOp::Append),
            ));
            commits.push((*table, batch.lines().count()));
        }

        let _lock = self.lock()?;
        let args = ["-w", "--noflush"];
        let ran = self.run("iptables-restore", &args, Some(&batch))?;
        if ran.status.success() {
            return Ok(());
        }
        let rollback = match failed_line(&ran.stderr) {
            None => Rollback::Failed {
                reason: "iptables-restore did not say which line failed, so it is unknown \
                         which tables were committed; removing the task's tag cleans up"
                    .into(),
            },
            Some(line) => {
                let committed: Vec<IptablesRule> = rules
                    .iter()
                    .filter(|r| {
                        commits
                            .iter()
                            .any(|(t, commit)| *t == r.table && *commit < line)
                    })
                    .cloned()
                    .collect();
                if committed.is_empty() {
                    Rollback::NothingApplied
                } else {
                    tracing::warn!(
                        rules = committed.len(),
                        "iptables-restore committed part of a failed batch; removing it"
                    );
                    let undo = restore_batch(&committed, BatchOp::Delete);
                    match self.restore(&undo, Rollback::NotAttempted) {
                        Ok(()) => Rollback::Undone {
                            rules: committed.len(),
                        },
                        Err(e) => Rollback::Failed {
                            reason: e.to_string(),
                        },
                    }
                }
            }
        };
        Err(restore_error(
            self.describe("iptables-restore", &args),
            &ran,
            &batch,
            rollback,
        ))
    }

    /// Removes everything tagged `tag`: the task's chains and the jumps to
    /// them in one batch that names them exactly (no listing, so the cost
    /// does not depend on how many other tasks are installed). When that
    /// batch fails (nothing there, a removal interrupted half-way, or rules
    /// of the previous layout, which sat directly in the shared chains), the
    /// shared chains are listed and whatever carries the tag is removed.
    /// Returns how many chains and old-layout rules went; a tag with
    /// nothing installed is `Ok(0)`, so removal can always be retried.
    pub fn remove_tag(&self, tag: &str) -> Result<usize, IptablesError> {
        validate_tag(tag)?;
        let _lock = self.lock()?;
        let batch = task_removal_batch(tag);
        let args = ["-w", "--noflush"];
        let ran = self.run("iptables-restore", &args, Some(&batch))?;
        if ran.status.success() {
            return Ok(TASK_CHAINS.len());
        }
        // Sections that ended before the failing line were committed.
        let committed = failed_line(&ran.stderr).map_or(0, |line| {
            let mut count = 0;
            let mut in_section = 0;
            for (index, text) in batch.lines().enumerate() {
                if index + 1 >= line {
                    break;
                }
                if text.starts_with("-X ") {
                    in_section += 1;
                } else if text == "COMMIT" {
                    count += in_section;
                    in_section = 0;
                }
            }
            count
        });
        tracing::debug!(tag, stderr = %ran.stderr.trim(), "removing by listing the shared chains");
        Ok(committed + self.remove_listed(|t| t == tag)?.len())
    }

    /// Deletes exactly `rules` (untagged ones, such as those the Go driver
    /// installed) in one batch. Rules already gone are skipped, so this is
    /// safe to repeat; nothing else is touched. Each is found in
    /// `iptables-save` output (in its printed spelling) and, failing that,
    /// checked with `iptables -C`. Returns how many were deleted.
    pub fn remove_rules(&self, rules: &[IptablesRule]) -> Result<usize, IptablesError> {
        for rule in rules {
            validate_rule(rule)?;
        }
        let mut tables: Vec<&str> = Vec::new();
        for rule in rules {
            if !tables.contains(&rule.table.as_str()) {
                tables.push(&rule.table);
            }
        }
        let _lock = self.lock()?;
        let mut batch = String::new();
        let mut count = 0;
        for table in tables {
            let saved: Vec<SavedRule> = parse_save(&self.save(table)?)
                .into_iter()
                .filter(|r| r.table == table)
                .collect();
            let mut used = vec![false; saved.len()];
            let mut lines: Vec<String> = Vec::new();
            for rule in rules.iter().filter(|r| r.table == table) {
                if let Some(index) = find_saved(rule, &saved, &used) {
                    used[index] = true;
                    lines.push(saved[index].delete_line());
                    continue;
                }
                let line = delete_line_for(rule);
                if !lines.contains(&line) && self.rule_exists(rule)? {
                    lines.push(line);
                }
            }
            count += lines.len();
            batch.push_str(&table_batch(table, &lines));
        }
        if batch.is_empty() {
            return Ok(0);
        }
        tracing::debug!(rules = count, "deleting listed iptables rules");
        self.restore(&batch, Rollback::NotAttempted)?;
        Ok(count)
    }

    /// `iptables -C`: whether the kernel holds a rule equal to `rule`.
    fn rule_exists(&self, rule: &IptablesRule) -> Result<bool, IptablesError> {
        let mut args: Vec<&str> = vec!["-w", "-t", &rule.table, "-C", &rule.chain];
        args.extend(rule.args.iter().map(String::as_str));
        let ran = self.run("iptables", &args, None)?;
        match ran.status.code() {
            Some(0) => Ok(true),
            // "Bad rule (does a matching rule exist in that chain?)".
            Some(1) => Ok(false),
            _ => Err(IptablesError::Command {
                command: self.describe("iptables", &args),
                status: ran.status.to_string(),
                stderr: ran.stderr.trim().to_string(),
            }),
        }
    }

    /// `iptables-save -t <table>` output.
    pub fn save(&self, table: &str) -> Result<String, IptablesError> {
        let ran = self.run("iptables-save", &["-t", table], None)?;
        if !ran.status.success() {
            return Err(IptablesError::Command {
                command: self.describe("iptables-save", &["-t", table]),
                status: ran.status.to_string(),
                stderr: ran.stderr.trim().to_string(),
            });
        }
        Ok(ran.stdout)
    }

    /// Whether `route_localnet` is on for `device` (or for all devices) in
    /// this instance's network namespace. See [`route_localnet_enabled`].
    pub fn route_localnet_enabled(&self, device: &str) -> bool {
        if self.prefix.is_empty() {
            return route_localnet_enabled(device);
        }
        // /proc/sys/net shows the reader's namespace, so read it from inside.
        route_localnet_with(device, |path| {
            self.run("cat", &[path], None)
                .ok()
                .filter(|ran| ran.status.success())
                .map(|ran| ran.stdout)
        })
    }

    /// `iptables -S <chain>` in `table`, or `None` when the chain does not
    /// exist. Only that chain's rules are read.
    pub fn list_chain(&self, table: &str, chain: &str) -> Result<Option<String>, IptablesError> {
        if self.prefix.is_empty() {
            return host_list_chain(table, chain);
        }
        let args = ["-w", "-t", table, "-S", chain];
        let ran = self.run("iptables", &args, None)?;
        if ran.status.success() {
            return Ok(Some(ran.stdout));
        }
        // iptables-nft 1.8.9 says "chain `X' in table `t' is incompatible"
        // for a missing chain; the legacy backend says "No chain/target/match".
        let missing = ["incompatible", "No chain", "does not exist"]
            .iter()
            .any(|m| ran.stderr.contains(m));
        if missing {
            return Ok(None);
        }
        Err(IptablesError::Command {
            command: self.describe("iptables", &args),
            status: ran.status.to_string(),
            stderr: ran.stderr.trim().to_string(),
        })
    }

    /// The rules of the driver's shared chains, each with its table.
    fn shared_chain_rules(&self) -> Result<Vec<SavedRule>, IptablesError> {
        let mut rules = Vec::new();
        for (table, chain, _) in base_chains() {
            let listed = self.list_chain(table, chain)?.unwrap_or_default();
            rules.extend(
                parse_save(&listed)
                    .into_iter()
                    .filter(|r| r.chain == chain)
                    .map(|mut r| {
                        r.table = table.to_string();
                        r
                    }),
            );
        }
        Ok(rules)
    }

    /// Removes, in one batch, what the shared chains hold with a tag
    /// `doomed` accepts (see [`removal_lines`]). The caller holds the lock.
    fn remove_listed(
        &self,
        doomed: impl Fn(&str) -> bool,
    ) -> Result<Vec<SavedRule>, IptablesError> {
        let listed = self.shared_chain_rules()?;
        let mut batch = String::new();
        let mut removed = Vec::new();
        for table in our_tables() {
            let (lines, gone) = removal_lines(&listed, table, &doomed);
            batch.push_str(&table_batch(table, &lines));
            removed.extend(gone);
        }
        if batch.is_empty() {
            return Ok(removed);
        }
        tracing::debug!(rules = removed.len(), "deleting iptables rules and chains");
        self.restore(&batch, Rollback::NotAttempted)?;
        Ok(removed)
    }

    fn restore(&self, batch: &str, rollback: Rollback) -> Result<(), IptablesError> {
        let args = ["-w", "--noflush"];
        let ran = self.run("iptables-restore", &args, Some(batch))?;
        if ran.status.success() {
            return Ok(());
        }
        Err(restore_error(
            self.describe("iptables-restore", &args),
            &ran,
            batch,
            rollback,
        ))
    }

    fn lock(&self) -> Result<LockGuard, IptablesError> {
        let lock_err = |source| IptablesError::Lock {
            path: self.lock_path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.lock_path)
            .map_err(lock_err)?;
        let start = Instant::now();
        loop {
            // std's advisory lock is flock(2) on Unix: shared with other
            // plugin processes on this host.
            match file.try_lock() {
                Ok(()) => return Ok(LockGuard { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(err))
                    if err.kind() == io::ErrorKind::Interrupted => {}
                Err(std::fs::TryLockError::Error(err)) => return Err(lock_err(err)),
            }
            if start.elapsed() >= LOCK_TIMEOUT {
                return Err(IptablesError::LockTimeout {
                    path: self.lock_path.clone(),
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn describe(&self, program: &str, args: &[&str]) -> String {
        let mut parts: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        parts.push(program);
        parts.extend_from_slice(args);
        parts.join(" ")
    }

    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Ran, IptablesError> {
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_err = |source| IptablesError::Spawn {
            command: self.describe(program, args),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let input = child.stdin.take();
        // Feed stdin from another thread so a chatty child cannot deadlock
        // us on a full stderr pipe while we are still writing.
        let (output, write_result) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || match (input, stdin) {
                (Some(mut pipe), Some(text)) => pipe.write_all(text.as_bytes()),
                _ => Ok(()),
            });
            let output = child.wait_with_output();
            let write_result = writer
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("stdin writer panicked")));
            (output, write_result)
        });
        let output = output.map_err(spawn_err)?;
        let ran = Ran {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        // A child that exits early closes its stdin (EPIPE); its own error
        // output says more than the broken pipe, so prefer that.
        if let Err(e) = write_result {
            if ran.status.success() {
                return Err(spawn_err(e));
            }
        }
        Ok(ran)
    }
}

fn restore_error(command: String, ran: &Ran, batch: &str, rollback: Rollback) -> IptablesError {
    let line = failed_line(&ran.stderr);
    let offending = line
        .and_then(|n| n.checked_sub(1))
        .and_then(|i| batch.lines().nth(i))
        .map(str::to_string);
    IptablesError::Restore(Box::new(RestoreFailure {
        command,
        status: ran.status.to_string(),
        stderr: ran.stderr.trim().to_string(),
        line,
        offending,
        rollback,
    }))
}

/// The batch line iptables-restore blames: it prints "Error occurred at
/// line: N" for parse errors and "line N: ..." / "line N failed" for rules
/// the kernel rejected.
/// On the host's own ruleset, the `iptables` crate checks that a chain
/// exists and lists it (`iptables -w -t TABLE -S CHAIN`); changes still go
/// in atomic `iptables-restore` batches.
fn host_list_chain(table: &str, chain: &str) -> Result<Option<String>, IptablesError> {
    let failed = |action: &str, error: Box<dyn std::error::Error>| IptablesError::Crate {
        action: format!("{action} chain {chain} in table {table}"),
        message: error.to_string(),
    };
    let mut ipt = iptables::new(false).map_err(|e| failed("preparing to list", e))?;
    // Numeric: never resolve addresses while checking.
    ipt.set_numeric(true);
    if !ipt
        .chain_exists(table, chain)
        .map_err(|e| failed("checking", e))?
    {
        return Ok(None);
    }
    // `-S` refuses `-n` (and never resolves anyway).
    ipt.set_numeric(false);
    let rules = ipt.list(table, chain).map_err(|e| failed("listing", e))?;
    let mut listing = rules.join("\n");
    listing.push('\n');
    Ok(Some(listing))
}

fn failed_line(stderr: &str) -> Option<usize> {
    let mut words = stderr.split(|c: char| c.is_whitespace() || c == ':');
    while let Some(word) = words.next() {
        if word == "line" {
            if let Some(n) = words
                .by_ref()
                .find(|w| !w.is_empty())
                .and_then(|w| w.parse().ok())
            {
                return Some(n);
            }
        }
    }
    None
}

/// Whether `route_localnet` is on for `device` or for all devices in the
/// host's network namespace (the kernel ORs the two). Loopback forwards
/// need it on the bridge. False for invalid names or unreadable files.
pub fn route_localnet_enabled(device: &str) -> bool {
    route_localnet_with(device, |path| std::fs::read_to_string(path).ok())
}

fn route_localnet_with(device: &str, read: impl Fn(&str) -> Option<String>) -> bool {
    if !is_valid_interface_name(device) {
        return false;
    }
    ["all", device].iter().any(|dev| {
        read(&format!("/proc/sys/net/ipv4/conf/{dev}/route_localnet"))
            .and_then(|value| value.trim().parse::<u32>().ok())
            .is_some_and(|value| value != 0)
    })
}

/// The command that turns `route_localnet` on for `device`, for messages.
/// sysctl writes a dot inside an interface name as '/'; anything that is not
/// valid in an interface name becomes '_' so the text is safe to paste.
pub fn route_localnet_fix(device: &str) -> String {
    let key: String = device
        .chars()
        .map(|c| match c {
            '.' => '/',
            c if c.is_ascii_alphanumeric() || c == '_' || c == '-' => c,
            _ => '_',
        })
        .collect();
    format!("sysctl -w net.ipv4.conf.{key}.route_localnet=1")
}

#[cfg(test)]
mod tests {
    //! Pure parts of the edge. The tests against real iptables in a network
    //! namespace are in tests/iptables_netns.rs.

    use super::*;

    #[test]
    fn route_localnet_ors_all_and_device() {
        let read = |all: &'static str, dev: Option<&'static str>| {
            move |path: &str| {
                if path == "/proc/sys/net/ipv4/conf/all/route_localnet" {
                    Some(all.to_string())
                } else if path == "/proc/sys/net/ipv4/conf/virbr0/route_localnet" {
                    dev.map(String::from)
                } else {
                    None
                }
            }
        };
        assert!(!route_localnet_with("virbr0", read("0\n", Some("0\n"))));
        assert!(route_localnet_with("virbr0", read("0\n", Some("1\n"))));
        assert!(route_localnet_with("virbr0", read("1\n", None)));
        assert!(!route_localnet_with("virbr0", read("0\n", None)));
        assert!(!route_localnet_with("virbr0", read("garbage", Some("x"))));
        assert!(!route_localnet_with("a/../b", read("1\n", Some("1\n"))));
    }

    #[test]
    fn route_localnet_fix_spells_sysctl_keys() {
        assert_eq!(
            route_localnet_fix("virbr0"),
            "sysctl -w net.ipv4.conf.virbr0.route_localnet=1"
        );
        assert_eq!(
            route_localnet_fix("eth0.100"),
            "sysctl -w net.ipv4.conf.eth0/100.route_localnet=1"
        );
        assert_eq!(
            route_localnet_fix("x; rm -rf"),
            "sysctl -w net.ipv4.conf.x__rm_-rf.route_localnet=1"
        );
    }

    #[test]
    fn failed_line_parsing() {
        assert_eq!(
            failed_line("iptables-restore v1.8.9 (nf_tables): \nline 6: RULE_APPEND failed (Invalid argument): rule in chain NOMAD_VT_FW\n"),
            Some(6)
        );
        assert_eq!(
            failed_line("iptables-restore v1.8.9 (nf_tables): Bad IP address \"999.1.1.1\"\nError occurred at line: 2\nTry `iptables-restore -h'"),
            Some(2)
        );
        assert_eq!(
            failed_line("iptables-restore: line 3 failed: Bad rule"),
            Some(3)
        );
        assert_eq!(failed_line("something else"), None);
    }

    #[test]
    fn netns_names_are_validated() {
        for bad in ["", "..", "a b", "x;y", "a/b"] {
            assert!(matches!(
                Iptables::in_netns(bad),
                Err(IptablesError::InvalidNetns(_))
            ));
        }
    }
}
