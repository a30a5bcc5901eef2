//! `nomad-driver-virt run` end to end, as a user runs it: the hello example
//! boots on the real libvirtd + QEMU (TCG) with the tiny test guest, its page
//! answers through the mapped host port, Ctrl-C (SIGINT) stops and removes
//! everything, and the exit code is the task's. Also: failed starts and a
//! guest that powers itself off leave nothing behind, and jobs the local
//! runner cannot run are refused before anything is created, and `exec` /
//! `signal` reach a running task through `run`'s control socket.
//!
//! Everything the tests create is named "ndvtest" so tests/ci.sh's leftover
//! check sees it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::vm;

const BOOT_LIMIT: Duration = Duration::from_secs(240);
const STOP_LIMIT: Duration = Duration::from_secs(60);
/// Shared parents of chained disks stay in the pool by design.
const SHARED_PARENT_PREFIX: &str = "nomad-virt-base-";

/// A running `nomad-driver-virt run`, its output collected line by line.
struct Runner {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn collect(pipe: impl Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            sink.lock().expect("lock").push(line);
        }
    });
}

impl Runner {
    fn spawn(args: &[&str]) -> Runner {
        Runner::spawn_with_env(args, &[])
    }

    fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Runner {
        let mut child = Command::new(common::plugin_binary())
            .arg("run")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nomad-driver-virt run");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().expect("stdout"), stdout.clone());
        collect(child.stderr.take().expect("stderr"), stderr.clone());
        Runner {
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout.lock().expect("lock").join("\n"),
            self.stderr.lock().expect("lock").join("\n")
        )
    }

    /// Waits for a stdout line containing `marker`; fails loudly with the
    /// output on a timeout or an early exit.
    fn wait_for(&mut self, marker: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let found = self
                .stdout
                .lock()
                .expect("lock")
                .iter()
                .find(|line| line.contains(marker))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(300));
                panic!(
                    "runner exited ({status}) before printing {marker:?}\n{}",
                    self.output()
                );
            }
            if start.elapsed() > limit {
                panic!(
                    "runner did not print {marker:?} within {limit:?}\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill -INT");
        assert!(status.success(), "kill -INT failed");
    }

    /// Waits for the runner to exit; its exit code.
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                std::thread::sleep(Duration::from_millis(300));
                return status.code();
            }
            if start.elapsed() > limit {
                panic!("runner did not exit within {limit:?}\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Runner {
    /// A failed test still stops the VM: Ctrl-C, then SIGKILL.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.interrupt();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(90) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A private storage pool and plugin config in a tempdir, removed on drop.
struct Setup {
    dir: tempfile::TempDir,
    pool_name: String,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("ndvtest-run-")
            .tempdir()
            .expect("tempdir");
        // QEMU (libvirt-qemu) must reach the pool below it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::create_dir_all(dir.path().join("pool")).expect("mkdir pool");
        let setup = Setup {
            dir,
            pool_name: vm::unique("ndvtest-run-pool-"),
        };
        let config = format!(
            r#"# A Nomad client config, as --plugin-config takes it.
plugin_dir = "/opt/nomad/plugins"

plugin "nomad-driver-virt" {{
  config {{
    image_paths = ["{guest_dir}"]
    accelerator = "tcg"
    storage_pools {{
      directory "{}" {{
        path = "{}"
      }}
    }}
  }}
}}
"#,
            setup.pool_name,
            setup.dir.path().join("pool").display(),
            guest_dir = vm::guest_dir().display(),
        );
        std::fs::write(setup.client_config(), config).expect("write client config");
        setup
    }

    fn client_config(&self) -> PathBuf {
        self.dir.path().join("client.hcl")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn write_job(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write job");
        path
    }

    /// Volumes of this run (shared parents of chained disks excepted).
    fn task_volumes(&self) -> Vec<String> {
        vm::pool_volumes(&self.pool_name)
            .into_iter()
            .filter(|volume| !volume.starts_with(SHARED_PARENT_PREFIX))
            .collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let virsh = |args: &[&str]| {
            let _ = Command::new("virsh")
                .args(["-q", "-c", "qemu:///system"])
                .args(args)
                .output();
        };
        for volume in vm::pool_volumes(&self.pool_name) {
            virsh(&["vol-delete", "--pool", &self.pool_name, &volume]);
        }
        virsh(&["pool-destroy", &self.pool_name]);
        virsh(&["pool-undefine", &self.pool_name]);
    }
}

/// The hello example with test names (task and guest hostname `name`: the
/// driver reserves DHCP leases by hostname, and CI's leftover check looks
/// for "ndvtest") and, so parallel runs cannot collide, a dynamic host port
/// instead of the static 8080.
fn hello_job(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/jobs/hello.nomad.hcl");
    let mut job = std::fs::read_to_string(path).expect("read the hello example");
    for (from, to) in [
        ("job \"hello\"", "job \"ndvtest-run\"".to_string()),
        ("task \"hello\"", format!("task \"{name}\"")),
        ("hostname = \"hello-vm\"", format!("hostname = \"{name}\"")),
        ("        static = 8080\n", String::new()),
    ] {
        assert!(
            job.contains(from),
            "the hello example changed: {from:?} not found"
        );
        job = job.replacen(from, &to, 1);
    }
    job
}

fn domain_names() -> Vec<String> {
    let output = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "list", "--all", "--name"])
        .output()
        .expect("virsh list");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect()
}

