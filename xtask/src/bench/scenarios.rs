//! The benchmark scenarios, each returning rows with a baseline measured in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use muscle_e2e::{
    host_deployer, release_agents, release_hello, Artifacts, Deployer, Fleet, HelloVersion,
};
use serde_json::{json, Value};

use super::measure::{self, figure, one, scale, time_runs};
use super::{Row, Settings};
use crate::release::build::{apply_target_env, target_env};
use crate::release::workspace::{Provenance, Workspace};
use crate::{targets, util};

const X86: &str = "x86_64-unknown-linux-musl";
const ARM: &str = "aarch64-unknown-linux-musl";

pub fn all(s: &Settings) -> Result<Vec<Row>> {
    let dist = s.dir.join("dist");
    eprintln!(
        "bench: building the optimised deployer, the agent and hello-service for both targets"
    );
    let deployer = host_deployer(true)?;
    let agents = release_agents(&dist)?;
    let hello = release_hello(
        HelloVersion {
            version: "0.1.0",
            unhealthy: false,
        },
        &dist,
    )?;
    let mut rows = Vec::new();
    if s.wants("release") {
        eprintln!("bench: release overhead");
        rows.extend(release_overhead(s, &dist)?);
    }
    if s.wants("verify") {
        eprintln!("bench: verification");
        rows.extend(verification(s, &agents, &hello)?);
    }
    if s.wants("agent-size") {
        eprintln!("bench: agent size");
        rows.extend(agent_size(s, &agents)?);
    }
    if s.wants("agent-idle") {
        eprintln!("bench: agent idle footprint");
        rows.extend(agent_idle(s, &deployer, &agents, &hello)?);
    }
    if s.wants("checkins") {
        eprintln!("bench: check-in throughput");
        rows.push(checkin_throughput(s, &deployer)?);
    }
    if s.wants("transfer") {
        eprintln!("bench: artifact transfer");
        rows.push(artifact_transfer(s, &deployer, &agents, &hello)?);
    }
    if s.wants("convergence") {
        eprintln!("bench: rollout convergence");
        rows.push(rollout_convergence(s, &deployer, &agents, &hello)?);
    }
    if s.wants("fleet-load") {
        rows.extend(super::fleet_load::rows(s, &deployer, &hello)?);
    }
    Ok(rows)
}

fn xtask() -> Result<Command> {
    Ok(Command::new(std::env::current_exe()?))
}

pub(super) fn service_spec() -> String {
    util::muscle_root()
        .join("examples/hello-service/service.toml")
        .display()
        .to_string()
}

/// `cargo xtask release` of hello-service for two targets vs plain `cargo build` of the same
/// targets, both after touching the source so that the crate really compiles, on one warm cache;
/// and where the release's time goes (its `--timings`): the cargo runs, and our own work.
fn release_overhead(s: &Settings, dist: &Path) -> Result<Vec<Row>> {
    let scratch = dist.join("src/hello-service-0.1.0");
    let manifest = scratch.join("Cargo.toml");
    let main = scratch.join("src/main.rs");
    let source = std::fs::read(&main)?;
    // Rewriting the same bytes bumps the mtime: cargo recompiles the crate, and only it.
    let touch = || std::fs::write(&main, &source).context("touching main.rs");
    let out = s.dir.join("overhead-dist");
    let release = || {
        let mut c = xtask().expect("current exe");
        c.args(["release", "--json", "--timings", "--manifest-path"])
            .arg(&manifest)
            .arg("--out")
            .arg(&out)
            .args(["--target", X86, "--target", ARM]);
        c
    };
    let muscle = time_runs(s.reps, touch, release)?;
    let mut split = (Vec::new(), Vec::new());
    for _ in 0..s.reps {
        touch()?;
        let t = release_timings(release())?;
        split.0.push(t.cargo);
        split.1.push(t.total - t.cargo);
    }
    let ws = Workspace::load(Some(&manifest), &[], &[])?;
    let provenance = Provenance::read(&ws)?;
    let all = targets::load_all(&util::muscle_root().join("targets"))?;
    let chosen = targets::select(&all, &[X86.into(), ARM.into()])?;
    let envs = chosen
        .iter()
        .map(|t| target_env(&ws, t, &provenance))
        .collect::<Result<Vec<_>>>()?;
    let baseline = time_runs(s.reps, touch, || {
        let mut c = util::cargo();
        c.args(["build", "--release", "--locked", "--manifest-path"])
            .arg(&manifest);
        for (t, env) in chosen.iter().zip(&envs) {
            c.args(["--target", &t.triple]);
            apply_target_env(&mut c, env);
        }
        c
    })?;
    let plain = "cargo build --release, same targets and cache";
    Ok(vec![
        Row::new(
            "release hello-service, 2 targets (rebuild after touch)",
            "s",
            muscle,
            plain,
            baseline.clone(),
        ),
        Row::new(
            "  of which its cargo runs (one per target, one after the other)",
            "s",
            figure(split.0),
            plain,
            baseline.clone(),
        ),
        Row::new(
            "  of which its own work (metadata, provenance, debug split, inspection, dist)",
            "s",
            figure(split.1),
            plain,
            baseline,
        ),
    ])
}

