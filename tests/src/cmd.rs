//! Running commands, inside a network namespace or not, with captured output and a deadline.

use anyhow::{Context, bail};
use std::ffi::OsStr;
use std::fmt;
use std::io::Write;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long one command may run before it is killed and reported as hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The outcome of one finished command.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The command line, for messages.
    pub cmdline: String,
    /// The exit code, or `None` when a signal ended the command.
    pub code: Option<i32>,
    /// Everything the command wrote to stdout.
    pub stdout: String,
    /// Everything the command wrote to stderr.
    pub stderr: String,
}

impl Captured {
    /// True when the command exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Returns `self` when the command exited 0, otherwise an error that shows the command, its
    /// exit code and its output.
    pub fn ok(self) -> anyhow::Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            bail!("command failed: {self}")
        }
    }
}

impl fmt::Display for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = self
            .code
            .map_or_else(|| "killed by a signal".to_owned(), |c| format!("exit {c}"));
        write!(f, "`{}` ({code})", self.cmdline)?;
        if !self.stdout.is_empty() {
            write!(f, "\n--- stdout ---\n{}", self.stdout.trim_end())?;
        }
        if !self.stderr.is_empty() {
            write!(f, "\n--- stderr ---\n{}", self.stderr.trim_end())?;
        }
        Ok(())
    }
}

/// Renders a command line for messages, quoting arguments that need it.
pub fn cmdline<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> String {
    std::iter::once(program.as_ref())
        .chain(args.iter().map(AsRef::as_ref))
        .map(|arg| {
            let arg = arg.to_string_lossy();
            if !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%[]".contains(c))
            {
                arg.into_owned()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A command that runs `program args` inside the network namespace `ns` (`ip netns exec`, which
/// execs the program, so the child's pid is the program's pid). Variables `KILO_EGRESS_*` of the
/// test's environment are removed so they cannot change what the binaries do.
pub fn netns_command<S: AsRef<OsStr>>(ns: &str, program: impl AsRef<OsStr>, args: &[S]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program).args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KILO_EGRESS_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Sends `signal` (`TERM`, `KILL`, ...) to the process `pid`, one this crate started.
pub fn kill_pid(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs `cmd` to completion, feeding it `stdin`, and captures its output. The command is killed
/// and an error returned when it runs longer than [`COMMAND_TIMEOUT`]; a non-zero exit is not an
/// error here (see [`Captured::ok`]).
pub fn capture(cmd: &mut Command, stdin: Option<&str>) -> anyhow::Result<Captured> {
    capture_within(cmd, stdin, COMMAND_TIMEOUT)
}

/// Like [`capture`], killing the command after `timeout` instead: for load runs.
pub fn capture_within(
    cmd: &mut Command,
    stdin: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Captured> {
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
    let line = cmdline(&program, &args);
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start `{line}`"))?;
    let pid = child.id();
    let input = stdin.map(str::to_owned);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let (Some(input), Some(mut pipe)) = (input, child.stdin.take()) {
            // A command that exits without reading its input is reported by its exit code.
            let _ = pipe.write_all(input.as_bytes());
        }
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(timeout) {
        Ok(output) => output.with_context(|| format!("wait for `{line}`"))?,
        Err(_) => {
            kill_pid(pid, "KILL");
            bail!("`{line}` did not finish within {timeout:?} and was killed");
        }
    };
    Ok(Captured {
        cmdline: line,
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Runs `program args` inside the network namespace `ns` and captures its output.
pub fn run_in<S: AsRef<OsStr>>(
    ns: &str,
    program: impl AsRef<OsStr>,
    args: &[S],
) -> anyhow::Result<Captured> {
    capture(&mut netns_command(ns, program, args), None)
}

/// Runs `program args` inside `ns` and fails unless it exits 0.
pub fn run_in_ok<S: AsRef<OsStr>>(
    ns: &str,
    program: impl AsRef<OsStr>,
    args: &[S],
) -> anyhow::Result<Captured> {
    run_in(ns, program, args)?.ok()
}

/// Runs `program args` in the test's own namespace and fails unless it exits 0. Only for
/// commands that name the namespace they change themselves (`ip netns add NS`, `ip -n NS ...`):
/// nothing may change the root namespace's network state.
pub fn run_ok<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> anyhow::Result<Captured> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    capture(&mut cmd, None)?.ok()
}

/// How long a process may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Sends SIGTERM to `child` and waits up to [`STOP_TIMEOUT`] for it to exit; then kills it and
/// fails, naming `what`.
pub fn stop_child(child: &mut Child, what: &str) -> anyhow::Result<ExitStatus> {
    kill_pid(child.id(), "TERM");
    let mut status = None;
    crate::poll_until(STOP_TIMEOUT, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    match status {
        Some(status) => Ok(status),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not exit within {STOP_TIMEOUT:?} of SIGTERM")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_quotes_what_a_shell_would_split() {
        assert_eq!(
            cmdline("iptables", &["-A", "X", "--comment", "Kilo: NAT", ""]),
            "iptables -A X --comment 'Kilo: NAT' ''"
        );
        assert_eq!(cmdline("echo", &["it's"]), r"echo 'it'\''s'");
    }

    #[test]
    fn capture_reports_exit_code_and_output() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat; echo err >&2; exit 3"]);
        let out = capture(&mut cmd, Some("in\n")).unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "in\n");
        assert_eq!(out.stderr, "err\n");
        assert!(out.clone().ok().is_err());
        assert!(out.to_string().contains("exit 3"));
    }
}
