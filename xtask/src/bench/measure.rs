//! Timing, resource and load-generator helpers for the benchmarks.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::Figure;

/// The median and spread of `values`.
pub fn figure(mut values: Vec<f64>) -> Figure {
    values.sort_by(|a, b| a.total_cmp(b));
    let median = if values.is_empty() {
        f64::NAN
    } else {
        values[values.len() / 2]
    };
    Figure {
        median,
        min: values.first().copied().unwrap_or(f64::NAN),
        max: values.last().copied().unwrap_or(f64::NAN),
        samples: values.len(),
    }
}

pub fn one(value: f64) -> Figure {
    figure(vec![value])
}

/// Wall time of `reps` runs of `cmd` (after `before` each time), in `unit_scale` units per second.
pub fn time_runs(
    reps: usize,
    mut before: impl FnMut() -> Result<()>,
    mut cmd: impl FnMut() -> Command,
) -> Result<Figure> {
    let mut samples = Vec::new();
    for _ in 0..reps {
        before()?;
        let mut c = cmd();
        c.stdout(Stdio::null()).stderr(Stdio::null());
        let start = Instant::now();
        let status = c
            .status()
            .with_context(|| format!("cannot run {}", crate::util::describe(&c)))?;
        let elapsed = start.elapsed();
        if !status.success() {
            bail!("{} failed with {status}", crate::util::describe(&c));
        }
        samples.push(elapsed.as_secs_f64());
    }
    Ok(figure(samples))
}

/// Scales a figure (e.g. seconds to milliseconds, or total to per item).
pub fn scale(f: Figure, by: f64) -> Figure {
    Figure {
        median: f.median * by,
        min: f.min * by,
        max: f.max * by,
        samples: f.samples,
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// User + system CPU time a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// Runs wrk against `url` and returns requests per second.
pub fn wrk(url: &str, script: Option<&Path>, connections: u32, seconds: u32) -> Result<f64> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s")]);
    if let Some(script) = script {
        cmd.arg("-s").arg(script);
    }
    cmd.arg(url);
    let out = crate::util::output(&mut cmd)?;
    if let Some(line) = out.lines().find(|l| l.contains("Non-2xx or 3xx responses")) {
        bail!("wrk against {url} got errors: {line}");
    }
    let line = out
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?;
    Ok(line.split_whitespace().nth(1).context("rate")?.parse()?)
}

/// nginx serving `root` on loopback, stopped on drop.
pub struct Nginx {
    child: Child,
    pub port: u16,
}

impl Nginx {
    pub fn start(dir: &Path, root: &Path) -> Result<Nginx> {
        let port = muscle_e2e::free_port();
        std::fs::create_dir_all(dir.join("logs"))?;
        let conf = format!(
            "worker_processes 2;\ndaemon off;\nerror_log stderr;\npid {dir}/nginx.pid;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n  server {{ listen 127.0.0.1:{port}; location / {{ root {root}; }} }}\n}}\n",
            dir = dir.display(),
            root = root.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let nginx = if Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx".to_owned()
        } else {
            "nginx".to_owned()
        };
        let child = Command::new(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nginx")?;
        let url = format!("http://127.0.0.1:{port}/");
        muscle_e2e::wait_until("nginx to answer", Duration::from_secs(10), || {
            Ok(match ureq::get(&url).call() {
                Ok(_) | Err(ureq::Error::Status(..)) => Some(()),
                Err(_) => None,
            })
        })?;
        Ok(Nginx { child, port })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: nginx's graceful stop, which also stops its workers.
        let _ = Command::new("kill")
            .arg("-QUIT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
