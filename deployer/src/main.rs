//! `muscle-deploy`: publishes releases into its store, serves agents, and rolls releases out
//! across the fleet in health-gated waves.

#[macro_use]
extern crate muscle_logline;

mod auth;
mod certs;
mod engine;
mod failpoint;
mod fsck;
mod listen;
mod publish;
mod rollout;
mod server;
mod store;
mod views;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use muscle_protocol::duration::parse as parse_duration;
use muscle_protocol::{Name, ReleaseManifest, ServiceSpec};

use crate::rollout::{Params, Request, Rollout, Status};
use crate::store::{FsBlobStore, SqliteStore, Store};

#[derive(Parser)]
#[command(
    name = "muscle-deploy",
    version,
    about = "Publish releases, serve agents, roll out in health-gated waves"
)]
struct Cli {
    /// Where the store lives (SQLite database + blobs/). Default: $MUSCLE_DATA_DIR, else ~/.local/share/muscle.
    #[arg(long, global = true, env = "MUSCLE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Re-check a release directory (dist/<app>-<version>) and store it.
    Publish {
        dir: PathBuf,
        /// Trusted ed25519 public key (hex, repeatable); also read from DATA_DIR/trusted-keys.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<String>,
    },
    /// List published releases.
    Releases {
        #[arg(long)]
        json: bool,
    },
    /// Serve the agents' API and run the rollout engine.
    Serve {
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: String,
        /// Base URL agents download blobs from instead of this server (any static server or CDN
        /// serving DATA_DIR/blobs as /v1/blobs/sha256/<hex>).
        #[arg(long)]
        blob_base_url: Option<String>,
        /// The server's log on stderr: stamped lines, or JSON lines for a log shipper.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Accepted for old command lines and ignored: each agent checks in at its own interval.
        #[arg(long, hide = true)]
        interval: Option<String>,
        /// How often the rollout engine advances rollouts.
        #[arg(long, default_value = "250ms", value_parser = parse_duration)]
        tick: Duration,
        /// Require agents to enrol with this token, then check in with their own credential.
        #[arg(long, env = "MUSCLE_ENROLL_TOKEN")]
        enroll_token: Option<String>,
        /// Require this token for the JSON views (/v1/fleet, /v1/rollouts, /v1/releases).
        #[arg(long, env = "MUSCLE_ADMIN_TOKEN")]
        admin_token: Option<String>,
        /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Connections served at once (default: from the open-file limit); more wait to be
        /// accepted. Each client has 5 s for its TLS handshake and request headers.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        max_connections: Option<u32>,
    },
    /// Start, follow and steer rollouts.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Take APP off the agents matching the selector (default: every agent that has it): they
    /// stop and uninstall it, and agents offline now do so when they next check in.
    Undeploy {
        app: Name,
        /// Only agents with this label (repeatable; `arch=aarch64` matches the architecture).
        #[arg(long = "selector", value_parser = muscle_protocol::parse_key_value)]
        selector: Vec<(String, String)>,
    },
    /// Agents with arch, labels, versions, health and last check-in.
    Fleet {
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every stored blob and check every release's files; exit 1 when one is damaged
    /// or missing (re-publishing its release repairs it).
    Fsck {
        #[arg(long)]
        json: bool,
    },
    /// TLS for `serve`: `tls init` makes a private CA and a server certificate it signs.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Make an ed25519 signing key: the private key goes to --out (mode 0600), the public key is printed.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Write ca.pem, ca.key, server.pem and server.key to --out (never overwriting): serve with
    /// the server pair, give agents `--ca-file ca.pem`.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// A host name or IP address agents use to reach the deployer (repeatable; default:
        /// localhost, 127.0.0.1 and this host's name).
        #[arg(long = "name", value_parser = parse_host_name)]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Roll APP VERSION out to the agents matching the selector.
    Start(StartArgs),
    /// Show a rollout (default: the newest).
    Status {
        id: Option<i64>,
        /// Follow it with progress bars until it ends.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    Pause {
        id: i64,
    },
    Resume {
        id: i64,
    },
    /// Stop the rollout where it is, without rolling back.
    Abort {
        id: i64,
    },
    /// Send every agent the rollout moved back to its previous version.
    Rollback {
        id: i64,
    },
}

#[derive(Args)]
struct StartArgs {
    app: Name,
    version: Name,
    /// Service spec (TOML or JSON): args, env, health check, timings. Default: run the binary named like the app.
    #[arg(long)]
    service: Option<PathBuf>,
    /// Only agents with this label (repeatable; `arch=aarch64` selects by architecture).
    #[arg(long = "selector", value_parser = muscle_protocol::parse_key_value)]
    selector: Vec<(String, String)>,
    #[arg(long, default_value_t = 1)]
    canary_per_arch: usize,
    #[arg(long, default_value_t = 2)]
    max_parallel: usize,
    /// Overrides the service spec's min_healthy_time.
    #[arg(long, value_parser = parse_duration)]
    min_healthy_time: Option<Duration>,
    /// Overrides the service spec's healthy_deadline.
    #[arg(long, value_parser = parse_duration)]
    healthy_deadline: Option<Duration>,
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    progress_deadline: Duration,
    #[arg(long, default_value_t = 1)]
    max_failures: u32,
    #[arg(long)]
    auto_rollback: bool,
    /// Replace the app's active rollout instead of refusing to start.
    #[arg(long)]
    supersede: bool,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("muscle-deploy: error: {}", muscle_protocol::causes(&*e));
        std::process::exit(1);
    }
}

