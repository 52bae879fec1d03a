//! An S3-compatible server on loopback: `s3s-fs` from crates.io (`cargo xtask setup` installs
//! it), which keeps buckets as directories and checks every request's signature.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{free_port, wait_until};

pub const ACCESS_KEY: &str = "muscle-test";
pub const SECRET_KEY: &str = "muscle-test-secret";

pub struct S3Server {
    pub port: u16,
    /// Where the buckets are, one directory each.
    pub root: PathBuf,
    child: Child,
}

impl S3Server {
    /// Starts the server with its buckets under `dir` (made), `buckets` made empty.
    pub fn start(dir: &Path, buckets: &[&str]) -> Result<S3Server> {
        let root = dir.join("buckets");
        for bucket in buckets {
            std::fs::create_dir_all(root.join(bucket))?;
        }
        let port = free_port();
        let log = std::fs::File::create(dir.join("s3s-fs.log"))?;
        let child = Command::new(binary()?)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start s3s-fs")?;
        let server = S3Server { port, root, child };
        wait_until(
            "s3s-fs to accept connections",
            Duration::from_secs(10),
            || {
                Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ()))
            },
        )?;
        Ok(server)
    }

    /// `--blob-store` for `bucket` on this server.
    pub fn url(&self, bucket: &str) -> String {
        format!("s3://{bucket}?endpoint=http://127.0.0.1:{}", self.port)
    }

    /// The credentials, as the environment gives them to a client.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `s3s-fs` on PATH or where `cargo install` put it.
fn binary() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file());
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    on_path
        .or_else(|| {
            cargo_home
                .map(|h| h.join("bin/s3s-fs"))
                .filter(|p| p.is_file())
        })
        .context("no s3s-fs on PATH nor in ~/.cargo/bin: `cargo xtask setup` installs it")
}
