//! The command line of `muscle-deploy`: what each command takes.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use muscle_protocol::duration::parse as parse_duration;
use muscle_protocol::Name;

#[derive(Parser)]
#[command(
    name = "muscle-deploy",
    version,
    about = "Publish releases, serve agents, roll out in health-gated waves"
)]
pub struct Cli {
    /// Where the store lives (SQLite database + blobs/). Default: $MUSCLE_DATA_DIR, else ~/.local/share/muscle.
    #[arg(long, global = true, env = "MUSCLE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Speak to the deployer at this URL instead of a local store (publish, releases, fleet,
    /// agent, rollout, undeploy, audit), with the token in $MUSCLE_TOKEN.
    #[arg(long, global = true, env = "MUSCLE_SERVER")]
    pub server: Option<String>,
    /// Keep the records (releases, agents, rollouts, jobs, tokens, audit) in PostgreSQL instead
    /// of the SQLite file in --data-dir: `postgres://USER@HOST:PORT/DB`. Several `serve`
    /// replicas may share one database.
    #[arg(long, global = true, env = "MUSCLE_DATABASE", value_parser = parse_database_url)]
    pub database: Option<String>,
    /// Keep blobs (the releases' files) in an S3-compatible bucket instead of DATA_DIR/blobs:
    /// `s3://BUCKET?endpoint=URL&region=REGION`, with $AWS_ACCESS_KEY_ID and
    /// $AWS_SECRET_ACCESS_KEY. Replicas share it; each serves verified copies from its data dir.
    #[arg(long, global = true, env = "MUSCLE_BLOB_STORE", value_parser = parse_blob_store_url)]
    pub blob_store: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    Serve(ServeArgs),
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
    /// Run a command on the live agents matching the selector; each agent's output and exit
    /// status is shown as it arrives. Exits 1 when any failed, timed out, refused or did not
    /// answer.
    Exec(ExecArgs),
    /// Jobs run by `exec`, newest first, with their tallies; with an id, that job's results.
    Jobs {
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A service's log on one agent: its last lines, then new ones as they are written with
    /// --follow (until Ctrl-C, or an hour). The agent sends them over its own connection to the
    /// deployer.
    Logs(LogsArgs),
    /// API tokens with roles (read-only, publisher, operator) for the JSON views and the API.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Every change made to the store (publish, rollouts, undeploy, jobs, tokens): when, who,
    /// what; oldest first.
    Audit {
        /// How many of the newest changes.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Agents with arch, labels, versions, health and last check-in.
    Fleet {
        #[arg(long)]
        json: bool,
    },
    /// One agent: its row as `fleet` shows it, and its history (installs, rollbacks and
    /// refusals, health changes, removals), oldest first.
    Agent {
        id: String,
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
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a token: its secret is printed once; only its sha256 is kept.
    Create {
        name: Name,
        #[arg(long, value_enum)]
        role: crate::store::Role,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a token: requests bearing it are refused from now on.
    Revoke { name: Name },
}

#[derive(Subcommand)]
pub enum TlsCommand {
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
pub enum RolloutCommand {
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
pub struct StartArgs {
    pub app: Name,
    pub version: Name,
    /// Service spec (TOML or JSON): args, env, health check, timings. Default: run the binary named like the app.
    #[arg(long)]
    pub service: Option<PathBuf>,
    /// Only agents with this label (repeatable; `arch=aarch64` selects by architecture).
    #[arg(long = "selector", value_parser = muscle_protocol::parse_key_value)]
    pub selector: Vec<(String, String)>,
    #[arg(long, default_value_t = 1)]
    pub canary_per_arch: usize,
    #[arg(long, default_value_t = 2)]
    pub max_parallel: usize,
    /// Overrides the service spec's min_healthy_time.
    #[arg(long, value_parser = parse_duration)]
    pub min_healthy_time: Option<Duration>,
    /// Overrides the service spec's healthy_deadline.
    #[arg(long, value_parser = parse_duration)]
    pub healthy_deadline: Option<Duration>,
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub progress_deadline: Duration,
    #[arg(long, default_value_t = 1)]
    pub max_failures: u32,
    #[arg(long)]
    pub auto_rollback: bool,
    /// Replace the app's active rollout instead of refusing to start.
    #[arg(long)]
    pub supersede: bool,
}

#[derive(Args)]
pub struct ExecArgs {
    /// Only agents with this label (repeatable; `arch=aarch64` selects by architecture).
    #[arg(long = "selector", value_parser = muscle_protocol::parse_key_value)]
    pub selector: Vec<(String, String)>,
    /// How many agents run it at once (default: all).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_parallel: Option<u32>,
    /// Each agent kills the command (and what it started) after this.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Sign the job with this operator key (`muscle-deploy keygen`): agents that pin keys run
    /// only jobs signed by one of them.
    #[arg(long, env = "MUSCLE_SIGNING_KEY")]
    pub sign_key: Option<PathBuf>,
    /// Print the job and every result as JSON at the end instead of text as they arrive.
    #[arg(long)]
    pub json: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args)]
pub struct LogsArgs {
    /// The agent's id, as `fleet` lists it.
    pub agent: Name,
    /// The app whose service log to read.
    pub app: Name,
    /// Keep printing lines as the service writes them.
    #[arg(long, short)]
    pub follow: bool,
    /// Only lines written within this long (`10m`, `1h`).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// How many of the last lines to print first.
    #[arg(long, short = 'n', default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(muscle_protocol::MAX_LOG_TAIL)))]
    pub tail: u32,
}

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: String,
    /// Base URL agents download blobs from instead of this server (any static server or CDN
    /// serving DATA_DIR/blobs as /v1/blobs/sha256/<hex>).
    #[arg(long)]
    pub blob_base_url: Option<String>,
    /// The server's log on stderr: stamped lines, or JSON lines for a log shipper.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Accepted for old command lines and ignored: each agent checks in at its own interval.
    #[arg(long, hide = true)]
    pub interval: Option<String>,
    /// How often the rollout engine advances rollouts.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub tick: Duration,
    /// Require agents to enrol with this token, then check in with their own credential.
    #[arg(long, env = "MUSCLE_ENROLL_TOKEN")]
    pub enroll_token: Option<String>,
    /// A token with every right (beside those `token create` makes); with it or any stored
    /// token, the API needs `Authorization: Bearer <token>`.
    #[arg(long, env = "MUSCLE_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Trusted ed25519 public key (hex, repeatable) for releases uploaded to `POST /v1/releases`;
    /// also read from DATA_DIR/trusted-keys at each upload.
    #[arg(long = "trusted-key")]
    pub trusted_keys: Vec<String>,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The deployer's URL as network-booted machines reach it, put on their kernel command line
    /// (default: http://HOST:PORT from their boot request's Host header).
    #[arg(long, value_name = "URL", value_parser = muscle_protocol::parse_url)]
    pub boot_server: Option<String>,
    /// Kernel command line words added to every network boot (labels, `muscle.var=`...).
    #[arg(long, value_name = "WORDS", value_parser = crate::boot::check_boot_args, default_value = "")]
    pub boot_args: String,
    /// Give each network-booted machine a one-time enrolment token on its kernel command line,
    /// good for that machine's id only, so that it joins (again, at every boot) by itself.
    /// Whoever can ask GET /boot/ipxe/machine for a MAC address can enrol as that machine:
    /// serve boot on a network you trust, as with any PXE setup.
    #[arg(long, requires = "enroll_token")]
    pub boot_enroll: bool,
    /// Connections served at once (default: from the open-file limit); more wait to be
    /// accepted. Each client has 5 s for its TLS handshake and request headers.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
}

pub fn parse_host_name(s: &str) -> Result<String, String> {
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

/// A PostgreSQL URL: what else is given is said, not guessed at.
fn parse_database_url(s: &str) -> Result<String, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(s.to_owned())
    } else {
        Err(
            "expected a PostgreSQL URL, postgres://USER@HOST:PORT/DB (SQLite, the default, \
             needs no --database)"
                .into(),
        )
    }
}

fn parse_blob_store_url(s: &str) -> Result<String, String> {
    if s.starts_with("s3://") {
        Ok(s.to_owned())
    } else {
        Err(
            "expected s3://BUCKET?endpoint=URL&region=REGION (a directory, the default, needs \
             no --blob-store)"
                .into(),
        )
    }
}