/// The `timings: {...}` line of `release --timings`.
fn release_timings(mut cmd: Command) -> Result<crate::release::Timings> {
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("timings: "))
        .context("release --timings printed no timings line")?;
    Ok(serde_json::from_str(line)?)
}

/// `cargo xtask verify` per binary vs `readelf -lhd` on the same files, both as processes; and
/// the verification alone, in process, vs the same readelf figure: the difference is what
/// starting a process costs.
fn verification(s: &Settings, agents: &Artifacts, hello: &Artifacts) -> Result<Vec<Row>> {
    let files: Vec<PathBuf> = [X86, ARM]
        .iter()
        .flat_map(|t| {
            [
                agents.binary(t, "muscle-agent"),
                hello.binary(t, "hello-service"),
            ]
        })
        .collect();
    let per_binary_ms = 1000.0 / files.len() as f64;
    let muscle = time_runs(
        s.reps * 3,
        || Ok(()),
        || {
            let mut c = xtask().expect("current exe");
            c.arg("verify").args(&files);
            c
        },
    )?;
    let baseline = time_runs(
        s.reps * 3,
        || Ok(()),
        || {
            let mut c = Command::new("readelf");
            c.arg("-lhd").args(&files);
            c
        },
    )?;
    let profile = if cfg!(debug_assertions) {
        "debug-built xtask"
    } else {
        "release-built xtask"
    };
    let targets = crate::targets::load_all(&crate::util::muscle_root().join("targets"))?;
    let mut samples = Vec::new();
    for _ in 0..s.reps * 3 {
        let start = Instant::now();
        for file in &files {
            let result = crate::verify::verify_file(file, None, &targets);
            std::hint::black_box(&result);
        }
        samples.push(start.elapsed().as_secs_f64());
    }
    let in_process = measure::figure(samples);
    let start_only = |program: PathBuf, arg: &'static str| {
        time_runs(
            s.reps * 3,
            || Ok(()),
            move || {
                let mut c = Command::new(&program);
                c.arg(arg);
                c
            },
        )
    };
    let xtask_start = start_only(std::env::current_exe()?, "--help")?;
    let readelf_start = start_only("readelf".into(), "--version")?;
    Ok(vec![
        Row::new(
            format!("process start alone ({profile} --help)"),
            "ms",
            scale(xtask_start, 1000.0),
            "readelf --version",
            scale(readelf_start, 1000.0),
        ),
        Row::new(
            format!("verify, per binary ({profile}, process incl.)"),
            "ms",
            scale(muscle, per_binary_ms),
            "readelf -lhd, same files",
            scale(baseline.clone(), per_binary_ms),
        ),
        Row::new(
            format!("verify, per binary, in process ({profile}: inspect + policy)"),
            "ms",
            scale(in_process, per_binary_ms),
            "readelf -lhd, same files (process incl.)",
            scale(baseline, per_binary_ms),
        ),
    ])
}

