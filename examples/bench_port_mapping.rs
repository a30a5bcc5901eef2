//! Benchmark: installing and removing port-forward rules the driver's way
//! (one `iptables-restore` batch per task) versus the Go original's way (one
//! `iptables` exec per rule).
//!
//! Needs root, iproute2 and iptables. Everything happens in a network
//! namespace of its own (`ndvtest-bench-<pid>`), deleted on exit, on error
//! and on Ctrl-C; the host's ruleset is never touched.
//!
//! ```text
//! cargo run --release --example bench_port_mapping -- [--tasks N] [--rounds R] [--via-ip-netns-exec]
//! ```
//!
//! By default the process itself enters the namespace (setns), so every
//! iptables exec costs what it costs on a real host. `--via-ip-netns-exec`
//! instead prefixes every command with `ip netns exec <ns>`
//! ([`Iptables::in_netns`]), which adds a few ms per exec to both variants
//! and so inflates the ratio in favour of the variant with fewer execs.
//!
//! Machines are noisy, so the variants are interleaved within each round
//! (their order alternates between rounds) and the table reports medians
//! over the rounds plus the ratio of those medians.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nomad_driver_virt::net::iptables::rules::{parse_save, SavedRule};
use nomad_driver_virt::net::iptables::{
    base_chains, port_forward_rules, task_tag, Iptables, IptablesRule, PortForward, TAG_PREFIX,
};

/// Set by the SIGINT/SIGTERM handler; the loops check it between execs so
/// the namespace guard's `Drop` gets to run.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

const USAGE: &str = "usage: bench_port_mapping [--tasks N] [--rounds R] [--via-ip-netns-exec]
  --tasks N             tasks, each with 2 forwarded ports = 12 rules (default 50)
  --rounds R            measured rounds, variants interleaved (default 3)
  --via-ip-netns-exec   run every command through `ip netns exec` (Iptables::in_netns)
                        instead of entering the namespace once";

struct Options {
    tasks: usize,
    rounds: usize,
    via_ip_netns_exec: bool,
}

fn parse_args() -> Result<Option<Options>> {
    let mut options = Options {
        tasks: 50,
        rounds: 3,
        via_ip_netns_exec: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str, max: usize| -> Result<usize> {
            let value = args
                .next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))?;
            let n: usize = value
                .parse()
                .with_context(|| format!("{name} {value:?} is not a number\n{USAGE}"))?;
            ensure!((1..=max).contains(&n), "{name} must be 1..={max}, not {n}");
            Ok(n)
        };
        match arg.as_str() {
            // Host ports are 20000+i and 40000+i, so at most 25000 tasks.
            "--tasks" => options.tasks = number("--tasks", 25_000)?,
            "--rounds" => options.rounds = number("--rounds", 1000)?,
            "--via-ip-netns-exec" => options.via_ip_netns_exec = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(options))
}

/// The benchmark's network namespace; deleted (with the lock file) on drop,
/// which also covers errors, panics and Ctrl-C (via [`INTERRUPTED`]).
struct NetnsGuard {
    name: String,
    lock_path: Option<PathBuf>,
}

