//! `muscle-deploy`: publishes releases into its store, serves agents, and rolls releases out
//! across the fleet in health-gated waves.

#[macro_use]
extern crate muscle_logline;

mod access;
mod auth;
mod certs;
mod cli;
mod engine;
mod exec;
mod failpoint;
mod fsck;
mod job_api;
mod keys;
mod listen;
mod publish;
mod rollout;
mod server;
mod service_logs;
mod steer;
mod store;
mod views;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::cli::{Cli, Command, LogFormat, RolloutCommand, ServeArgs, TlsCommand, TokenCommand};
use crate::store::{FsBlobStore, SqliteStore, Store};

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
        return keys::keygen(out);
    }
    if let Command::Tls(TlsCommand::Init { out, names }) = &cli.command {
        return keys::tls_init(out, names);
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
            | Command::Audit { .. }
            | Command::Token(TokenCommand::List { .. })
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
            let keys = keys::load_keys(&trusted_keys, &dir)?;
            let p = publish::publish(&release, store.as_ref(), &blobs, &keys, now_ms())?;
            let m = &p.manifest;
            if p.new {
                access::record(
                    store.as_ref(),
                    store::Change::Publish {
                        app: m.app.to_string(),
                        version: m.version.to_string(),
                    },
                )?;
            }
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
        Command::Serve(args) => serve(args, store, &dir)?,
        Command::Rollout(cmd) => steer::rollout_command(cmd, store.as_ref())?,
        Command::Undeploy { app, selector } => steer::undeploy(store.as_ref(), &app, selector)?,
        Command::Exec(args) => {
            if !exec::exec(args, store.as_ref())? {
                std::process::exit(1);
            }
        }
        Command::Token(cmd) => access::token_command(cmd, store.as_ref())?,
        Command::Audit { limit, json } => access::audit(store.as_ref(), limit, json)?,
        Command::Logs(args) => service_logs::logs(args, store.as_ref())?,
        Command::Jobs { id, json } => exec::jobs(id.as_deref(), json, store.as_ref())?,
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

/// `serve`: everything that can fail (TLS files, the port) fails before "serving on" is said.
fn serve(args: ServeArgs, store: Arc<dyn Store>, dir: &Path) -> Result<()> {
    muscle_logline::init("muscle-deploy", args.log_format == LogFormat::Json);
    if args.interval.is_some() {
        say!(
            "serve --interval is ignored: each agent checks in at its own \
             `muscle-agent run --interval`"
        );
    }
    let tls = args
        .tls_cert
        .zip(args.tls_key)
        .map(|(cert, key)| listen::tls_acceptor(&cert, &key))
        .transpose()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut limits = listen::Limits::for_open_file_limit();
    if let Some(n) = args.max_connections {
        limits.max_connections = n as usize;
    }
    let auth = server::Auth {
        enroll_token: args.enroll_token,
        admin_token: args.admin_token,
    };
    let blobs = Arc::new(FsBlobStore::open(dir)?);
    let listen = args.listen;
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
                store: store.clone(),
                blobs,
                blob_base_url: args.blob_base_url,
                auth,
                engine_wake: Arc::new(tokio::sync::Notify::new()),
                job_wake: job_api::JobWake::watch(store.clone(), limits.max_connections),
            },
            listener,
            args.tick,
            tls,
            limits,
        )
        .await
    })
}