/// The agent's static size per target vs a minimal static `hello world` built the same way.
fn agent_size(s: &Settings, agents: &Artifacts) -> Result<Vec<Row>> {
    let ws = s.dir.join("src/hello-min");
    std::fs::create_dir_all(ws.join("src"))?;
    std::fs::write(
        ws.join("Cargo.toml"),
        "[package]\nname = \"hello-min\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n\n# The agent's release profile.\n[profile.release]\nopt-level = \"z\"\ncodegen-units = 1\nlto = \"fat\"\npanic = \"abort\"\nstrip = true\n",
    )?;
    std::fs::write(
        ws.join("src/main.rs"),
        "fn main() {\n    println!(\"hello world\");\n}\n",
    )?;
    util::run(
        util::cargo()
            .args(["generate-lockfile", "--offline", "--manifest-path"])
            .arg(ws.join("Cargo.toml")),
    )?;
    let out = s.dir.join("dist");
    util::output(
        xtask()?
            .args(["release", "--json", "--manifest-path"])
            .arg(ws.join("Cargo.toml"))
            .arg("--out")
            .arg(&out),
    )?;
    let minimal = Artifacts {
        dir: out.join("hello-min-0.1.0"),
    };
    [X86, ARM]
        .iter()
        .map(|t| {
            let kib = |p: PathBuf| -> Result<f64> {
                Ok(std::fs::metadata(&p)
                    .with_context(|| p.display().to_string())?
                    .len() as f64
                    / 1024.0)
            };
            Ok(Row::new(
                format!("agent static binary size, {t}"),
                "KiB",
                one(kib(agents.binary(t, "muscle-agent"))?),
                "static hello world, same profile",
                one(kib(minimal.binary(t, "hello-min"))?),
            ))
        })
        .collect()
}

/// One x86_64 agent supervising hello-service and checking in every 500 ms: its RSS after the
/// window vs the service's own, and its CPU time per check-in vs one `curl` check-in.
fn agent_idle(
    s: &Settings,
    deployer_bin: &Path,
    agents: &Artifacts,
    hello: &Artifacts,
) -> Result<Vec<Row>> {
    let dir = s.dir.join("idle");
    let _ = std::fs::remove_dir_all(&dir);
    let deployer = Deployer::start(deployer_bin, &dir.join("data"))?;
    deployer.publish(&hello.dir)?;
    let fleet = Fleet::start(
        deployer,
        &[(agents.binary(X86, "muscle-agent"), "x86_64")],
        1,
        &dir,
    )?;
    let id = fleet.start_rollout(&["hello-service", "0.1.0", "--service", &service_spec()])?;
    ensure!(
        fleet
            .deployer
            .wait_rollout_end(id, Duration::from_secs(120))?["status"]
            == "succeeded",
        "the idle agent's rollout failed"
    );
    let agent = &fleet.agents[0];
    let pid = agent.pid().context("agent pid")?;
    let window = if s.quick { 10.0 } else { 60.0 };
    let cpu0 = measure::cpu_seconds(pid)?;
    std::thread::sleep(Duration::from_secs_f64(window));
    let cpu1 = measure::cpu_seconds(pid)?;
    let checkins = window / 0.5;
    let agent_rss = measure::rss_kib(pid)?;
    let service_rss = measure::rss_kib(*agent.service_pids().first().context("service pid")?)?;

    let body = fleet.deployer.data_dir.join("checkin.json");
    std::fs::write(&body, serde_json::to_vec(&checkin_body("bench-curl"))?)?;
    let url = format!("{}/v1/checkin", fleet.deployer.url());
    let curls = 50;
    let before = children_cpu_seconds()?;
    for _ in 0..curls {
        util::output(
            Command::new("curl")
                .args([
                    "-sf",
                    "-o",
                    "/dev/null",
                    "-H",
                    "content-type: application/json",
                    "--data-binary",
                ])
                .arg(format!("@{}", body.display()))
                .arg(&url),
        )?;
    }
    let curl_cpu = (children_cpu_seconds()? - before) / curls as f64;
    let mut rows = vec![];
    if let Some(minutes) = s.soak_minutes {
        rows.push(rss_soak(pid, minutes)?);
    }
    rows.extend([
        Row::new(
            format!("agent RSS after {window:.0}s of check-ins (x86_64)"),
            "KiB",
            one(agent_rss),
            "hello-service RSS (tiny static Rust server)",
            one(service_rss),
        ),
        Row::new(
            "agent CPU per check-in (x86_64, incl. supervision)",
            "ms",
            one((cpu1 - cpu0) / checkins * 1000.0),
            "one check-in by a curl process",
            one(curl_cpu * 1000.0),
        ),
    ]);
    Ok(rows)
}

