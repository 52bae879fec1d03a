//! `muscle-agent`: the tiny pull-based agent on every machine of the fleet.

#[macro_use]
extern crate muscle_logline;

mod agent;
mod cgroup;
mod cli;
mod clock;
mod download;
mod fsutil;
mod health;
mod http;
mod image;
mod install;
mod isolation;
mod jobs;
mod log_stream;
mod logs;
mod paths;
mod process;
mod reconcile;
mod repair;
mod seccomp;
mod selfupdate;
mod servers;
mod state;
mod supervisor;
mod systemd;
#[cfg(feature = "tls")]
mod tls;

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use cli::{Command, LogFormat, RunArgs, Supervisor, UnitOf};

fn main() {
    let command = match cli::parse(std::env::args_os().skip(1).collect()) {
        Ok(command) => command,
        Err(e) => {
            let more = e.command.map_or(String::new(), |c| format!("{c} "));
            eprintln!("muscle-agent: error: {e}\n\nFor more information, try 'muscle-agent {more}--help'.");
            std::process::exit(2);
        }
    };
    let result = match command {
        Command::Print(text) => {
            print!("{text}");
            Ok(())
        }
        Command::Run(args) => run(*args),
        Command::Status { state_dir, json } => status(&state_dir, json),
        Command::Fetch {
            url,
            sha256,
            size,
            out,
            ca_file,
        } => fetch(&url, &sha256, size, &out, ca_file.as_deref()),
        Command::Probe {
            server,
            state_dir,
            ca_file,
        } => selfupdate::probe(&server, &state_dir, ca_file.as_deref()),
        Command::LogRelay {
            file,
            max_bytes,
            keep,
            version,
            detach,
        } => log_relay(&file, logs::LogPolicy { max_bytes, keep }, &version, detach),
        Command::SystemdUnit {
            unit,
            state_dir,
            run_args,
        } => match unit {
            UnitOf::Agent => agent_unit(&state_dir, &run_args),
            UnitOf::App { app, user } => systemd_unit(&app, &state_dir, user.as_deref()),
        },
    };
    if let Err(e) = result {
        eprintln!("muscle-agent: error: {}", muscle_protocol::causes(&*e));
        std::process::exit(1);
    }
}

fn run(args: RunArgs) -> Result<()> {
    muscle_logline::init("muscle-agent", args.log_format == LogFormat::Json);
    install_signal_handlers();
    let state_dir = absolute(&args.state_dir)?;
    let trusted_keys = trusted_keys(&args.trusted_keys, &state_dir)?;
    let cfg = agent::Config {
        servers: servers::Servers::new(args.servers),
        state_dir,
        id: args.id,
        labels: args.labels.into_iter().collect(),
        vars: args.vars.into_iter().collect(),
        interval: args.interval,
        trusted_keys,
        enroll_token: args.enroll_token,
        ca_file: args.ca_file,
        launcher: match args.supervisor {
            Supervisor::Builtin => process::Launcher::Builtin(process::LogSink {
                relay: Some(std::env::current_exe().context("cannot find this agent's binary")?),
                policy: logs::LogPolicy {
                    max_bytes: args.log_max_bytes,
                    keep: args.log_keep,
                },
            }),
            Supervisor::Systemd => process::Launcher::Systemd {
                unit_dir: args.unit_dir,
                user: args.unit_user,
            },
        },
        leave_services_running: args.leave_services_running,
        log_max_bytes: args.log_max_bytes,
        keep_versions: args.keep_versions.max(2),
        boot_image: image::BootImage::read(&args.image_file, args.boot_image),
    };
    agent::Agent::start(cfg)?.run()
}

fn trusted_keys(
    flags: &[String],
    state_dir: &std::path::Path,
) -> Result<Vec<muscle_protocol::PublicKey>> {
    let file = state_dir.join("trusted-keys");
    let from_file = std::fs::read_to_string(&file).unwrap_or_default();
    let lines = from_file
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    flags
        .iter()
        .map(String::as_str)
        .map(|k| (k, "--trusted-key".to_owned()))
        .chain(lines.map(|k| (k, file.display().to_string())))
        .map(|(k, source)| muscle_protocol::parse_public_key(k).with_context(|| source))
        .collect()
}

extern "C" fn on_signal(_: libc::c_int) {
    agent::SHUTDOWN.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
}