/// Whether libvirt's default network still holds a DHCP reservation for `hostname`.
fn dhcp_reservation_exists(hostname: &str) -> bool {
    let output = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "net-dumpxml", "default"])
        .output()
        .expect("virsh net-dumpxml");
    String::from_utf8_lossy(&output.stdout).contains(&format!("name='{hostname}'"))
}

/// `GET /` over plain HTTP/1.0; the body.
fn http_get(host_port: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(
        &host_port
            .parse()
            .map_err(|e| format!("bad address {host_port}: {e}"))?,
        Duration::from_secs(5),
    )
    .map_err(|e| format!("connect {host_port}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: ndvtest\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    if !response.starts_with("HTTP/1.") || !response.contains(" 200 ") {
        return Err(format!("not a 200 response: {response:?}"));
    }
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

/// The text after `prefix` on the first line that has it.
fn after<'a>(line: &'a str, prefix: &str) -> &'a str {
    line.split_once(prefix)
        .map(|(_, rest)| rest.trim())
        .unwrap_or_else(|| panic!("{prefix:?} not in {line:?}"))
}

#[test]
fn hello_job_serves_its_page_and_ctrl_c_removes_everything() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let setup = Setup::new();
    let job = setup.write_job("hello.nomad.hcl", &hello_job("ndvtest-hello"));
    let started_at = Instant::now();
    let mut runner = Runner::spawn(&[
        job.to_str().expect("utf-8 path"),
        "--plugin-config",
        setup.client_config().to_str().expect("utf-8 path"),
    ]);

    let alloc_dir = PathBuf::from(after(
        &runner.wait_for("    alloc dir: ", Duration::from_secs(30)),
        "alloc dir:",
    ));
    assert!(
        alloc_dir.starts_with("/var/lib/nomad-driver-virt/run"),
        "default state dir: {}",
        alloc_dir.display()
    );
    let domain = after(
        &runner.wait_for("==> Started VM ", BOOT_LIMIT),
        "==> Started VM",
    )
    .to_string();
    assert!(domain.starts_with("ndvtest-hello-"), "{domain}");
    assert!(vm::domain_exists(&domain), "domain {domain} is defined");
    assert!(alloc_dir.join("ndvtest-hello/local").is_dir());
    assert!(alloc_dir.join("ndvtest-hello/secrets").is_dir());

    runner.wait_for("GUEST-READY", BOOT_LIMIT);
    let boot = started_at.elapsed();
    let stdout = runner.output();
    assert!(stdout.contains("GUEST-HOSTNAME: ndvtest-hello"), "{stdout}");
    assert!(
        stdout.contains("==> Preparing disks") && stdout.contains("==> Starting VM"),
        "task events are shown as they happen:\n{stdout}"
    );
    assert!(
        !stdout.contains("\"@level\""),
        "no plugin JSON without --verbose:\n{stdout}"
    );

    // `http: http://<host ip>:<port>/ -> guest <ip>:8080`
    let mapping = runner.wait_for("    http: http://", Duration::from_secs(5));
    let url = after(&mapping, "http: http://");
    let (host_port, guest) = url
        .split_once("/ -> guest ")
        .unwrap_or_else(|| panic!("unexpected port line {mapping:?}"));
    assert!(guest.ends_with(":8080"), "{mapping}");
    assert!(
        !guest.starts_with('?'),
        "the guest IP is reported: {mapping}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        match http_get(host_port) {
            Ok(body) => break body,
            Err(error) if Instant::now() > deadline => panic!(
                "the page does not answer on the mapped port {host_port}: {error}\n{}",
                runner.output()
            ),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    };
    assert!(
        body.contains("Hello from ndvtest-hello, a Nomad VM"),
        "page body: {body:?}"
    );

    // Whatever the driver put on the host for the guest's address must go
    // with it (checked below); note whether it reserved one, for the log.
    let reserved = dhcp_reservation_exists("ndvtest-hello");

    runner.interrupt();
    let stop_started = Instant::now();
    let code = runner.wait_exit(STOP_LIMIT);
    let output = runner.output();
    assert_eq!(code, Some(0), "exit code after Ctrl-C\n{output}");
    assert!(
        output.contains("==> Stopping task \"ndvtest-hello\" (kill_timeout 10s;"),
        "{output}"
    );
    assert!(
        output.contains("==> Task \"ndvtest-hello\" exited: exit code 0"),
        "{output}"
    );
    assert!(
        !domain_names().contains(&domain),
        "domain {domain} left behind"
    );
    assert_eq!(
        setup.task_volumes(),
        Vec::<String>::new(),
        "volumes left in {}",
        setup.pool_name
    );
    assert!(
        !alloc_dir.exists(),
        "alloc dir {} left behind",
        alloc_dir.display()
    );
    let rules = Command::new("iptables-save")
        .output()
        .expect("iptables-save");
    let alloc_id = alloc_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains(&alloc_id),
        "port-mapping rules of {alloc_id} left behind"
    );
    assert!(
        !dhcp_reservation_exists("ndvtest-hello"),
        "DHCP reservation left behind"
    );
    eprintln!(
        "booted to GUEST-READY in {boot:?}; stopped and removed in {:?}; DHCP reservation while running: {reserved}",
        stop_started.elapsed()
    );
}