fn data_dir(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .context("no --data-dir given and neither $XDG_DATA_HOME nor $HOME is set")?;
    Ok(base.join("muscle"))
}

fn run(cli: Cli) -> Result<()> {
    let dir = data_dir(cli.data_dir)?;
    if let Command::Keygen { out } = &cli.command {
        return keygen(out);
    }
    if let Command::Tls(TlsCommand::Init { out, names }) = &cli.command {
        return tls_init(out, names);
    }
    // Only publish and serve make a store; anything else in a folder without one is a mistyped
    // --data-dir, not an empty fleet.
    let creates = matches!(cli.command, Command::Publish { .. } | Command::Serve { .. });
    if !creates && !dir.join("muscle.db").is_file() {
        bail!(
            "no store in {} (no muscle.db): check --data-dir or $MUSCLE_DATA_DIR; \
             `muscle-deploy publish` or `serve` creates one",
            dir.display()
        );
    }
    let reads_only = matches!(
        cli.command,
        Command::Releases { .. }
            | Command::Fleet { .. }
            | Command::Fsck { .. }
            | Command::Rollout(RolloutCommand::Status { .. })
    );
    let opened = if reads_only {
        SqliteStore::open_read_only(&dir)
    } else {
        SqliteStore::open(&dir)
    };
    let store: Arc<dyn Store> =
        Arc::new(opened.with_context(|| format!("opening the store in {}", dir.display()))?);
    match cli.command {
        Command::Publish {
            dir: release,
            trusted_keys,
        } => {
            let blobs = FsBlobStore::open(&dir)?;
            let keys = load_keys(&trusted_keys, &dir)?;
            let p = publish::publish(&release, store.as_ref(), &blobs, &keys, now_ms())?;
            let m = &p.manifest;
            match (p.new, p.repaired) {
                (true, _) => println!(
                    "published {} {} ({} artifacts)",
                    m.app,
                    m.version,
                    m.artifacts.len()
                ),
                (false, 0) => println!(
                    "{} {} is already published; nothing to do",
                    m.app, m.version
                ),
                (false, n) => println!(
                    "{} {} is already published; repaired {n} damaged blob(s) from it",
                    m.app, m.version
                ),
            }
        }
        Command::Releases { json } => {
            let releases = store.releases()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&views::release_rows(&releases))?
                );
            } else {
                print!("{}", views::releases_table(&releases));
            }
        }
        Command::Serve {
            listen,
            blob_base_url,
            interval,
            log_format,
            tick,
            enroll_token,
            admin_token,
            tls_cert,
            tls_key,
            max_connections,
        } => {
            muscle_logline::init("muscle-deploy", log_format == LogFormat::Json);
            if interval.is_some() {
                say!(
                    "serve --interval is ignored: each agent checks in at its own \
                     `muscle-agent run --interval`"
                );
            }
            // Everything that can fail fails before "serving on" is printed.
            let tls = tls_cert
                .zip(tls_key)
                .map(|(cert, key)| listen::tls_acceptor(&cert, &key))
                .transpose()?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut limits = listen::Limits::for_open_file_limit();
            if let Some(n) = max_connections {
                limits.max_connections = n as usize;
            }
            let auth = server::Auth {
                enroll_token,
                admin_token,
            };
            let blobs = Arc::new(FsBlobStore::open(&dir)?);
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                say!(
                    "serving on {scheme}://{} (store {})",
                    listener.local_addr()?,
                    dir.display()
                );
                server::serve(
                    server::Server {
                        store,
                        blobs,
                        blob_base_url,
                        auth,
                    },
                    listener,
                    tick,
                    tls,
                    limits,
                )
                .await
            })?;
        }
        Command::Rollout(cmd) => rollout_command(cmd, store.as_ref())?,
        Command::Undeploy { app, selector } => undeploy(store.as_ref(), &app, selector)?,
        Command::Fleet { json } => {
            let agents = store.agents()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&views::fleet_rows(&agents, now_ms()))?
                );
            } else {
                print!("{}", views::fleet_table(&agents, now_ms()));
            }
        }
        Command::Fsck { json } => {
            let blobs = FsBlobStore::open(&dir)?;
            let report = fsck::fsck(store.as_ref(), &blobs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            if !report.problems.is_empty() {
                std::process::exit(1);
            }
        }
        Command::Keygen { .. } | Command::Tls(_) => unreachable!("handled above"),
    }
    Ok(())
}