impl NetnsGuard {
    fn create(name: &str) -> Result<NetnsGuard> {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .with_context(|| {
                format!("cannot run `ip netns add {name}` (is iproute2 installed?)")
            })?;
        ensure!(
            out.status.success(),
            "`ip netns add {name}` failed ({}): {} -- this benchmark needs root",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(NetnsGuard {
            name: name.to_string(),
            lock_path: None,
        })
    }

    /// Moves this (still single-threaded) process into the namespace, so
    /// every child inherits it. Verified afterwards: carrying on in the
    /// host's namespace would edit the host's firewall.
    fn enter(&self) -> Result<()> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: setns on a descriptor we own; no other threads exist yet.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setns into {path}"));
        }
        let want = std::fs::metadata(&path).with_context(|| format!("stat {path}"))?;
        let now = std::fs::metadata("/proc/thread-self/ns/net")
            .context("stat /proc/thread-self/ns/net")?;
        ensure!(
            (want.dev(), want.ino()) == (now.dev(), now.ino()),
            "setns into {path} did not take effect; refusing to touch the host's iptables"
        );
        Ok(())
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // Works from inside the namespace too: it only unmounts the name;
        // the namespace itself goes away when this process exits.
        match Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status()
        {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("warning: `ip netns delete {}` {status}", self.name),
            Err(e) => eprintln!("warning: cannot run `ip netns delete {}`: {e}", self.name),
        }
        if let Some(path) = &self.lock_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs plain commands in the benchmark namespace: either directly (the
/// process is inside it) or through `ip netns exec`.
struct Runner {
    prefix: Vec<String>,
}

impl Runner {
    fn command(&self, program: &str) -> Command {
        match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Runs `argv`, failing with its stderr; returns stdout.
    fn run(&self, argv: &[String]) -> Result<String> {
        let (program, args) = argv.split_first().context("empty command")?;
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {argv:?}"))?;
        ensure!(
            out.status.success(),
            "{} failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run_strs(&self, argv: &[&str]) -> Result<String> {
        self.run(&argv.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// Every rule of the namespace that belongs to the benchmark: anything
    /// in the driver's chains, or tagged with the driver's prefix.
    fn our_rules(&self) -> Result<Vec<SavedRule>> {
        let chains: Vec<&str> = base_chains().into_iter().map(|(_, c, _)| c).collect();
        let save = self.run_strs(&["iptables-save"])?;
        Ok(parse_save(&save)
            .into_iter()
            .filter(|r| {
                chains.contains(&r.chain.as_str())
                    || r.tag.as_deref().is_some_and(|t| t.starts_with(TAG_PREFIX))
            })
            .collect())
    }

    /// Fails loudly unless none of the driver's rules are left.
    fn assert_empty(&self, after: &str) -> Result<()> {
        let left = self.our_rules()?;
        if !left.is_empty() {
            let lines: Vec<&str> = left.iter().take(10).map(|r| r.line.as_str()).collect();
            bail!(
                "{} rule(s) left after {after}, e.g.:\n  {}",
                left.len(),
                lines.join("\n  ")
            );
        }
        Ok(())
    }

    /// Empties the driver's chains (keeps the chains and their jumps).
    fn flush_our_chains(&self) -> Result<()> {
        for (table, chain, _) in base_chains() {
            self.run_strs(&["iptables", "-w", "-t", table, "-F", chain])?;
        }
        Ok(())
    }
}

/// One task's rules: an HTTP port on a host address and an SSH port on
/// loopback, i.e. both shapes `port_forward_rules` produces (12 rules).
fn task_rules(index: usize) -> Result<(String, Vec<IptablesRule>)> {
    let tag = task_tag(&format!("bench-alloc-{index:05}/web/0123abcd"));
    let offset = u16::try_from(index).context("task index too large")?;
    let guest = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 10)) + u32::from(offset));
    let forwards = [
        PortForward {
            label: "http".into(),
            host_ip: Ipv4Addr::new(10, 0, 0, 5),
            host_port: 20_000 + offset,
            guest_port: 80,
        },
        PortForward {
            label: "ssh".into(),
            host_ip: Ipv4Addr::LOCALHOST,
            host_port: 40_000 + offset,
            guest_port: 22,
        },
    ];
    let rules = port_forward_rules(&tag, guest, "virbr0", &forwards)
        .with_context(|| format!("rules for task {index}"))?;
    Ok((tag, rules))
}

/// The argv the Go driver would exec for one rule.
fn naive_argv(rule: &IptablesRule, op: &str) -> Vec<String> {
    let mut argv: Vec<String> = ["iptables", "-w", "-t", &rule.table, op, &rule.chain]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.extend(rule.args.iter().cloned());
    argv
}

/// One timed phase: installs or removes every task's rules.
type Phase<'a> = &'a dyn Fn(&[Task]) -> Result<()>;

struct Task {
    tag: String,
    rules: Vec<IptablesRule>,
    add_argvs: Vec<Vec<String>>,
    delete_argvs: Vec<Vec<String>>,
}

/// Times `f`, checking for Ctrl-C afterwards.
fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    f()?;
    let elapsed = start.elapsed();
    check_interrupted()?;
    Ok(elapsed)
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

fn ratio_text(slow: Duration, fast: Duration) -> String {
    if fast.is_zero() {
        "n/a".to_string()
    } else {
        format!("{:.2}x", slow.as_secs_f64() / fast.as_secs_f64())
    }
}

fn main() -> Result<()> {
    let Some(options) = parse_args()? else {
        return Ok(());
    };
    install_signal_handlers();

    let name = format!("ndvtest-bench-{}", std::process::id());
    let mut guard = NetnsGuard::create(&name)?;
    let (ipt, runner) = if options.via_ip_netns_exec {
        let ipt = Iptables::in_netns(&name)?;
        guard.lock_path = Some(ipt.lock_path().to_path_buf());
        let prefix = ["ip", "netns", "exec", &name].map(String::from).to_vec();
        (ipt, Runner { prefix })
    } else {
        guard.enter()?;
        let lock = std::env::temp_dir().join(format!("{name}.lock"));
        guard.lock_path = Some(lock.clone());
        // Host mode, but the process now lives in the benchmark namespace.
        (
            Iptables::host().with_lock_path(lock),
            Runner { prefix: Vec::new() },
        )
    };
    let version = runner.run_strs(&["iptables", "--version"])?;

    // A fresh namespace has no rules; anything else means we are not where
    // we think we are.
    let existing = parse_save(&runner.run_strs(&["iptables-save"])?);
    ensure!(
        existing.is_empty(),
        "namespace {name} already has {} rule(s); refusing to run",
        existing.len()
    );
    ipt.init().context("creating the driver's chains")?;

    let mut tasks = Vec::with_capacity(options.tasks);
    for index in 0..options.tasks {
        let (tag, rules) = task_rules(index)?;
        let add_argvs = rules.iter().map(|r| naive_argv(r, "-A")).collect();
        let delete_argvs = rules.iter().map(|r| naive_argv(r, "-D")).collect();
        tasks.push(Task {
            tag,
            rules,
            add_argvs,
            delete_argvs,
        });
    }
    let rule_count: usize = tasks.iter().map(|t| t.rules.len()).sum();
    let per_task = tasks.first().map_or(0, |t| t.rules.len());

    println!("port mapping benchmark");
    println!(
        "  {} tasks x {per_task} rules = {rule_count} rules, {} rounds, {}",
        options.tasks,
        options.rounds,
        version.trim()
    );
    println!(
        "  namespace {name}, commands run {}",
        if options.via_ip_netns_exec {
            "through `ip netns exec` (adds its cost to every exec)"
        } else {
            "directly (process entered the namespace)"
        }
    );
    println!();

    let driver_install = |tasks: &[Task]| -> Result<()> {
        for task in tasks {
            ipt.apply(&task.rules)
                .with_context(|| format!("apply {}", task.tag))?;
            check_interrupted()?;
        }
        Ok(())
    };
    let naive_install = |tasks: &[Task]| -> Result<()> {
        for argv in tasks.iter().flat_map(|t| &t.add_argvs) {
            runner.run(argv)?;
            check_interrupted()?;
        }
        Ok(())
    };
    let driver_remove = |tasks: &[Task]| -> Result<()> {
        for task in tasks {
            let removed = ipt
                .remove_tag(&task.tag)
                .with_context(|| format!("remove_tag {}", task.tag))?;
            ensure!(
                removed == task.rules.len(),
                "remove_tag {} removed {removed} rules, expected {}",
                task.tag,
                task.rules.len()
            );
            check_interrupted()?;
        }
        Ok(())
    };
    let naive_remove = |tasks: &[Task]| -> Result<()> {
        for argv in tasks.iter().flat_map(|t| &t.delete_argvs) {
            runner.run(argv)?;
            check_interrupted()?;
        }
        Ok(())
    };

    // (a, b, c, d) durations per round.
    let mut times: [Vec<Duration>; 4] = Default::default();
    let mut reference_ruleset: Option<Vec<String>> = None;
    for round in 0..options.rounds {
        runner.flush_our_chains()?;
        runner.assert_empty("flushing")?;
        // Alternate which variant goes first so drift hits both alike.
        let order: [bool; 2] = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for driver in order {
            let (install, remove): (Phase, Phase) = if driver {
                (&driver_install, &driver_remove)
            } else {
                (&naive_install, &naive_remove)
            };
            let slot = if driver { 0 } else { 1 };
            times[slot].push(timed(|| install(&tasks))?);

            // Both ways must produce the identical ruleset.
            let lines: Vec<String> = runner.our_rules()?.into_iter().map(|r| r.line).collect();
            ensure!(
                lines.len() == rule_count,
                "round {round}: {} rules installed, expected {rule_count}",
                lines.len()
            );
            match &reference_ruleset {
                Some(reference) => ensure!(
                    *reference == lines,
                    "round {round}: the two install variants produced different rulesets"
                ),
                None => reference_ruleset = Some(lines),
            }

            times[slot + 2].push(timed(|| remove(&tasks))?);
            let variant = if driver { "remove_tag" } else { "iptables -D" };
            runner.assert_empty(&format!("round {round} {variant}"))?;
        }
        eprintln!(
            "round {}/{}: a {:.3}s  b {:.3}s  c {:.3}s  d {:.3}s",
            round + 1,
            options.rounds,
            times[0][round].as_secs_f64(),
            times[1][round].as_secs_f64(),
            times[2][round].as_secs_f64(),
            times[3][round].as_secs_f64(),
        );
    }

    let medians: Vec<Duration> = times.iter().map(|t| median(t)).collect();
    let labels = [
        ("install", "(a) driver: 1 apply batch per task"),
        ("install", "(b) naive: 1 `iptables -A` per rule"),
        ("remove", "(c) driver: 1 remove_tag per task"),
        ("remove", "(d) naive: 1 `iptables -D` per rule"),
    ];
    println!(
        "{:<8} {:<38} {:>10} {:>10} {:>10} {:>12} {:>11}",
        "op", "variant", "median s", "min s", "max s", "ms per task", "rules/s"
    );
    println!("{}", "-".repeat(104));
    for (i, (op, variant)) in labels.iter().enumerate() {
        let med = medians[i];
        let min = times[i].iter().min().copied().unwrap_or_default();
        let max = times[i].iter().max().copied().unwrap_or_default();
        let rules_per_sec = if med.is_zero() {
            0.0
        } else {
            rule_count as f64 / med.as_secs_f64()
        };
        println!(
            "{op:<8} {variant:<38} {:>10.3} {:>10.3} {:>10.3} {:>12.2} {:>11.0}",
            med.as_secs_f64(),
            min.as_secs_f64(),
            max.as_secs_f64(),
            med.as_secs_f64() * 1000.0 / options.tasks as f64,
            rules_per_sec
        );
    }
    println!();
    println!(
        "speed-up install  (b / a): {}",
        ratio_text(medians[1], medians[0])
    );
    println!(
        "speed-up removal  (d / c): {}",
        ratio_text(medians[3], medians[2])
    );
    println!(
        "speed-up total    (b+d) / (a+c): {}",
        ratio_text(medians[1] + medians[3], medians[0] + medians[2])
    );
    println!("(ratios of the medians over {} rounds)", options.rounds);
    Ok(())
}