#[test]
fn a_failed_start_leaves_nothing_behind() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let setup = Setup::new();
    let job = setup.write_job(
        "missing-image.nomad.hcl",
        &hello_job("ndvtest-hello").replace("\"guest.qcow2\"", "\"ndvtest-no-such-image.qcow2\""),
    );
    let state_dir = setup.state_dir();
    let mut runner = Runner::spawn(&[
        job.to_str().expect("utf-8 path"),
        "--plugin-config",
        setup.client_config().to_str().expect("utf-8 path"),
        "--state-dir",
        state_dir.to_str().expect("utf-8 path"),
    ]);
    let code = runner.wait_exit(Duration::from_secs(120));
    let output = runner.output();
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("task \"ndvtest-hello\" failed to start")
            && output.contains("disk[0].source.image"),
        "the driver's reason is shown:\n{output}"
    );
    assert!(
        !domain_names()
            .iter()
            .any(|d| d.starts_with("ndvtest-hello-")),
        "a domain was left behind"
    );
    assert_eq!(setup.task_volumes(), Vec::<String>::new());
    let leftovers: Vec<_> = std::fs::read_dir(&state_dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "alloc dirs left: {leftovers:?}");
}

#[test]
fn a_guest_that_powers_off_ends_the_run_with_its_exit_code() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let setup = Setup::new();
    let job = hello_job("ndvtest-poweroff").replace(
        "        cmds = [\n",
        // In the background, so the guest reaches GUEST-READY first.
        "        cmds = [\n          \"(sleep 5; poweroff -f) &\",\n",
    );
    assert!(job.contains("poweroff -f"), "cmds rewritten");
    let job = setup.write_job("poweroff.nomad.hcl", &job);
    let state_dir = setup.state_dir();
    let mut runner = Runner::spawn(&[
        job.to_str().expect("utf-8 path"),
        "--plugin-config",
        setup.client_config().to_str().expect("utf-8 path"),
        "--state-dir",
        state_dir.to_str().expect("utf-8 path"),
    ]);
    let domain = after(
        &runner.wait_for("==> Started VM ", BOOT_LIMIT),
        "==> Started VM",
    )
    .to_string();
    runner.wait_for("GUEST-READY", BOOT_LIMIT);
    let code = runner.wait_exit(Duration::from_secs(60));
    let output = runner.output();
    assert_eq!(code, Some(0), "a guest poweroff is a clean exit\n{output}");
    assert!(
        output.contains("==> Task \"ndvtest-poweroff\" exited: exit code 0"),
        "{output}"
    );
    assert!(!output.contains("==> Stopping task"), "{output}");
    assert!(!domain_names().contains(&domain), "domain left behind");
    assert_eq!(setup.task_volumes(), Vec::<String>::new());
    assert!(std::fs::read_dir(&state_dir)
        .map(|mut entries| entries.next().is_none())
        .unwrap_or(true));
}

