//! Benchmark: the cost of adding and removing ONE task's port-mapping rules
//! while N other tasks' rules are installed, the driver's way versus the Go
//! original's way (project issue 13, point 5).
//!
//! - ours: `Iptables::apply` (one `iptables-restore --noflush` batch that
//!   creates the task's chains, fills them and adds one jump per chain) and
//!   `Iptables::remove_tag` (one batch deleting exactly those jumps and
//!   chains). Also shown: `Iptables::init`, which the driver runs before
//!   every apply.
//! - Go: the same rules flat in the shared chains, one `iptables -C` plus
//!   one `iptables -A` exec per rule to add, `-C` plus `-D` to remove (what
//!   go-iptables' AppendUnique/DeleteIfExists do in the Go driver).
//!
//! Each task forwards 4 host ports (TCP and UDP each) to its guest. The N
//! other tasks are installed in the layout of the variant being measured.
//!
//! Needs root, iproute2 and iptables. Everything happens in a network
//! namespace of its own (`ndvtest-bench-<pid>`), deleted on exit, on error
//! and on Ctrl-C; the host's ruleset is never touched.
//!
//! ```text
//! cargo run --release --example bench_port_mapping -- [--tasks 0,100,400] [--rounds R] [--short] [--via-ip-netns-exec]
//! ```
//!
//! `--short` (CI) runs N = 0 and 10 with one round: it proves the program
//! and both variants work, it does not time anything meaningfully.
//!
//! By default the process itself enters the namespace (setns), so every
//! exec costs what it costs on a real host. `--via-ip-netns-exec` instead
//! prefixes every command with `ip netns exec <ns>`, which adds a few ms per
//! exec to both variants and so favours the variant with fewer execs.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nomad_driver_virt::net::iptables::rules::{
    is_task_chain, parse_save, restore_batch, BatchOp, TASK_CHAINS,
};
use nomad_driver_virt::net::iptables::{
    port_forward_rules, task_tag, Iptables, IptablesRule, PortForward,
};

/// Set by the SIGINT/SIGTERM handler; the loops check it between execs so
/// the namespace guard's `Drop` gets to run.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Watches for SIGINT/SIGTERM on a thread of its own (tokio's signal
/// handling, no unsafe code) and sets [`INTERRUPTED`].
fn install_signal_handlers() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let Ok(mut terminate) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        });
        INTERRUPTED.store(true, Ordering::SeqCst);
    });
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

const USAGE: &str =
    "usage: bench_port_mapping [--tasks LIST] [--rounds R] [--short] [--via-ip-netns-exec]
  --tasks LIST          other tasks installed, comma-separated (default 0,100,400)
  --rounds R            measured add/remove pairs per N and variant (default 7)
  --short               CI mode: --tasks 0,10 --rounds 1
  --via-ip-netns-exec   run every command through `ip netns exec` (Iptables::in_netns)
                        instead of entering the namespace once";

struct Options {
    tasks: Vec<usize>,
    rounds: usize,
    short: bool,
    via_ip_netns_exec: bool,
}