fn load_keys(flags: &[String], data_dir: &Path) -> Result<Vec<ed25519_dalek::VerifyingKey>> {
    let file = data_dir.join("trusted-keys");
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let from_file = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|k| (k, file.display().to_string()));
    flags
        .iter()
        .map(|k| (k.as_str(), "--trusted-key".to_owned()))
        .chain(from_file)
        .map(|(k, source)| muscle_protocol::parse_public_key(k).with_context(|| source))
        .collect()
}

fn parse_host_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?}: expected a host name or an IP address (letters, digits, '-', '.', ':')"
        ))
    }
}

fn tls_init(out: &Path, names: &[String]) -> Result<()> {
    let names = if names.is_empty() {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        if let Ok(host) = parse_host_name(host.trim()) {
            names.push(host);
        }
        names
    } else {
        names.to_vec()
    };
    let from = muscle_logline::Civil::from_unix((now_ms() / 1000).saturating_sub(86_400));
    let w = certs::init(out, &names, from)?;
    // An IPv6 address goes in brackets in a URL.
    let host = if names[0].contains(':') {
        format!("[{}]", names[0])
    } else {
        names[0].clone()
    };
    println!(
        "certificates for {} written to {} (valid for 10 years; keep ca.key offline)\n\
         serve:  muscle-deploy serve --tls-cert {} --tls-key {}\n\
         agents: muscle-agent run --server https://{}:7700 --ca-file {}",
        names.join(", "),
        out.display(),
        w.cert.display(),
        w.key.display(),
        host,
        w.ca.display()
    );
    Ok(())
}

fn keygen(out: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .context("reading /dev/urandom")?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
    writeln!(file, "{}", hex::encode(seed))?;
    println!("{}", muscle_protocol::public_key_hex(&key));
    eprintln!(
        "private key written to {} (mode 0600); the line above is the public key to trust",
        out.display()
    );
    Ok(())
}

fn rollout_command(cmd: RolloutCommand, store: &dyn Store) -> Result<()> {
    match cmd {
        RolloutCommand::Start(args) => start(args, store),
        RolloutCommand::Status { id, watch, json } => status(id, watch, json, store),
        RolloutCommand::Pause { id } => request(store, id, Request::Pause),
        RolloutCommand::Resume { id } => request(store, id, Request::Resume),
        RolloutCommand::Abort { id } => request(store, id, Request::Abort),
        RolloutCommand::Rollback { id } => request(store, id, Request::Rollback),
    }
}