/// Child processes of `pid` (from /proc, so no extra tools are needed).
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "<pid> (<comm>) <state> <ppid> ...": comm may contain spaces.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if parent == Some(pid) {
            children.push(child);
        }
    }
    children
}

#[test]
fn a_plugin_crash_still_leaves_nothing_behind() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let setup = Setup::new();
    let job = setup.write_job("crash.nomad.hcl", &hello_job("ndvtest-crash"));
    let state_dir = setup.state_dir();
    let mut runner = Runner::spawn(&[
        job.to_str().expect("utf-8 path"),
        "--plugin-config",
        setup.client_config().to_str().expect("utf-8 path"),
        "--state-dir",
        state_dir.to_str().expect("utf-8 path"),
    ]);
    let domain = after(
        &runner.wait_for("==> Started VM ", BOOT_LIMIT),
        "==> Started VM",
    )
    .to_string();
    runner.wait_for("==> Following the console", Duration::from_secs(10));
    let plugins = children_of(runner.child.id());
    assert_eq!(plugins.len(), 1, "the runner has one child, the plugin");
    let status = Command::new("kill")
        .args(["-KILL", &plugins[0].to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    // The runner notices, removes the VM through a fresh plugin (RecoverTask
    // from the handle, then DestroyTask) and fails.
    let code = runner.wait_exit(STOP_LIMIT);
    let output = runner.output();
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("the plugin stopped answering")
            && output.contains("through a fresh plugin"),
        "{output}"
    );
    assert!(
        !domain_names().contains(&domain),
        "domain left behind\n{output}"
    );
    assert!(
        !dhcp_reservation_exists("ndvtest-crash"),
        "DHCP reservation left behind"
    );
    assert_eq!(setup.task_volumes(), Vec::<String>::new());
    assert!(std::fs::read_dir(&state_dir)
        .map(|mut entries| entries.next().is_none())
        .unwrap_or(true));
}

/// Runs `run` on a job the local runner refuses; returns (exit code, stderr).
fn refused(job: &str, extra: &[&str]) -> (Option<i32>, String, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("ndvtest-run-refused-")
        .tempdir()
        .expect("tempdir");
    let path = dir.path().join("job.nomad.hcl");
    std::fs::write(&path, job).expect("write");
    let state_dir = dir.path().join("state");
    let output = Command::new(common::plugin_binary())
        .arg("run")
        .arg(&path)
        .arg("--state-dir")
        .arg(&state_dir)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(
        !state_dir.exists(),
        "nothing may be created for a refused job"
    );
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        path,
    )
}