fn status(state_dir: &std::path::Path, json: bool) -> Result<()> {
    let state = state::StateStore::new(state_dir).load()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(());
    }
    let id = state
        .agent_id
        .as_ref()
        .map_or("(none yet)", |id| id.as_str());
    println!("agent {id} ({})", state_dir.display());
    println!(
        "{:<16} {:<10} {:<10} {:<9} {:<8} PROBLEM",
        "APP", "CURRENT", "PREVIOUS", "RUNNING", "PID"
    );
    for (app, st) in &state.apps {
        let v = |i: &Option<state::Installed>| {
            i.as_ref().map_or("-".to_owned(), |i| i.version.to_string())
        };
        let alive = st.pid.is_some_and(process::is_alive);
        let problem = match (&st.pending, &st.failure) {
            (Some(p), _) => format!(
                "install of {} interrupted (repaired at next start)",
                p.version
            ),
            (None, Some(f)) => format!("{}: {}", f.version, f.reason),
            _ => String::new(),
        };
        println!(
            "{app:<16} {:<10} {:<10} {:<9} {:<8} {problem}",
            v(&st.current),
            v(&st.previous),
            if alive {
                st.running_version.as_deref().unwrap_or("?")
            } else {
                "no"
            },
            st.pid.map_or("-".into(), |p| p.to_string()),
        );
    }
    Ok(())
}

fn fetch(
    url: &str,
    sha256: &str,
    size: u64,
    out: &std::path::Path,
    ca_file: Option<&std::path::Path>,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let part = fsutil::tmp_path(out);
    let http = http::client(ca_file)?;
    install::fetch_verified(&http, url, &part, size, sha256, url).map_err(|e| match e {
        install::InstallError::Refused(r)
        | install::InstallError::Transient(r)
        | install::InstallError::ByClock(r) => anyhow::anyhow!(r),
        install::InstallError::Unhealthy { reason, .. } => anyhow::anyhow!(reason),
    })?;
    std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&part, out)
        .with_context(|| format!("cannot move the download to {}", out.display()))?;
    fsutil::sync_parent(out)
}

/// `log-relay`: with `--detach`, starts itself again without it (sharing stdin) and returns,
/// so that the relay is re-parented and never waits to be reaped by an agent that may be gone.
fn log_relay(
    file: &std::path::Path,
    policy: logs::LogPolicy,
    version: &str,
    detach: bool,
) -> Result<()> {
    if detach {
        let args = std::env::args_os().skip(1).filter(|a| a != "--detach");
        std::process::Command::new(std::env::current_exe()?)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot start the log relay")?;
        return Ok(());
    }
    // It ends when its input does: a signal meant for others (a Ctrl-C, a pkill of the agent)
    // would leave the service writing into a pipe nobody reads, and kill it with SIGPIPE.
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: setting a signal's disposition to SIG_IGN runs no code in the handler context.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    let input = std::io::stdin().lock();
    match logs::Rotating::open(file, policy) {
        Ok(mut out) => logs::relay(input, &mut out, version),
        // Keep reading: a service whose output nobody reads would die of SIGPIPE.
        Err(_) => {
            std::io::copy(&mut { input }, &mut std::io::sink())?;
            Ok(())
        }
    }
}

/// `systemd-unit --self`: the unit that runs this agent binary.
fn agent_unit(state_dir: &std::path::Path, run_args: &[String]) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this agent's binary")?;
    let state_dir = absolute(state_dir)?;
    print!("{}", systemd::agent_unit(&exe, &state_dir, run_args));
    Ok(())
}

/// `path` made absolute against the working directory: units, markers and symlinks must not
/// depend on where the agent was started.
fn absolute(path: &std::path::Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot make {} absolute", path.display()))
}

fn systemd_unit(app: &str, state_dir: &std::path::Path, user: Option<&str>) -> Result<()> {
    let state_dir = &absolute(state_dir)?;
    let state = state::StateStore::new(state_dir).load()?;
    let Some(current) = state.apps.get(app).and_then(|a| a.current.as_ref()) else {
        bail!("{app} has no committed version in {}", state_dir.display());
    };
    let binary = paths::AppPaths::new(state_dir, app)
        .current
        .join(&current.binary);
    print!(
        "{}",
        systemd::unit(app, &current.version, &binary, &current.spec, user)
    );
    Ok(())
}
