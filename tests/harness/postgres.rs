//! A throwaway PostgreSQL cluster from the machine's own PostgreSQL (Debian's `postgresql`):
//! `initdb` in a temp dir, the server on a free loopback port, stopped and removed on drop.
//! As root both run as the `postgres` user (PostgreSQL refuses root).

use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{free_port, wait_until};

pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    server: Option<Child>,
}

impl Postgres {
    /// Starts a cluster under `dir` (made; removed on drop). About a second here.
    pub fn start(dir: &Path) -> Result<Postgres> {
        let bin = bin_dir()?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("socket"))?;
        let user = is_root().then(postgres_user).transpose()?;
        if let Some((uid, gid)) = user {
            for d in [dir, &dir.join("socket")] {
                chown(d, Some(uid), Some(gid))?;
            }
        }
        let mut pg = Postgres {
            port: free_port(),
            dir: dir.to_owned(),
            bin,
            user,
            server: None,
        };
        let initdb = pg
            .command("initdb")
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C"])
            .output()
            .context("cannot run initdb")?;
        if !initdb.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&initdb.stderr).trim()
            );
        }
        let log = std::fs::File::create(dir.join("server.log"))?;
        if let Some((uid, gid)) = user {
            chown(dir.join("server.log"), Some(uid), Some(gid))?;
        }
        let server = pg
            .command("postgres")
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-k")
            .arg(dir.join("socket"))
            .args(["-p", &pg.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start postgres")?;
        pg.server = Some(server);
        let port = pg.port.to_string();
        let ready = || {
            // Ours, not another cluster that took the port first.
            if let Some(status) = pg.server.as_mut().and_then(|s| s.try_wait().transpose()) {
                bail!("postgres exited ({}): {}", status?, pg.log());
            }
            let out = pg
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-q"])
                .status()?;
            Ok(out.success().then_some(()))
        };
        wait_until(
            "PostgreSQL to accept connections",
            Duration::from_secs(30),
            ready,
        )
        .with_context(|| pg.log())?;
        Ok(pg)
    }

    /// A URL for the database `name`, made (empty) first: each test its own.
    pub fn database(&self, name: &str) -> Result<String> {
        let out = self
            .command("createdb")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", name])
            .output()?;
        if !out.status.success() {
            bail!(
                "createdb {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(self.url(name))
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL in `database` with psql; returns its unaligned output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                database,
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-c", sql])
            .output()?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(self.bin.join(tool));
        c.stdin(Stdio::null()).current_dir(&self.dir);
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid).env("HOME", &self.dir);
        }
        c
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            // SIGINT: PostgreSQL's fast shutdown (clients disconnected, no checkpoint wait).
            let _ = Command::new("kill")
                .args(["-INT", &server.id().to_string()])
                .status();
            let stopped = wait_until("postgres to stop", Duration::from_secs(10), || {
                Ok(server.try_wait()?.map(|_| ()))
            });
            if stopped.is_err() {
                let _ = server.kill();
                let _ = server.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest PostgreSQL server installed the Debian way (`/usr/lib/postgresql/N/bin`).
fn bin_dir() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no PostgreSQL server in /usr/lib/postgresql/*/bin: `cargo xtask setup` installs \
             Debian's postgresql"
        ),
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

fn postgres_user() -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres") && f.len() > 3)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .context("running as root and there is no postgres user to run PostgreSQL as")
}