#[test]
fn jobs_the_local_runner_cannot_run_are_refused_before_anything_starts() {
    let job = hello_job("ndvtest-hello");
    let remote = job.replace(
        "      kill_timeout = \"10s\"\n",
        "      kill_timeout = \"10s\"\n\n      artifact {\n        source = \"git::https://example.com/site.git\"\n      }\n",
    );
    assert!(remote.contains("artifact"));
    let (code, stderr, _) = refused(&remote, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("artifact source git::https://example.com/site.git is not supported by the local runner; fetch it yourself and use a local path"),
        "{stderr}"
    );
    if !cfg!(feature = "https") {
        let https = remote.replace(
            "git::https://example.com/site.git",
            "https://example.com/site.tgz",
        );
        let (code, stderr, _) = refused(&https, &[]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains("was built without HTTPS support (cargo feature \"https\")"),
            "{stderr}"
        );
    }

    let counted = job.replace(
        "  group \"hello\" {\n",
        "  group \"hello\" {\n    count = 2\n",
    );
    let (code, stderr, path) = refused(&counted, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:12: group \"hello\": count: is 2; the local runner runs one allocation per group",
            path.display()
        )),
        "{stderr}"
    );

    let (code, stderr, _) = refused(&job, &["--task", "nope"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("no virt task named \"nope\"; the job's virt tasks are: ndvtest-hello"),
        "{stderr}"
    );

    let invalid = job.replace(
        "hostname = \"ndvtest-hello\"",
        "hostname = 5\n        hostnme = 1",
    );
    let (code, stderr, path) = refused(&invalid, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:23: task \"ndvtest-hello\": hostnme:",
            path.display()
        )),
        "config problems are reported with their line before anything starts: {stderr}"
    );

    let (code, stderr, _) = refused(&job, &["--plugin-config", "/nonexistent/client.hcl"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read the plugin config /nonexistent/client.hcl"),
        "{stderr}"
    );

    let usage = Command::new(common::plugin_binary())
        .args(["run", "--bogus"])
        .output()
        .expect("run");
    assert_eq!(usage.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&usage.stderr);
    assert!(
        stderr.contains("unexpected argument '--bogus'")
            && stderr.contains("Usage: nomad-driver-virt run"),
        "{stderr}"
    );
}

/// Runs `nomad-driver-virt ARGS` with `stdin` against `runner`; (exit
/// code, stdout, stderr). A hang fails with the runner's output (with
/// --verbose, the plugin's log too).
fn cli(runner: &Runner, args: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    program(runner, &common::plugin_binary(), args, stdin)
}

/// Runs `program ARGS` with `stdin`; (exit code, stdout, stderr).
fn program(
    runner: &Runner,
    program: &Path,
    args: &[&str],
    stdin: &[u8],
) -> (Option<i32>, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nomad-driver-virt");
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_vec();
    std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let output = result
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| {
            panic!(
                "{program:?} {args:?} did not finish within 120 s\n{}",
                runner.output()
            )
        })
        .expect("output");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Issue 10 point 6: `exec` and `signal` from another terminal reach the
