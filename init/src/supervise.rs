//! PID 1's last job: keep the agent running, and reap every orphan the kernel hands to it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, WaitOptions};

use crate::cmdline::BootConfig;
use crate::say;
use crate::system::{self, STATE_DIR};

pub const AGENT: &str = "/usr/bin/muscle-agent";

/// The agent's exit status for a command line it refuses (its usage errors).
const USAGE: i32 = 2;
/// The agent's exit status that asks for a restart of the machine: the deployer assigned it
/// another image, which its boot script will boot. (`muscle_protocol::image::REBOOT_EXIT_CODE`:
/// init stays free of the protocol crate's dependencies; a test checks they agree.)
pub const REBOOT: i32 = 75;
/// A restart waits this long after a quick exit, doubling to at most [`MAX_BACKOFF`]; a run that
/// lasted [`STEADY`] starts the count again.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STEADY: Duration = Duration::from_secs(60);
/// After this many failed starts in a row (no agent binary, no memory) the machine restarts.
const MAX_FAILED_STARTS: u32 = 10;

/// How the agent's last run ended.
enum Ended {
    Exited(i32),
    Signalled,
    NotStarted(std::io::Error),
}

/// How long an agent given an enrolment token has to enrol (`muscle.enrol_within=` changes
/// it). A boot token is taken once and expires: an agent that could not finish (a lost answer,
/// a deployer that failed midway, a token expired in a boot storm) will never enrol with it, and
/// restarting the machine fetches a new script with a new token. It is also what brings a
/// machine on a bad image (one whose agent never enrols) back to its deployer, which then boots
/// the previous image.
const ENROL_DEADLINE: Duration = Duration::from_secs(10 * 60);

pub fn run_agent(config: &BootConfig) -> ! {
    if config.enroll_token.is_some() {
        let within = config
            .enrol_within
            .map_or(ENROL_DEADLINE, Duration::from_secs);
        std::thread::spawn(move || watch_enrolment(within));
    }
    let mut backoff = FIRST_BACKOFF;
    let mut failed_starts = 0;
    loop {
        let started = Instant::now();
        let ended = match spawn(config) {
            Ok(pid) => reap_until(pid),
            Err(e) => Ended::NotStarted(e),
        };
        match &ended {
            Ended::Exited(USAGE) => {
                let why = "the agent refused the kernel command line (its message is above)";
                system::reboot_after(&why, system::SHOW_WHY);
            }
            Ended::Exited(REBOOT) => {
                system::reboot_after(&"the agent asked to boot another image", Duration::ZERO);
            }
            Ended::NotStarted(e) => {
                failed_starts += 1;
                say!("cannot start {AGENT}: {e}");
                if failed_starts >= MAX_FAILED_STARTS {
                    let why = format!("{AGENT} did not start {MAX_FAILED_STARTS} times in a row");
                    system::reboot_after(&why, system::SHOW_WHY);
                }
            }
            Ended::Exited(code) => {
                failed_starts = 0;
                say!("the agent exited with status {code}");
            }
            Ended::Signalled => {
                failed_starts = 0;
                say!("the agent was killed by a signal");
            }
        }
        if started.elapsed() >= STEADY {
            backoff = FIRST_BACKOFF;
        }
        say!("starting the agent again in {} s", backoff.as_secs());
        reap_for(backoff);
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
    // By environment, not a flag: an agent that does not know it still starts.
    if let Some(image) = &config.image {
        cmd.env("MUSCLE_BOOT_IMAGE", image);
    }
    let child = cmd.spawn()?;
    Ok(Pid::from_child(&child))
}

/// Reaps children until `agent` ends.
fn reap_until(agent: Pid) -> Ended {
    loop {
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((pid, status))) if pid == agent => {
                return status.exit_status().map_or(Ended::Signalled, Ended::Exited)
            }
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                // ECHILD: the agent is gone without a status we saw; nothing to wait for.
                say!("wait: {e}");
                return Ended::Signalled;
            }
        }
    }
}

/// Waits `pause`, reaping orphans as they end (services the agent started outlive it).
fn reap_for(pause: Duration) {
    let until = Instant::now() + pause;
    while Instant::now() < until {
        while let Ok(Some(_)) = rustix::process::wait(WaitOptions::NOHANG) {}
        std::thread::sleep(
            Duration::from_millis(200).min(until.saturating_duration_since(Instant::now())),
        );
    }
}

/// Restarts the machine if the agent has no credential in [`ENROL_DEADLINE`].
fn watch_enrolment(within: Duration) {
    let credential = std::path::Path::new(STATE_DIR).join("credential");
    let until = Instant::now() + within;
    while Instant::now() < until {
        if credential.exists() {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let why = format!(
        "the agent did not enrol within {} s (its messages are above); booting again for a new enrolment token",
        within.as_secs()
    );
    system::reboot_after(&why, system::SHOW_WHY);
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_restart_status_is_the_agents() {
        assert_eq!(super::REBOOT, muscle_protocol::image::REBOOT_EXIT_CODE);
    }
}