/// The agent's RSS sampled every minute for `minutes` while it checks in, as a least-squares
/// slope in KiB per hour, beside its RSS at the start (the ratio is the growth per hour).
fn rss_soak(pid: u32, minutes: u64) -> Result<Row> {
    eprintln!("bench: RSS soak, {minutes} min");
    let start = measure::rss_kib(pid)?;
    let mut samples = vec![(0.0, start)];
    for minute in 1..=minutes {
        std::thread::sleep(Duration::from_secs(60));
        samples.push((minute as f64 / 60.0, measure::rss_kib(pid)?));
    }
    Ok(Row::new(
        format!("agent RSS slope over {minutes} min of check-ins (x86_64)"),
        "KiB/h",
        one(slope(&samples)),
        // One unit per row: the start is KiB, not KiB/h, and the label says so.
        format!("RSS at the soak's start: {start:.0} KiB (ratio: growth/h)"),
        one(start),
    ))
}

/// The least-squares slope of `points` (x, y).
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(x, y), (px, py)| (x + px / n, y + py / n));
    let (cov, var) = points.iter().fold((0.0, 0.0), |(c, v), (x, y)| {
        (c + (x - mx) * (y - my), v + (x - mx) * (x - mx))
    });
    if var > 0.0 {
        cov / var
    } else {
        0.0
    }
}

/// CPU seconds of this process's waited-for children (cutime + cstime).
fn children_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    Ok((fields[13].parse::<f64>()? + fields[14].parse::<f64>()?) / 100.0)
}

fn checkin_body(agent_id: &str) -> Value {
    json!({
        "agent_id": agent_id, "arch": "x86_64", "hostname": "bench", "labels": {"site": "lab"},
        "agent_version": "0.1.0", "generation": 0,
        "apps": [{"app": "hello-service", "installed_version": "0.1.0", "running_version": "0.1.0", "health": "healthy",
                  "healthy_for_ms": 60000, "restarts": 0, "failed_version": null, "last_error": null, "log_tail": null}]
    })
}

/// Check-ins per second with unchanged desired state vs nginx serving a static file of the same
/// size as the answer, same wrk load.
fn checkin_throughput(s: &Settings, deployer_bin: &Path) -> Result<Row> {
    let dir = s.dir.join("throughput");
    let _ = std::fs::remove_dir_all(&dir);
    let deployer = Deployer::start(deployer_bin, &dir.join("data"))?;
    let url = format!("{}/v1/checkin", deployer.url());
    let body = checkin_body("bench-wrk").to_string();
    let answer = ureq::post(&url)
        .set("content-type", "application/json")
        .send_string(&body)?
        .into_string()?;
    ensure!(
        answer.contains("\"unchanged\":true"),
        "the check-in answer is not the cheap one: {answer}"
    );
    let script = dir.join("checkin.lua");
    std::fs::write(&script, format!("wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [[{body}]]\n"))?;
    let root = dir.join("www");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("answer.json"), &answer)?;
    let nginx = measure::Nginx::start(&dir.join("nginx"), &root)?;
    let (seconds, reps) = if s.quick { (3, 1) } else { (10, 3) };
    let mut muscle = Vec::new();
    let mut baseline = Vec::new();
    for _ in 0..reps {
        muscle.push(measure::wrk(&url, Some(&script), 32, seconds)?);
        baseline.push(measure::wrk(
            &format!("http://127.0.0.1:{}/answer.json", nginx.port),
            None,
            32,
            seconds,
        )?);
    }
    Ok(Row::new(
        "check-ins/s, unchanged state (wrk, 32 conns)",
        "req/s",
        figure(muscle),
        format!("nginx, static {} B file", answer.len()),
        figure(baseline),
    ))
}

