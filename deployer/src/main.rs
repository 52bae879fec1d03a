//! `muscle-deploy`: publishes releases into its store, serves agents, and rolls releases out
//! across the fleet in health-gated waves.

#[macro_use]
extern crate muscle_logline;

mod access;
mod api;
mod auth;
mod boot;
mod certs;
mod cli;
mod client;
mod commands;
mod console;
mod control;
mod engine;
mod exec;
mod failpoint;
mod fsck;
mod images;
mod install;
mod job_api;
mod keys;
mod listen;
mod ops;
mod publish;
mod rollout;
mod server;
mod service_logs;
mod steer;
mod store;
mod upload;
mod views;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::cli::{Cli, Command, LogFormat, RolloutCommand, ServeArgs, TlsCommand, TokenCommand};
use crate::store::{BlobStore, PgStore, SqliteStore, Store};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn main() {
    fewer_malloc_arenas();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("muscle-deploy: error: {}", muscle_protocol::causes(&*e));
        std::process::exit(1);
    }
}

/// glibc gives threads that allocate at once their own malloc arenas (up to 8 per core), and
/// what is freed in one stays there: after a rollout to 10,000 agents, served from the blocking
/// threads, the deployer held 449 MiB with glibc's default and 98 MiB with two arenas (one run
/// of `cargo xtask bench --only fleet-load`). `MALLOC_ARENA_MAX`, when set, still decides.
/// musl's allocator has no per-thread arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fewer_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: sets one allocator parameter, first thing in `main`, before any thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fewer_malloc_arenas() {}

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
    match cli.command {
        Command::Keygen { out } => return keys::keygen(&out),
        Command::Tls(TlsCommand::Init { out, names }) => return keys::tls_init(&out, &names),
        _ => {}
    }
    if let Some(url) = &cli.server {
        let token = std::env::var("MUSCLE_TOKEN").ok();
        return commands::remote(cli.command, &client::Remote::new(url, token)?);
    }
    let dir = data_dir(cli.data_dir)?;
    let (store, records): (Arc<dyn Store>, String) = match &cli.database {
        Some(url) => {
            let shown = store::redacted(url);
            let store = PgStore::connect(url).with_context(|| format!("opening {shown}"))?;
            (Arc::new(store), shown)
        }
        None => (open_store(&cli.command, &dir)?, dir.display().to_string()),
    };
    match cli.command {
        Command::Serve(args) => {
            let blobs = store::open_blobs(cli.blob_store.as_deref(), &dir)?;
            serve(args, store, blobs, &records, &dir)
        }
        command => commands::local(command, store, cli.blob_store.as_deref(), &dir),
    }
}

/// The SQLite store in `dir`, read-only for commands that only read it.
fn open_store(command: &Command, dir: &Path) -> Result<Arc<dyn Store>> {
    // Only publish and serve make a store; anything else in a folder without one is a mistyped
    // --data-dir, not an empty fleet.
    let creates = matches!(command, Command::Publish { .. } | Command::Serve { .. });
    if !creates && !dir.join("muscle.db").is_file() {
        bail!(
            "no store in {} (no muscle.db): check --data-dir or $MUSCLE_DATA_DIR; \
             `muscle-deploy publish` or `serve` creates one",
            dir.display()
        );
    }
    let reads_only = matches!(
        command,
        Command::Releases { .. }
            | Command::Fleet { .. }
            | Command::Agent { .. }
            | Command::Fsck { .. }
            | Command::Audit { .. }
            | Command::Token(TokenCommand::List { .. })
            | Command::Rollout(RolloutCommand::Status { .. })
    );
    let opened = if reads_only {
        SqliteStore::open_read_only(dir)
    } else {
        SqliteStore::open(dir)
    };
    Ok(Arc::new(opened.with_context(|| {
        format!("opening the store in {}", dir.display())
    })?))
}

/// `serve`: everything that can fail (TLS files, the port) fails before "serving on" is said.
fn serve(
    args: ServeArgs,
    store: Arc<dyn Store>,
    blobs: Arc<dyn BlobStore>,
    records: &str,
    dir: &Path,
) -> Result<()> {
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
    let boot = boot::BootSettings {
        server: args.boot_server,
        args: args.boot_args,
        enrol: args.boot_enroll,
    };
    let auth = server::Auth {
        enroll_token: args.enroll_token,
        admin_token: args.admin_token,
    };
    upload::clear(dir)?;
    // A bad key fails the start, not the first upload.
    keys::load_keys(&args.trusted_keys, dir)?;
    let listen = args.listen;
    // Store calls block (SQLite, PostgreSQL's client): a bounded pool of threads for them, not
    // tokio's 512, each of which would keep its own malloc arena.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        say!(
            "serving on {scheme}://{} (store {records}, blobs in {})",
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
                data_dir: dir.to_owned(),
                trusted_keys: args.trusted_keys,
                uploads: Arc::new(tokio::sync::Semaphore::new(2)),
                tls: tls.is_some(),
                stopping: tokio_util::sync::CancellationToken::new(),
                console: console::Shared::new(limits.max_connections),
                boot,
            },
            listener,
            args.tick,
            tls,
            limits,
        )
        .await
    })
}