/// task of a running `run` through its private control socket: exit codes
/// and stderr, stdin with -i, a TTY with -t, a mapped signal whose effect
/// shows in the guest, an unknown task; the socket directory is private
/// and goes away with the run.
#[test]
fn exec_and_signal_reach_a_running_task_through_the_control_socket() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let setup = Setup::new();
    let name = "ndvtest-ctl";
    let job = hello_job(name).replace(
        &format!("hostname = \"{name}\"\n"),
        &format!(
            "hostname = \"{name}\"\n        signal_commands = {{\n          SIGHUP = \"echo reloaded > /run/ndvtest-hup\"\n        }}\n"
        ),
    );
    assert!(job.contains("signal_commands"), "job rewritten");
    let job = setup.write_job("ctl.nomad.hcl", &job);
    // A busy CI machine boots TCG guests slowly.
    let config = std::fs::read_to_string(setup.client_config()).expect("read config");
    assert!(config.contains("accelerator = \"tcg\"\n"), "{config}");
    std::fs::write(
        setup.client_config(),
        config.replace(
            "accelerator = \"tcg\"\n",
            "accelerator = \"tcg\"\n    dhcp_timeout = \"5m\"\n",
        ),
    )
    .expect("write config");
    let state_dir = setup.state_dir();
    let mut runner = Runner::spawn(&[
        job.to_str().expect("utf-8 path"),
        "--plugin-config",
        setup.client_config().to_str().expect("utf-8 path"),
        "--state-dir",
        state_dir.to_str().expect("utf-8 path"),
        // The plugin's log in the output a failure shows.
        "--verbose",
    ]);
    let socket = PathBuf::from(
        after(
            &runner.wait_for("==> Control socket ", Duration::from_secs(60)),
            "==> Control socket",
        )
        .split(" (")
        .next()
        .expect("path")
        .to_string(),
    );
    let control_dir = socket.parent().expect("dir").to_path_buf();
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(&control_dir).expect("control dir");
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o777, 0o700, "private control dir");
        assert_eq!(meta.uid(), 0, "root's");
        assert_eq!(
            control_dir.file_name().and_then(|n| n.to_str()),
            Some(runner.child.id().to_string().as_str())
        );
    }
    let how = runner.wait_for("    exec into it: ", BOOT_LIMIT);
    assert!(
        how.ends_with(&format!(" exec -i -t {name} -- /bin/sh")),
        "{how}"
    );
    runner.wait_for("    signal it:    ", Duration::from_secs(5));

    // The agent answers once the guest has booted.
    let booted = Instant::now();
    loop {
        let (code, _, stderr) = cli(&runner, &["exec", name, "--", "true"], b"");
        if code == Some(0) {
            break;
        }
        // Twice the boot limit: the agent starts late on a busy machine.
        assert!(
            booted.elapsed() < 2 * BOOT_LIMIT,
            "exec never worked: {stderr}\n{}",
            runner.output()
        );
        assert!(
            stderr.contains("qemu-guest-agent"),
            "only the agent may be missing while booting: {stderr}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }

    // Exit code, stdout and stderr apart.
    let (code, stdout, stderr) = cli(
        &runner,
        &[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ],
        b"",
    );
    assert_eq!(
        (code, stdout.as_str(), stderr.as_str()),
        (Some(7), "out\n", "err\n")
    );
    // Without -i the command reads an empty stdin.
    let (code, stdout, _) = cli(&runner, &["exec", name, "--", "cat"], b"ignored\n");
    assert_eq!((code, stdout.as_str()), (Some(0), ""));
    // -i: stdin goes to the command, line by line, then EOF.
    let (code, stdout, stderr) = cli(
        &runner,
        &[
            "exec",
            "-i",
            name,
            "--",
            "sh",
            "-c",
            "while read l; do echo \"got:$l\"; done; echo eof >&2",
        ],
        b"one\ntwo\n",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "got:one\ngot:two\n");
    assert_eq!(stderr, "eof\n");
    // -t: a terminal in the guest (this stdin is no terminal: 24x80).
    let (code, stdout, stderr) = cli(
        &runner,
        &["exec", "-t", name, "--", "sh", "-c", "tty; stty size"],
        b"",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("/dev/pts/") && stdout.contains("24 80"),
        "{stdout:?}"
    );
    let (code, _, stderr) = cli(&runner, &["exec", "-i", "-t", name, "--", "true"], b"");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("needs a terminal on stdin"), "{stderr}");
    // -i -t on a real terminal (util-linux `script` makes one): the local
    // terminal goes raw, typed input reaches the guest's terminal, and the
    // exit code comes back.
    let typed = format!(
        "{} exec -i -t {name} -- sh -c 'read x; echo \"got-$x\"; exit 3'",
        common::plugin_binary().display()
    );
    let (code, stdout, stderr) = program(
        &runner,
        Path::new("script"),
        &["-qec", &typed, "/dev/null"],
        b"hello\n",
    );
    assert_eq!(code, Some(3), "{stdout}\n{stderr}");
    assert!(stdout.contains("got-hello"), "{stdout:?}");

    // A mapped signal runs its command in the guest.
    let (code, _, stderr) = cli(&runner, &["signal", name, "SIGHUP"], b"");
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stdout, _) = cli(
        &runner,
        &["exec", name, "--", "cat", "/run/ndvtest-hup"],
        b"",
    );
    assert_eq!((code, stdout.as_str()), (Some(0), "reloaded\n"));
    let (code, _, stderr) = cli(&runner, &["signal", name, "SIGUSR1"], b"");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("signal_commands"), "{stderr}");

    // Unknown tasks: a clear error naming what does run.
    let (code, stdout, stderr) = cli(&runner, &["exec", "ndvtest-nope", "--", "true"], b"");
    assert_eq!(code, Some(1));
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("no running `nomad-driver-virt run` owns a task named \"ndvtest-nope\"")
            && stderr.contains(&format!("{name} (pid {})", runner.child.id())),
        "{stderr}"
    );
    let (code, _, stderr) = cli(&runner, &["signal", "ndvtest-nope", "SIGHUP"], b"");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("owns a task named \"ndvtest-nope\""),
        "{stderr}"
    );

    runner.interrupt();
    let code = runner.wait_exit(STOP_LIMIT);
    assert_eq!(code, Some(0), "{}", runner.output());
    assert!(
        !control_dir.exists(),
        "the control directory {} is removed with the run",
        control_dir.display()
    );
    let (code, _, stderr) = cli(&runner, &["signal", name, "SIGHUP"], b"");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("owns a task named"), "{stderr}");
}

