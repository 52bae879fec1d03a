//! PID 1's last job: keep the agent running, and reap every orphan the kernel hands to it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, WaitOptions, WaitStatus};

use crate::cmdline::BootConfig;
use crate::say;
use crate::system::{self, STATE_DIR};

pub const AGENT: &str = "/usr/bin/muscle-agent";

/// The agent's exit status for a command line it refuses (its usage errors).
const USAGE: i32 = 2;
/// A restart waits this long after a quick exit, doubling to at most [`MAX_BACKOFF`]; a run that
/// lasted [`STEADY`] starts the count again.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STEADY: Duration = Duration::from_secs(60);

pub fn run_agent(config: &BootConfig) -> ! {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        let status = match spawn(config) {
            Ok(pid) => reap_until(pid),
            Err(e) => {
                say!("cannot start {AGENT}: {e}");
                None
            }
        };
        if status == Some(USAGE) {
            let why = "the agent refused the kernel command line (its message is above)";
            system::reboot_after(&why, Duration::from_secs(30));
        }
        if started.elapsed() >= STEADY {
            backoff = FIRST_BACKOFF;
        }
        say!(
            "the agent ended ({}); starting it again in {} s",
            status.map_or("killed by a signal".into(), |c| format!("exit status {c}")),
            backoff.as_secs()
        );
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn spawn(config: &BootConfig) -> std::io::Result<Pid> {
    let mut cmd = Command::new(AGENT);
    cmd.args(config.agent_args(STATE_DIR))
        .stdin(Stdio::null())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", STATE_DIR);
    if let Some(token) = &config.enroll_token {
        cmd.env("MUSCLE_ENROLL_TOKEN", token);
    }
    let child = cmd.spawn()?;
    Ok(Pid::from_child(&child))
}

/// Reaps children until `agent` ends; its exit status, or `None` for a signal.
fn reap_until(agent: Pid) -> Option<i32> {
    loop {
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((pid, status))) if pid == agent => return exit_code(status),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                say!("wait: {e}");
                return None;
            }
        }
    }
}

fn exit_code(status: WaitStatus) -> Option<i32> {
    status.exit_status()
}
