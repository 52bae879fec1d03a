//! `muscle-agent`: the tiny pull-based agent on every machine of the fleet.

#[macro_use]
extern crate muscle_logline;

mod agent;
mod clock;
mod download;
mod fsutil;
mod health;
mod http;
mod install;
mod logs;
mod paths;
mod process;
mod reconcile;
mod repair;
mod selfupdate;
mod state;
mod supervisor;
mod systemd;
#[cfg(feature = "tls")]
mod tls;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "muscle-agent", version = version(), about = "Pulls desired state, installs, supervises, health-checks and rolls back services")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check in with the server and keep this host's services at their desired versions.
    Run(RunArgs),
    /// Show what is installed and running, from the state directory.
    Status {
        #[arg(long, default_value = "/var/lib/muscle-agent")]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check in once with the report read from stdin: how a new agent binary proves itself
    /// before a self-update hands over to it.
    #[command(hide = true)]
    Probe {
        #[arg(long)]
        server: String,
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Download and verify one artifact exactly as an install does (resume, sha256, size bound,
    /// static ELF for this host), without installing it: for pre-seeding and benchmarks.
    Fetch {
        url: String,
        #[arg(long)]
        sha256: String,
        #[arg(long)]
        size: u64,
        /// Where the verified file goes (mode 0755).
        #[arg(long)]
        out: PathBuf,
        /// Trust this CA bundle (PEM) for an `https://` URL.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Between a service and its log file: stamps each line read from stdin with the time and
    /// `--version`, and rotates the file before it passes `--max-bytes`.
    #[command(hide = true)]
    LogRelay {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        max_bytes: u64,
        #[arg(long)]
        keep: u32,
        #[arg(long)]
        version: String,
        /// Start the relay in the background and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// Print the hardened systemd unit for an installed app's committed version, or with
    /// `--self` the unit that supervises the agent itself (`-- RUN ARGS` for its `run`).
    SystemdUnit {
        #[arg(required_unless_present = "agent")]
        app: Option<String>,
        /// The unit for this agent: restarted when it dies (after a failed self-update, as the
        /// old binary, which reverts it), its services left running across restarts.
        #[arg(long = "self", conflicts_with = "app")]
        agent: bool,
        #[arg(long, default_value = "/var/lib/muscle-agent")]
        state_dir: PathBuf,
        /// Run as this user instead of a DynamicUser.
        #[arg(long, conflicts_with = "agent")]
        user: Option<String>,
        /// With --self: the arguments of `muscle-agent run` (e.g. `-- --server https://...`).
        #[arg(last = true)]
        run_args: Vec<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Supervisor {
    Builtin,
    Systemd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The deployer's URL, e.g. http://127.0.0.1:7700
    #[arg(long, value_parser = muscle_protocol::parse_url)]
    server: String,
    #[arg(long, default_value = "/var/lib/muscle-agent")]
    state_dir: PathBuf,
    /// This agent's id (default: remembered in the state dir, first made from the hostname).
    #[arg(long)]
    id: Option<muscle_protocol::Name>,
    /// A label for rollout selectors (repeatable).
    #[arg(long = "label", value_parser = muscle_protocol::parse_label)]
    labels: Vec<(muscle_protocol::Name, muscle_protocol::Name)>,
    /// A variable for `${name}` in service specs (repeatable).
    #[arg(long = "var", value_parser = muscle_protocol::parse_key_value)]
    vars: Vec<(String, String)>,
    /// Check-in interval (jittered by ±10%).
    #[arg(long, default_value = "5s", value_parser = muscle_protocol::duration::parse)]
    interval: Duration,
    /// A trusted ed25519 public key (hex, repeatable). Also read from STATE_DIR/trusted-keys.
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<String>,
    /// Enrol with this token on first contact; the credential the server returns is kept in
    /// STATE_DIR/credential and sent with every check-in.
    #[arg(long, env = "MUSCLE_ENROLL_TOKEN")]
    enroll_token: Option<String>,
    /// Trust this CA bundle (PEM) for an `https://` server instead of Mozilla's roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Who runs services: the agent's own supervisor, or systemd through hardened units.
    #[arg(long, value_enum, default_value_t = Supervisor::Builtin)]
    supervisor: Supervisor,
    /// Where `--supervisor systemd` writes `muscle-<app>.service` units.
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
    /// Run systemd units as this user instead of a DynamicUser.
    #[arg(long)]
    unit_user: Option<String>,
    /// On SIGTERM/SIGINT exit without stopping the services (default: stop them gracefully).
    #[arg(long)]
    leave_services_running: bool,
    /// The most a service's log file holds before it is rotated (bytes, or with K, M, G).
    #[arg(long, default_value = "1M", value_parser = muscle_protocol::parse_size)]
    log_max_bytes: u64,
    /// The agent's own log on stderr: stamped lines, or JSON lines for a log shipper.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Rotated log files kept per service (service.log.1 ... service.log.N).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    log_keep: u32,
    /// Versions kept on disk per app, the current and previous included.
    #[arg(long, default_value_t = 3)]
    keep_versions: usize,
}

/// `0.1.0 (aarch64)`: the version, and the architecture this binary was built for.
fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| format!("{} ({})", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH))
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
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
            app,
            agent,
            state_dir,
            user,
            run_args,
        } => match (app, agent) {
            (_, true) => agent_unit(&state_dir, &run_args),
            (Some(app), false) => systemd_unit(&app, &state_dir, user.as_deref()),
            (None, false) => unreachable!("clap requires an app unless --self"),
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
        server: args.server,
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