/// A disk that takes a while to prepare reports its progress as task
/// events, and `run` prints them: a 1 GiB raw image with 512 MiB of data
/// copied into a fresh raw volume, reported every 10 ms (5 s in
/// production). The image boots nothing; the VM starts anyway and Ctrl-C
/// removes it.
#[test]
fn run_shows_disk_preparation_progress() {
    if !common::host_ready(&[common::Need::Root, common::Need::Libvirtd]) {
        return;
    }
    let setup = Setup::new();
    let images = setup.dir.path().join("images");
    std::fs::create_dir(&images).expect("mkdir images");
    {
        use std::os::unix::fs::FileExt;
        let image = std::fs::File::create(images.join("big.img")).expect("create image");
        image.set_len(1 << 30).expect("size image");
        let data = vec![0x5a_u8; 1 << 20];
        for mib in (0..1024u64).step_by(2) {
            image.write_all_at(&data, mib << 20).expect("write image");
        }
    }
    let config = std::fs::read_to_string(setup.client_config()).expect("read config");
    let config = config.replacen(
        &format!("image_paths = [\"{}\"]", vm::guest_dir().display()),
        &format!("image_paths = [\"{}\"]", images.display()),
        1,
    );
    std::fs::write(setup.client_config(), config).expect("write config");
    let job = setup.write_job(
        "big-disk.nomad.hcl",
        r#"job "ndvtest-run" {
  datacenters = ["dc1"]
  group "g" {
    task "ndvtest-bigdisk" {
      driver = "virt"
      config {
        hostname = "ndvtest-bigdisk"
        disk {
          format = "raw"
          source {
            image = "big.img"
          }
        }
      }
      kill_timeout = "1s"
      resources {
        cpu    = 200
        memory = 64
      }
    }
  }
}
"#,
    );
    let state_dir = setup.state_dir();
    let mut runner = Runner::spawn_with_env(
        &[
            job.to_str().expect("utf-8 path"),
            "--plugin-config",
            setup.client_config().to_str().expect("utf-8 path"),
            "--state-dir",
            state_dir.to_str().expect("utf-8 path"),
        ],
        &[("NOMAD_DRIVER_VIRT_DISK_PROGRESS_INTERVAL", "0.01")],
    );
    runner.wait_for("==> Started VM ", BOOT_LIMIT);
    let output = runner.output();
    let reports: Vec<&str> = output
        .lines()
        .filter(|line| line.starts_with("==> Preparing disk[0] vda: "))
        .collect();
    let partial: Vec<&&str> = reports
        .iter()
        .filter(|line| line.contains(" of 1.0 GiB (") && !line.contains("(100%)"))
        .collect();
    assert!(
        !partial.is_empty(),
        "a report with bytes done < total is shown:\n{output}"
    );
    let started = Instant::now();
    runner.interrupt();
    runner.wait_exit(STOP_LIMIT);
    eprintln!(
        "{} progress reports, stopped in {:?}",
        reports.len(),
        started.elapsed()
    );
    assert!(
        !domain_names()
            .iter()
            .any(|d| d.starts_with("ndvtest-bigdisk-")),
        "a domain was left behind"
    );
    assert_eq!(setup.task_volumes(), Vec::<String>::new());
}
