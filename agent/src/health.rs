//! Health checks: HTTP GET, TCP connect or a command. The agent runs them in both supervisor modes.

use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use muscle_protocol::HealthCheck;

const TIMEOUT: Duration = Duration::from_secs(2);

/// `Ok(())` when healthy, otherwise what the check saw.
pub fn check(health: &HealthCheck, http: &ureq::Agent) -> Result<(), String> {
    match health {
        HealthCheck::None => Ok(()),
        HealthCheck::Http { url, expect_status } => http_get(http, url, *expect_status),
        HealthCheck::Tcp { addr } => tcp(addr),
        HealthCheck::Command { argv } => command(argv),
    }
}

fn http_get(http: &ureq::Agent, url: &str, expect: u16) -> Result<(), String> {
    let status = match http.get(url).timeout(TIMEOUT).call() {
        Ok(resp) => resp.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => return Err(format!("GET {url}: {e}")),
    };
    if status == expect {
        Ok(())
    } else {
        Err(format!("GET {url} answered {status}, expected {expect}"))
    }
}

fn tcp(addr: &str) -> Result<(), String> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("tcp {addr}: cannot resolve: {e}"))?
        .collect();
    let mut last = format!("tcp {addr}: no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("tcp {addr}: {e}"),
        }
    }
    Err(last)
}

fn command(argv: &[String]) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("health command is empty")?;
    let mut cmd = Command::new(program);
    for secret in muscle_protocol::AGENT_ONLY_ENV {
        cmd.env_remove(secret);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run health command {program}: {e}"))?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(format!("health command {program} exited with {status}"))
            }
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "health command {program} did not finish within {TIMEOUT:?}"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("health command {program}: {e}")),
        }
    }
}