fn start(args: StartArgs, store: &dyn Store) -> Result<()> {
    let Some(release) = store.release(&args.app, &args.version)? else {
        let known: Vec<String> = store
            .releases()?
            .into_iter()
            .filter(|r| r.app == args.app)
            .map(|r| r.version)
            .collect();
        bail!("{} {} is not published (published versions: {}); run `muscle-deploy publish dist/{}-{}` first", args.app, args.version, if known.is_empty() { "none".into() } else { known.join(", ") }, args.app, args.version);
    };
    let signed = ReleaseManifest::parse(release.manifest.as_bytes())
        .with_context(|| format!("the stored manifest of {} {}", args.app, args.version))?
        .service;
    let mut service = match (&args.service, &signed) {
        (Some(path), _) => ServiceSpec::read_file(path)?,
        (None, Some(spec)) => spec.clone(),
        (None, None) => ServiceSpec::default(),
    };
    if let Some(d) = args.min_healthy_time {
        service.min_healthy_time = d;
    }
    if let Some(d) = args.healthy_deadline {
        service.healthy_deadline = d;
    }
    service.validate()?;
    if signed.as_ref().is_some_and(|s| *s != service) {
        eprintln!(
            "note: {} {} carries a signed service spec; agents that pin release keys run it, not \
             this rollout's --service/timings",
            args.app, args.version
        );
    }
    let active: Vec<Rollout> = store
        .rollouts()?
        .into_iter()
        .filter(|r| r.app == args.app && r.status.is_active())
        .collect();
    if !active.is_empty() && !args.supersede {
        bail!(
            "rollout {} of {} is still {:?}; wait for it, abort it, or pass --supersede",
            active[0].id,
            args.app,
            active[0].status
        );
    }
    let params = Params {
        selector: args.selector.into_iter().collect::<BTreeMap<_, _>>(),
        canary_per_arch: args.canary_per_arch,
        max_parallel: args.max_parallel.max(1),
        min_healthy_time: service.min_healthy_time,
        healthy_deadline: service.healthy_deadline,
        progress_deadline: args.progress_deadline,
        max_failures: args.max_failures.max(1),
        auto_rollback: args.auto_rollback,
    };
    let rollout = Rollout::plan(
        &args.app,
        &args.version,
        service,
        params,
        &store.agents()?,
        now_ms(),
    )
    .map_err(anyhow::Error::msg)?;
    check_artifacts(&release.manifest, &rollout)?;
    for old in &active {
        store.request_rollout(old.id, Request::Supersede)?;
    }
    let id = store.create_rollout(&rollout)?;
    let waves: Vec<String> = rollout
        .waves
        .iter()
        .map(|w| format!("{} ({})", w.name, w.members.len()))
        .collect();
    println!(
        "rollout {id}: {} {} to {} agents in waves: {}",
        args.app,
        args.version,
        rollout.members().count(),
        waves.join(", ")
    );
    Ok(())
}

/// Every selected agent must find a binary of its architecture in the release.
fn check_artifacts(manifest: &str, rollout: &Rollout) -> Result<()> {
    let manifest = ReleaseManifest::parse(manifest.as_bytes())?;
    let binary = rollout.service.binary_name(&rollout.app);
    let missing: Vec<String> = rollout
        .members()
        .filter(|m| manifest.artifact(binary, &m.arch).is_none())
        .map(|m| format!("{} ({})", m.agent_id, m.arch))
        .collect();
    if !missing.is_empty() {
        let have: Vec<String> = manifest
            .artifacts
            .iter()
            .map(|a| format!("{}/{}", a.arch, a.binary))
            .collect();
        bail!(
            "{} {} has no `{binary}` binary for agents {}; the release has {}",
            rollout.app,
            rollout.version,
            missing.join(", "),
            have.join(", ")
        );
    }
    Ok(())
}

/// Queues `what` after checking it against the rollout's transition table now: an illegal
/// request is refused here, with the reason, not dropped later by the engine.
fn request(store: &dyn Store, id: i64, what: Request) -> Result<()> {
    let Some(rollout) = store.rollout(id)? else {
        bail!("there is no rollout {id}; `muscle-deploy rollout status` lists the newest")
    };
    rollout.check_request(what).map_err(anyhow::Error::msg)?;
    rollout
        .check_rollback_is_newest(what, engine::newer_rollout(store, &rollout)?)
        .map_err(anyhow::Error::msg)?;
    store.request_rollout(id, what)?;
    println!(
        "rollout {id}: {} requested; the deployer applies it at its next tick",
        what.as_str()
    );
    Ok(())
}

fn status(id: Option<i64>, watch: bool, json: bool, store: &dyn Store) -> Result<()> {
    let find = |store: &dyn Store| -> Result<Rollout> {
        let found = match id {
            Some(id) => store.rollout(id)?,
            None => store.rollouts()?.pop(),
        };
        found.with_context(|| match id {
            Some(id) => format!("there is no rollout {id}"),
            None => "there are no rollouts yet; start one with `muscle-deploy rollout start APP VERSION`".into(),
        })
    };
    if watch && json {
        return watch_json(store, &find);
    }
    if watch {
        return watch_rollout(store, &find);
    }
    let rollout = find(store)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rollout)?);
    } else {
        print!("{}", views::rollout_summary(&rollout));
    }
    Ok(())
}