/// A 50 MiB artifact: `muscle-agent fetch` (download + sha256 + ELF check + fsync + rename) vs
/// `curl | sha256sum` of the same blob from the same server.
fn artifact_transfer(
    s: &Settings,
    deployer_bin: &Path,
    agents: &Artifacts,
    hello: &Artifacts,
) -> Result<Row> {
    let dir = s.dir.join("transfer");
    let _ = std::fs::remove_dir_all(&dir);
    let release = dir.join("hello-service-9.9.9");
    std::fs::create_dir_all(release.join(X86))?;
    let mut bytes = std::fs::read(hello.binary(X86, "hello-service"))?;
    // Bytes after the last segment do not change what the ELF is, only its size.
    bytes.resize(50 * 1024 * 1024, 0);
    std::fs::write(release.join(X86).join("hello-service"), &bytes)?;
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(hello.dir.join("manifest.json"))?)?;
    let sha = muscle_protocol::sha256_hex(&bytes);
    manifest["version"] = "9.9.9".into();
    let mut x86 = manifest["artifacts"]
        .as_array()
        .context("artifacts")?
        .iter()
        .find(|a| a["arch"] == "x86_64")
        .context("x86_64 artifact")?
        .clone();
    x86["sha256"] = sha.clone().into();
    x86["size"] = bytes.len().into();
    manifest["artifacts"] = json!([x86]);
    std::fs::write(
        release.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    let deployer = Deployer::start(deployer_bin, &dir.join("data"))?;
    deployer.publish(&release)?;
    let url = format!("{}/v1/blobs/sha256/{sha}", deployer.url());
    let out = dir.join("fetched");
    let agent = agents.binary(X86, "muscle-agent");
    let muscle = time_runs(
        s.reps,
        || {
            Ok(std::fs::remove_file(&out).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })?)
        },
        || {
            let mut c = Command::new(&agent);
            c.args([
                "fetch",
                &url,
                "--sha256",
                &sha,
                "--size",
                &bytes.len().to_string(),
                "--out",
            ])
            .arg(&out);
            c
        },
    )?;
    let baseline = time_runs(
        s.reps,
        || Ok(()),
        || {
            let mut c = Command::new("sh");
            c.args(["-c", &format!("curl -sf {url} | sha256sum")]);
            c
        },
    )?;
    Ok(Row::new(
        "50 MiB artifact: fetch + sha256 + verify + install",
        "s",
        muscle,
        "curl | sha256sum, same blob and server",
        baseline,
    ))
}

/// Wall time from `rollout start` to every agent healthy, for a mixed fleet, vs the floor set by
/// the check-in interval and `min_healthy_time` per wave.
fn rollout_convergence(
    s: &Settings,
    deployer_bin: &Path,
    agents: &Artifacts,
    hello: &Artifacts,
) -> Result<Row> {
    let dir = s.dir.join("convergence");
    let _ = std::fs::remove_dir_all(&dir);
    let per_arch = if s.quick { 5 } else { 25 };
    let deployer = Deployer::start(deployer_bin, &dir.join("data"))?;
    deployer.publish(&hello.dir)?;
    let binaries =
        muscle_e2e::TARGETS.map(|(triple, arch)| (agents.binary(triple, "muscle-agent"), arch));
    let fleet = Fleet::start(deployer, &binaries, per_arch, &dir)?;
    let max_parallel = (per_arch * 2 / 4).max(1).to_string();
    let started = Instant::now();
    let id = fleet.start_rollout(&[
        "hello-service",
        "0.1.0",
        "--service",
        &service_spec(),
        "--min-healthy-time",
        "1s",
        "--max-parallel",
        &max_parallel,
    ])?;
    let r = fleet
        .deployer
        .wait_rollout_end(id, Duration::from_secs(900))?;
    let wall = started.elapsed().as_secs_f64();
    ensure!(
        r["status"] == "succeeded",
        "the convergence rollout ended {}: {}",
        r["status"],
        r["message"]
    );
    let waves = r["waves"].as_array().map_or(0, Vec::len) as f64;
    // Per wave at least: one check-in interval to hear of it, min_healthy_time to prove it.
    let floor = waves * (0.5 + 1.0);
    Ok(Row::new(format!("rollout to {} agents ({per_arch} x86_64 + {per_arch} aarch64 under qemu), {waves:.0} waves", per_arch * 2), "s", one(wall), "floor: waves x (interval 0.5s + min_healthy_time 1s)", one(floor)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn slope_of_a_line_and_of_a_flat_series() {
        assert!((super::slope(&[(0.0, 100.0), (1.0, 110.0), (2.0, 120.0)]) - 10.0).abs() < 1e-9);
        assert_eq!(super::slope(&[(0.0, 5.0), (1.0, 5.0)]), 0.0);
        assert_eq!(super::slope(&[(0.0, 5.0)]), 0.0);
    }
}
