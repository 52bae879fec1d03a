//! A real `muscle-deploy serve` process on loopback, and its CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{free_port, wait_until};

/// Where a deployer keeps its records and blobs, when not in its data dir.
#[derive(Debug, Clone, Default)]
pub struct Backends {
    /// `--database`: a PostgreSQL URL.
    pub database: Option<String>,
    /// `--blob-store`: an `s3://` URL.
    pub blob_store: Option<String>,
    /// Their credentials.
    pub env: Vec<(String, String)>,
}

pub struct Deployer {
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    pub port: u16,
    /// Extra `serve` arguments (tokens, ...), kept across restarts.
    pub serve_args: Vec<String>,
    /// Extra environment (failpoints, ...), kept across restarts.
    pub env: Vec<(String, String)>,
    /// Runs it under this open-file limit (soft and hard), with `prlimit`.
    pub open_file_limit: Option<u64>,
    /// Where its records and blobs live, for `serve` and the CLI alike.
    pub backends: Backends,
    child: Option<Child>,
    log: PathBuf,
}

impl Deployer {
    /// Starts `muscle-deploy serve` on a free loopback port with its store in `data_dir`.
    pub fn start(bin: &Path, data_dir: &Path) -> Result<Deployer> {
        Deployer::start_with(bin, data_dir, &[])
    }

    /// Like [`start`](Self::start), with extra `serve` arguments.
    pub fn start_with(bin: &Path, data_dir: &Path, serve_args: &[&str]) -> Result<Deployer> {
        Deployer::start_on(bin, data_dir, &Backends::default(), serve_args)
    }

    /// Like [`start_with`](Self::start_with), its records and blobs where `backends` say.
    pub fn start_on(
        bin: &Path,
        data_dir: &Path,
        backends: &Backends,
        serve_args: &[&str],
    ) -> Result<Deployer> {
        std::fs::create_dir_all(data_dir)?;
        let mut d = Deployer {
            bin: bin.to_owned(),
            data_dir: data_dir.to_owned(),
            port: free_port(),
            serve_args: serve_args.iter().map(|a| a.to_string()).collect(),
            env: vec![],
            open_file_limit: None,
            backends: backends.clone(),
            child: None,
            log: data_dir.join("deployer.log"),
        };
        d.spawn()?;
        Ok(d)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = match self.open_file_limit {
            None => Command::new(&self.bin),
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(&self.bin);
                c
            }
        };
        let child = command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(self.backend_args())
            .envs(self.backends.env.iter().map(|(k, v)| (k, v)))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--tick",
                "200ms",
            ])
            .args(&self.serve_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        let url = format!("{}/healthz", self.url());
        if self.tls() {
            // The harness speaks plain HTTP only: a TLS deployer is up once it accepts.
            let addr = ("127.0.0.1", self.port);
            return wait_until(
                "the deployer to accept connections",
                Duration::from_secs(30),
                || Ok(std::net::TcpStream::connect(addr).ok().map(|_| ())),
            );
        }
        wait_until(
            "the deployer to answer /healthz",
            Duration::from_secs(30),
            || Ok(ureq::get(&url).call().ok().map(|_| ())),
        )
    }

    fn backend_args(&self) -> Vec<&str> {
        let b = &self.backends;
        let database = b.database.iter().flat_map(|url| ["--database", url]);
        let blobs = b.blob_store.iter().flat_map(|url| ["--blob-store", url]);
        database.chain(blobs).collect()
    }

    fn tls(&self) -> bool {
        self.serve_args.iter().any(|a| a == "--tls-cert")
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Runs a `muscle-deploy` CLI command against this deployer's store.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.bin)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(self.backend_args())
            .envs(self.backends.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run muscle-deploy")
    }

    /// Runs a `muscle-deploy` CLI command as an operator elsewhere would: in `cwd`, with no data
    /// dir anywhere (HOME is `cwd`), only `--server` and the token in `MUSCLE_TOKEN`.
    pub fn remote(&self, token: &str, cwd: &Path, args: &[&str]) -> Result<Output> {
        Command::new(&self.bin)
            .arg("--server")
            .arg(self.url())
            .args(args)
            .current_dir(cwd)
            .env_remove("MUSCLE_DATA_DIR")
            .env_remove("XDG_DATA_HOME")
            .env("HOME", cwd)
            .env("MUSCLE_TOKEN", token)
            .stdin(Stdio::null())
            .output()
            .context("cannot run muscle-deploy")
    }

    /// Like [`cli`](Self::cli), failing unless the command succeeds; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "muscle-deploy {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn publish(&self, release: &Path) -> Result<String> {
        self.ok(&["publish", release.to_str().context("non-UTF-8 path")?])
    }

    /// Starts a rollout with `args` after `rollout start`; returns its id.
    pub fn start_rollout(&self, args: &[&str]) -> Result<i64> {
        let mut full = vec!["rollout", "start"];
        full.extend(args);
        let out = self.ok(&full)?;
        let id = out
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.trim_end_matches(':').parse().ok());
        id.with_context(|| format!("no rollout id in {out:?}"))
    }

    pub fn rollout(&self, id: Option<i64>) -> Result<serde_json::Value> {
        let id = id.map(|i| i.to_string());
        let mut args = vec!["rollout", "status", "--json"];
        args.extend(id.as_deref());
        Ok(serde_json::from_str(&self.ok(&args)?)?)
    }

    pub fn fleet(&self) -> Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_str(&self.ok(&["fleet", "--json"])?)?)
    }

    /// The fleet row of agent `id`.
    pub fn fleet_row(&self, id: &str) -> Result<serde_json::Value> {
        self.fleet()?
            .into_iter()
            .find(|r| r["id"] == id)
            .with_context(|| format!("agent {id} is not in the fleet"))
    }

    /// Waits until the rollout's status is no longer running or paused; returns it.
    pub fn wait_rollout_end(&self, id: i64, timeout: Duration) -> Result<serde_json::Value> {
        wait_until(&format!("rollout {id} to end"), timeout, || {
            let r = self.rollout(Some(id))?;
            let status = r["status"].as_str().unwrap_or_default();
            if status == "running" || status == "paused" {
                bail!("{status}: {}", r["message"]);
            }
            Ok(Some(r))
        })
    }

    /// SIGKILL: no graceful shutdown, exactly like a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until the process exits by itself (a crash, a failpoint); its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("the deployer is not running")?;
        let status = wait_until("the deployer to exit", timeout, || Ok(child.try_wait()?))?;
        self.child = None;
        Ok(status)
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Deployer {
    fn drop(&mut self) {
        self.kill9();
    }
}
