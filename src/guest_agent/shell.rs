//! The shell side of exec: POSIX quoting, and the scripts the agent runs in
//! the guest with `/bin/sh -c SCRIPT NAME ARGS...` (arguments go in as
//! positional parameters, never pasted into the script). They only use what
//! busybox and coreutils/util-linux both have: sh, mkfifo, mktemp, setsid,
//! head, cat, dd, sleep, kill, stty, and util-linux `script` for a TTY.

/// Quotes one word for a POSIX shell: single quotes, with each `'` written
/// as `'\''`. Any byte sequence but NUL survives `sh -c` unchanged.
pub fn quote(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    out.push('\'');
    for c in word.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// `argv` as one shell command line that runs exactly that argv.
pub fn command_line(argv: &[String]) -> String {
    argv.iter()
        .map(|word| quote(word))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Marker line the exec wrapper prints last on stdout: `MARK rc timed_out`.
pub const EXEC_END_MARK: &[u8] = b"\nNDV-EXEC-END ";

/// The wrappers exit 97 when the guest lacks what they need (mktemp, mkfifo).
///
/// One-shot exec: `$1` timeout seconds, `$2` output cap in bytes, then argv.
/// The command runs in its own session; a watchdog kills its whole process
/// group at the deadline, and whatever is left of the group when it exits.
/// Each stream passes through `head -c cap+1` (the host sees truncation as
/// one byte too many) and the rest is drained so the command never blocks.
pub const EXEC_WRAPPER: &str = r#"t=$1 max=$2; shift 2
d=$(mktemp -d /tmp/ndv-exec.XXXXXX) || exit 97
mkfifo "$d/o" "$d/e" || { rm -rf "$d"; exit 97; }
{ head -c $((max + 1)); cat >/dev/null; } <"$d/o" &
{ head -c $((max + 1)) >&2; cat >/dev/null; } <"$d/e" &
setsid "$@" </dev/null >"$d/o" 2>"$d/e" &
p=$!
(
  sleep "$t" & s=$!
  trap 'kill "$s" 2>/dev/null; exit 0' TERM
  wait "$s" || exit 0
  : >"$d/timedout"
  kill -9 "-$p" 2>/dev/null || kill -9 "$p" 2>/dev/null
) &
w=$!
wait "$p"; rc=$?
kill "$w" 2>/dev/null
kill -9 "-$p" 2>/dev/null
wait
to=0; [ -e "$d/timedout" ] && to=1
rm -rf "$d"
printf '\nNDV-EXEC-END %s %s\n' "$rc" "$to"
"#;

/// Streaming session: `$1` private dir (created here, must not exist),
/// `$2` 1 for a TTY, `$3` rows, `$4` cols, `$5` the quoted command line (TTY
/// only), then argv.
///
/// The agent reads FIFOs badly: its guest-file-read uses stdio `fread` on a
/// non-blocking descriptor, which drops the bytes it got when the pipe runs
/// dry before `count` is reached. So the command's stdout/stderr go through
/// FIFOs to relays that copy them into numbered segment files
/// (`out.0`, `out.1`, ...; at most 64 reads each), which the host reads as
/// regular files: reading at their end is a clean EOF. A relay starts
/// segment N only after the host has emptied segment N-2, so at most about
/// three segments per stream wait in the guest's memory. Stdin is the FIFO
/// `in` (the host writes at most one pipe buffer at a time, which is atomic);
/// `ctl` takes "ROWS COLS" lines for TTY resizes. `exit` appears when the
/// command has exited and both relays are done.
///
/// Stdin's read end is opened by the runner itself (fd 4, let through by the
/// host's read-write open of `in`) just before it starts the command, and
/// handed over. Were the command to open `in` on its own, a host that closed
/// stdin before that open (a client with nothing to send closes at once)
/// would leave the command blocked in open for ever, as a FIFO without
/// writers blocks its readers. `pid` appears once fd 4 is held: only then
/// may the host close its end. `in` is made last, so `ctl` exists once the
/// host sees `in`. `runner` holds the runner's pid (its process group) for
/// the cleanup; before `exit` appears, the runner has reaped everything it
/// started and empties `pid`, `child` and `runner`, so the cleanup of a
/// finished session kills nothing (those ids may be reused by then).
pub const SESSION_RUNNER: &str = r#"d=$1 tty=$2 rows=$3 cols=$4 line=$5; shift 5
umask 077
mkdir "$d" || exit 97
cd "$d" || exit 97
echo $$ >runner
mkfifo out err ctl in || exit 97
exec >log 2>&1 </dev/null
relay() {
  n=0
  while :; do
    if [ "$n" -ge 2 ]; then
      old=$1.$((n - 2))
      while [ -s "$old" ]; do sleep 0.02; done
      rm -f "$old"
    fi
    dd bs=16384 count=64 of="$1.$n" 2>"$1.dd" || break
    read -r recs <"$1.dd" || break
    full=${recs%%+*}; part=${recs#*+}; part=${part%% *}
    [ $((full + part)) -lt 64 ] && break
    n=$((n + 1))
  done
}
relay out <out &
ro=$!
relay err <err &
re=$!
rl=
if [ "$tty" = 1 ]; then
  ( exec <>ctl
    while read -r r c; do
      p=$(cat pty 2>/dev/null) && [ -n "$p" ] && stty rows "$r" cols "$c" <"$p"
    done ) &
  rl=$!
  exec 4<in
  setsid script -qfec "echo \$\$ >'$d/child'; tty >'$d/pty'; stty rows $rows cols $cols; exec $line" /dev/null <&4 4<&- >out 2>err &
else
  exec 4<in
  setsid "$@" <&4 4<&- >out 2>err &
fi
p=$!
exec 4<&-
echo "$p" >pid
wait "$p"; rc=$?
kill -9 "-$p" 2>/dev/null
c=$(cat child 2>/dev/null) && kill -9 "-$c" 2>/dev/null
[ -n "$rl" ] && kill -9 "$rl" 2>/dev/null
wait
: >pid; : >child; : >runner
echo "$rc" >exit.tmp && mv exit.tmp exit
"#;

/// Ends a session whatever its state: kills the command's process group
/// (and the TTY child's session), the runner's group (relays, resize loop),
/// and removes the directory. `$1` is the session dir.
pub const SESSION_CLEANUP: &str = r#"d=$1
case "$d" in /tmp/ndv-session-*) ;; *) exit 2 ;; esac
for f in pid child runner; do
  p=$(cat "$d/$f" 2>/dev/null) && [ -n "$p" ] && kill -9 "-$p" 2>/dev/null
done
rm -rf "$d"
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    /// Runs `sh -c '<quoted argv> ; printf ...'` on the host's /bin/sh and
    /// returns the words it received, NUL-separated.
    fn round_trip(argv: &[String]) -> Vec<String> {
        let script = format!(
            "set -- {}; for a in \"$@\"; do printf '%s\\0' \"$a\"; done",
            command_line(argv)
        );
        let output = Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("run /bin/sh");
        assert!(output.status.success(), "{script}: {output:?}");
        let mut words: Vec<String> = output
            .stdout
            .split(|b| *b == 0)
            .map(|w| String::from_utf8(w.to_vec()).expect("utf-8"))
            .collect();
        words.pop(); // after the last NUL
        words
    }

    #[test]
    fn quoting_handles_the_awkward_cases() {
        let argv: Vec<String> = [
            "",
            "'",
            "''",
            "a b",
            "$HOME",
            "`id`",
            "$(id)",
            "\\",
            "\n",
            "*",
            "-n",
            "\"",
            "é ü 日本",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(round_trip(&argv), argv);
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    fn wait_for(path: &std::path::Path) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !path.exists() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// A runner started on the host for a test: on drop, its process group
    /// (relays, resize loop) and, if the command never finished, the
    /// command's own session are killed, and the runner is reaped (until
    /// then its pid, and so its group id, cannot be reused).
    struct HostRunner {
        runner: std::process::Child,
        dir: std::path::PathBuf,
    }

    impl Drop for HostRunner {
        fn drop(&mut self) {
            let mut groups = vec![self.runner.id().to_string()];
            if !self.dir.join("exit").exists() {
                let command = std::fs::read_to_string(self.dir.join("pid")).unwrap_or_default();
                groups.push(command.trim().to_string());
            }
            // Through the syscall: procps `kill -9 -PGID` (without `--`)
            // signals every process on the host.
            for group in groups.iter().filter_map(|group| group.parse::<i32>().ok()) {
                if group <= 1 {
                    continue;
                }
                if let Some(group) = rustix::process::Pid::from_raw(group) {
                    let _ =
                        rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                }
            }
            let _ = self.runner.wait();
        }
    }

    /// Drives the session runner on the host's /bin/sh as the driver does
    /// through the agent (open `in` read-write once it exists, then close it
    /// as soon as `pid` says the runner holds the read end), for a client
    /// whose stdin is empty, with and without a TTY. The command must see
    /// EOF and exit, every time, and the runner must leave no ids behind
    /// for the cleanup to kill.
    #[test]
    fn a_session_whose_stdin_closes_at_once_runs_to_its_exit() {
        for round in 0..30 {
            let tty = round % 3 == 2;
            let base = tempfile::tempdir().expect("tempdir");
            let dir = base.path().join("session");
            let (tty_arg, rows, cols) = if tty {
                ("1", "24", "80")
            } else {
                ("0", "0", "0")
            };
            let runner = Command::new("/bin/sh")
                .arg("-c")
                .arg(SESSION_RUNNER)
                .args(["ndv-session", dir.to_str().expect("utf-8 path")])
                .args([tty_arg, rows, cols, "cat", "cat"])
                .process_group(0)
                .spawn()
                .expect("run /bin/sh");
            let runner = HostRunner {
                runner,
                dir: dir.clone(),
            };
            assert!(wait_for(&dir.join("in")), "round {round}: no stdin FIFO");
            assert!(dir.join("ctl").exists(), "ctl is made before in");
            let stdin = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join("in"))
                .expect("open in");
            assert!(wait_for(&dir.join("pid")), "round {round}: no pid");
            drop(stdin);
            assert!(
                wait_for(&dir.join("exit")),
                "round {round} (tty {tty}): `cat` never saw stdin's end"
            );
            let code = std::fs::read_to_string(dir.join("exit")).expect("exit");
            assert_eq!(code.trim(), "0", "round {round} (tty {tty})");
            for emptied in ["pid", "runner", "child"] {
                let text = std::fs::read_to_string(dir.join(emptied)).unwrap_or_default();
                assert_eq!(
                    text, "",
                    "round {round}: {emptied} must be emptied before exit"
                );
            }
            drop(runner);
        }
    }

    /// The command never opens the stdin FIFO itself (that open could block
    /// for ever, see [`SESSION_RUNNER`]): the runner opens it right before
    /// starting the command and hands it over.
    #[test]
    fn only_the_runner_opens_stdin_and_hands_it_to_the_command() {
        let lines: Vec<&str> = SESSION_RUNNER.lines().map(str::trim).collect();
        let mut commands = 0;
        for (index, line) in lines.iter().enumerate() {
            if line.contains("<in") {
                assert_eq!(*line, "exec 4<in", "line {index}");
            }
            if line.starts_with("setsid ") {
                commands += 1;
                assert_eq!(lines[index - 1], "exec 4<in", "line {index}");
                assert!(line.contains("<&4 4<&-"), "line {index}: {line}");
            }
        }
        assert_eq!(commands, 2, "the plain and the TTY command");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_argv_round_trips_through_sh(argv in proptest::collection::vec("[^\u{0}]{0,12}", 1..6)) {
            prop_assert_eq!(round_trip(&argv), argv);
        }
    }
}