fn parse_args() -> Result<Option<Options>> {
    let mut options = Options {
        tasks: vec![0, 100, 400],
        rounds: 7,
        short: false,
        via_ip_netns_exec: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<String> {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--tasks" => {
                let text = value("--tasks")?;
                options.tasks = text
                    .split(',')
                    .map(|n| {
                        let n: usize = n.trim().parse().with_context(|| {
                            format!("--tasks {text:?}: {n:?} is not a number\n{USAGE}")
                        })?;
                        // Host ports are 10000 + 4 * index.
                        ensure!(n <= 10_000, "--tasks: at most 10000, not {n}");
                        Ok(n)
                    })
                    .collect::<Result<_>>()?;
            }
            "--rounds" => {
                let text = value("--rounds")?;
                let n: usize = text
                    .parse()
                    .with_context(|| format!("--rounds {text:?} is not a number\n{USAGE}"))?;
                ensure!(
                    (1..=1000).contains(&n),
                    "--rounds must be 1..=1000, not {n}"
                );
                options.rounds = n;
            }
            "--short" => options.short = true,
            "--via-ip-netns-exec" => options.via_ip_netns_exec = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if options.short {
        options.tasks = vec![0, 10];
        options.rounds = 1;
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

    /// Moves the main thread into the namespace, so every command it starts
    /// inherits it. Verified afterwards: carrying on in the
    /// host's namespace would edit the host's firewall.
    fn enter(&self) -> Result<()> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // Only this (the main) thread moves; the commands it starts inherit it.
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .with_context(|| format!("setns into {path}"))?;
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

    /// How many rules the namespace holds, all tables.
    fn rule_count(&self) -> Result<usize> {
        Ok(parse_save(&self.run_strs(&["iptables-save"])?).len())
    }

    /// Empties the nat and filter tables (rules and user chains).
    fn flush_all(&self) -> Result<()> {
        for table in ["nat", "filter"] {
            self.run_strs(&["iptables", "-w", "-t", table, "-F"])?;
            self.run_strs(&["iptables", "-w", "-t", table, "-X"])?;
        }
        Ok(())
    }

    /// Feeds `batch` to `iptables-restore -w --noflush`.
    fn restore(&self, batch: &str) -> Result<()> {
        use std::io::Write as _;
        let mut child = self
            .command("iptables-restore")
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run iptables-restore")?;
        child
            .stdin
            .take()
            .context("iptables-restore stdin")?
            .write_all(batch.as_bytes())
            .context("writing the batch")?;
        let out = child.wait_with_output().context("iptables-restore")?;
        ensure!(
            out.status.success(),
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

/// One task: 4 host ports on 10.0.0.5, TCP and UDP each, to its guest.
fn task_rules(index: usize) -> Result<(String, Vec<IptablesRule>)> {
    let tag = task_tag(&format!("bench-alloc-{index:05}/web/0123abcd"));
    let offset = u32::try_from(index).context("task index too large")?;
    let guest = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 10)) + offset);
    let forwards: Vec<PortForward> = (0..4u16)
        .map(|port| -> Result<PortForward> {
            let host_port = u16::try_from(10_000 + 4 * offset + u32::from(port))
                .context("host port out of range")?;
            Ok(PortForward {
                label: format!("p{port}"),
                host_ip: Ipv4Addr::new(10, 0, 0, 5),
                host_port,
                guest_port: 8000 + port,
            })
        })
        .collect::<Result<_>>()?;
    let rules = port_forward_rules(&tag, guest, "virbr0", &forwards)
        .with_context(|| format!("rules for task {index}"))?;
    Ok((tag, rules))
}

/// The same rules in the Go layout: flat in the shared chains, no jumps.
fn flat(rules: &[IptablesRule]) -> Vec<IptablesRule> {
    rules
        .iter()
        .filter(|r| is_task_chain(&r.table, &r.chain))
        .filter_map(|r| {
            let suffix = r.chain.chars().last()?;
            let (_, shared, _) = TASK_CHAINS.iter().find(|(_, _, s)| *s == suffix)?;
            Some(IptablesRule {
                table: r.table.clone(),
                chain: shared.to_string(),
                args: r.args.clone(),
            })
        })
        .collect()
}

/// The argv the Go driver would exec for one rule.
fn go_argv(rule: &IptablesRule, op: &str) -> Vec<String> {
    let mut argv: Vec<String> = ["iptables", "-w", "-t", &rule.table, op, &rule.chain]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.extend(rule.args.iter().cloned());
    argv
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(slow: Duration, fast: Duration) -> f64 {
    if fast.is_zero() {
        0.0
    } else {
        slow.as_secs_f64() / fast.as_secs_f64()
    }
}

/// Medians for one N.
struct Row {
    tasks: usize,
    ours_add: Duration,
    ours_remove: Duration,
    ours_init: Duration,
    go_add: Duration,
    go_remove: Duration,
    go_rules: usize,
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
    let existing = runner.rule_count()?;
    ensure!(
        existing == 0,
        "namespace {name} already has {existing} rule(s); refusing to run"
    );

    let max = options.tasks.iter().copied().max().unwrap_or(0);
    let mut background = Vec::with_capacity(max);
    for index in 0..max {
        background.push(task_rules(index)?.1);
    }
    let per_task = task_rules(0)?.1;
    println!("port mapping: add and remove one task's rules with N other tasks installed");
    println!(
        "  one task = 4 ports x tcp+udp: ours {} rules in 5 chains of its own (incl. 5 jumps), Go {} flat rules",
        per_task.len(),
        flat(&per_task).len()
    );
    println!(
        "  {} rounds per N, medians; {}; {}",
        options.rounds,
        version.trim(),
        if options.via_ip_netns_exec {
            "commands through `ip netns exec`"
        } else {
            "process inside the namespace"
        }
    );
    if options.short {
        println!("  --short: proves the program works; the figures mean nothing");
    }

    let mut rows = Vec::new();
    for &n in &options.tasks {
        let others = &background[..n];
        let mut ours_add = Vec::new();
        let mut ours_remove = Vec::new();
        let mut ours_init = Vec::new();
        let mut go_add = Vec::new();
        let mut go_remove = Vec::new();

        // Ours: N tasks in per-task chains.
        runner.flush_all()?;
        ipt.init().context("creating the driver's chains")?;
        let all: Vec<IptablesRule> = others.iter().flatten().cloned().collect();
        if !all.is_empty() {
            runner.restore(&restore_batch(&all, BatchOp::Append))?;
        }
        let baseline = runner.rule_count()?;
        for round in 0..options.rounds {
            let (tag, rules) = task_rules(max + round)?;
            ours_init.push(timed(|| Ok(ipt.init()?))?);
            ours_add.push(timed(|| Ok(ipt.apply(&rules)?))?);
            if round == 0 {
                let now = runner.rule_count()?;
                ensure!(
                    now == baseline + rules.len(),
                    "N={n}: apply left {now} rules, expected {}",
                    baseline + rules.len()
                );
            }
            let mut removed = 0;
            ours_remove.push(timed(|| {
                removed = ipt.remove_tag(&tag)?;
                Ok(())
            })?);
            ensure!(
                removed == TASK_CHAINS.len(),
                "N={n}: remove_tag removed {removed} chains"
            );
            if round == 0 {
                let now = runner.rule_count()?;
                ensure!(
                    now == baseline,
                    "N={n}: {now} rules after remove_tag, expected {baseline}"
                );
            }
        }

        // Go: N tasks flat in the shared chains.
        runner.flush_all()?;
        ipt.init().context("creating the driver's chains")?;
        let all: Vec<IptablesRule> = others.iter().flat_map(|r| flat(r)).collect();
        if !all.is_empty() {
            runner.restore(&restore_batch(&all, BatchOp::Append))?;
        }
        let baseline = runner.rule_count()?;
        let mut go_rules = 0;
        for round in 0..options.rounds {
            let rules = flat(&task_rules(max + round)?.1);
            go_rules = rules.len();
            go_add.push(timed(|| {
                for rule in &rules {
                    // AppendUnique: -C (exit 1: missing), then -A.
                    let check = runner
                        .command("iptables")
                        .args(&go_argv(rule, "-C")[1..])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .context("iptables -C")?;
                    ensure!(!check.success(), "rule already present: {:?}", rule.args);
                    runner.run(&go_argv(rule, "-A"))?;
                    check_interrupted()?;
                }
                Ok(())
            })?);
            if round == 0 {
                let now = runner.rule_count()?;
                ensure!(
                    now == baseline + rules.len(),
                    "N={n}: Go add left {now} rules"
                );
            }
            go_remove.push(timed(|| {
                for rule in &rules {
                    // DeleteIfExists: -C, then -D.
                    runner.run(&go_argv(rule, "-C"))?;
                    runner.run(&go_argv(rule, "-D"))?;
                    check_interrupted()?;
                }
                Ok(())
            })?);
            if round == 0 {
                let now = runner.rule_count()?;
                ensure!(now == baseline, "N={n}: {now} rules after the Go removal");
            }
        }
        let row = Row {
            tasks: n,
            ours_add: median(&ours_add),
            ours_remove: median(&ours_remove),
            ours_init: median(&ours_init),
            go_add: median(&go_add),
            go_remove: median(&go_remove),
            go_rules,
        };
        eprintln!(
            "N={n}: ours add {:.1} ms remove {:.1} ms (init {:.1} ms); Go add {:.1} ms remove {:.1} ms",
            ms(row.ours_add),
            ms(row.ours_remove),
            ms(row.ours_init),
            ms(row.go_add),
            ms(row.go_remove)
        );
        rows.push(row);
    }
    runner.flush_all()?;

    println!();
    println!(
        "| N other tasks | ours add ms | ours remove ms | ours init ms | Go add ms ({} execs) | Go remove ms ({} execs) | add: Go/ours | remove: Go/ours | add+remove: Go/ours |",
        rows.first().map_or(0, |r| 2 * r.go_rules),
        rows.first().map_or(0, |r| 2 * r.go_rules),
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}x | {:.1}x | {:.1}x |",
            row.tasks,
            ms(row.ours_add),
            ms(row.ours_remove),
            ms(row.ours_init),
            ms(row.go_add),
            ms(row.go_remove),
            ratio(row.go_add, row.ours_add),
            ratio(row.go_remove, row.ours_remove),
            ratio(row.go_add + row.go_remove, row.ours_add + row.ours_remove),
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        println!();
        println!(
            "ours add+remove at N={} vs N={}: {:.2}x; Go: {:.2}x",
            last.tasks,
            first.tasks,
            ratio(
                last.ours_add + last.ours_remove,
                first.ours_add + first.ours_remove
            ),
            ratio(last.go_add + last.go_remove, first.go_add + first.go_remove),
        );
    }
    Ok(())
}