/// The rollout as one JSON line each time it changes, until it ends (`--watch --json`).
fn watch_json(store: &dyn Store, find: &dyn Fn(&dyn Store) -> Result<Rollout>) -> Result<()> {
    let mut last: Option<Rollout> = None;
    loop {
        let r = find(store)?;
        if last.as_ref() != Some(&r) {
            println!("{}", serde_json::to_string(&r)?);
            last = Some(r.clone());
        }
        if !r.status.is_active() {
            return ended(&r);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A watch exits 0 only for a clean success.
fn ended(r: &Rollout) -> Result<()> {
    if r.status == Status::Succeeded {
        Ok(())
    } else {
        bail!("rollout {} ended {:?}", r.id, r.status)
    }
}

/// Progress bars per wave (healthy members of members), until the rollout ends.
fn watch_rollout(store: &dyn Store, find: &dyn Fn(&dyn Store) -> Result<Rollout>) -> Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let first = find(store)?;
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>10} [{bar:24}] {pos}/{len} {wide_msg}")
        .expect("valid template")
        .progress_chars("=> ");
    let bars: Vec<ProgressBar> = first
        .waves
        .iter()
        .map(|w| {
            let bar = multi.add(ProgressBar::new(w.members.len() as u64));
            bar.set_style(style.clone());
            bar.set_prefix(w.name.clone());
            bar
        })
        .collect();
    let on_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_message = String::new();
    loop {
        let r = find(store)?;
        for (bar, wave) in bars.iter().zip(&r.waves) {
            bar.set_position(wave.count(rollout::MemberState::Healthy) as u64);
            let failed = wave.count(rollout::MemberState::Failed);
            bar.set_message(if failed > 0 {
                format!("{failed} failed")
            } else {
                String::new()
            });
        }
        if r.message != last_message {
            if !on_terminal {
                eprintln!("rollout {}: {:?}: {}", r.id, r.status, r.message);
            }
            last_message = r.message.clone();
        }
        if !r.status.is_active() {
            bars.iter().for_each(ProgressBar::abandon);
            print!("{}", views::rollout_summary(&r));
            return ended(&r);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `muscle-deploy undeploy`: tombstones for the matching agents that have the app assigned or
/// report running it; from every agent, it also withdraws the app's standing rollout. Refused
/// while a rollout of the app is in progress (it would assign it again).
fn undeploy(store: &dyn Store, app: &Name, selector: Vec<(String, String)>) -> Result<()> {
    if app.as_str() == muscle_protocol::SELF_APP {
        bail!("{app} is the agent itself: it cannot be undeployed (roll out the version to run)");
    }
    let selector: BTreeMap<String, String> = selector.into_iter().collect();
    let agents: Vec<_> = store
        .agents()?
        .into_iter()
        .filter(|a| rollout::selects(&selector, a))
        .collect();
    let chosen: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    let reporting: BTreeSet<String> = agents
        .iter()
        .filter(|a| a.report(app).is_some_and(|r| r.installed_version.is_some()))
        .map(|a| a.id.clone())
        .collect();
    let outcome = store.undeploy(&store::Undeploy {
        app,
        agent_ids: &chosen,
        reporting: &reporting,
        withdraw_at_ms: selector.is_empty().then(now_ms),
    })?;
    let (removed, withdrawn) = match outcome {
        store::Undeployed::From { agents, withdrawn } => (agents, withdrawn),
        store::Undeployed::RolloutInProgress { id, status } => bail!(
            "rollout {id} of {app} is {status:?}: abort it first (`muscle-deploy rollout abort {id}`)"
        ),
    };
    if !withdrawn.is_empty() {
        let ids: Vec<String> = withdrawn.iter().map(i64::to_string).collect();
        println!(
            "rollout(s) {} of {app} withdrawn: agents that join later do not get it",
            ids.join(", ")
        );
    }
    if removed.is_empty() && withdrawn.is_empty() {
        bail!(
            "no agent{} has {app} assigned or running: nothing to undeploy",
            if selector.is_empty() {
                ""
            } else {
                " matching the selector"
            }
        );
    }
    if !removed.is_empty() {
        println!(
            "{app} taken off {} agent(s): {} (each stops and uninstalls it at its next check-in)",
            removed.len(),
            removed.join(", ")
        );
    }
    Ok(())
}
