//! The operator's daily tools on a real mixed fleet (aarch64 agents under qemu-user): ad hoc
//! jobs (`exec`, `jobs`), signed by an operator key for agents that pin keys, and service logs
//! (`logs`, `--follow`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use muscle_e2e::{Deployer, Fleet};

/// `exec --json` and its exit status.
fn exec(deployer: &Deployer, args: &[&str]) -> Result<(bool, serde_json::Value)> {
    let mut full = vec!["exec", "--json"];
    full.extend(args);
    let out = deployer.cli(&full)?;
    let job = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("exec --json printed: {}", common::text(&out)))?;
    Ok((out.status.success(), job))
}

fn target<'a>(job: &'a serde_json::Value, agent: &str) -> &'a serde_json::Value {
    job["targets"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["agent_id"] == agent))
        .unwrap_or_else(|| panic!("no target {agent} in {job:#}"))
}

#[test]
fn a_job_returns_every_agents_output_and_status_and_key_pinning_agents_run_only_signed_ones(
) -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("jobs");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    let key = dir.join("operator.key");
    let public = deployer
        .ok(&["keygen", "--out", key.to_str().unwrap()])?
        .trim()
        .to_owned();
    let fleet = Fleet::start_with(
        deployer,
        &b.both_arches(),
        1,
        &dir,
        &["--trusted-key", &public],
    )?;
    let d = &fleet.deployer;
    let agents = ["x86_64-1", "aarch64-1"];

    // Unsigned: refused by both, reported, and exec fails.
    let (ok, job) = exec(d, &["--timeout", "20s", "--", "sh", "-c", "echo ran"])?;
    ensure!(!ok, "an unsigned job refused everywhere must fail: {job:#}");
    for agent in agents {
        let t = target(&job, agent);
        ensure!(t["state"] == "done", "{t:#}");
        ensure!(t["report"]["outcome"]["kind"] == "refused", "{t:#}");
        let reason = t["report"]["outcome"]["reason"].as_str().unwrap_or("");
        ensure!(reason.contains("runs only jobs signed"), "{reason}");
        ensure!(t["report"]["stdout"] == "", "nothing ran: {t:#}");
    }

    // Signed with the operator key: each agent's own output and exit status.
    let key_arg = key.to_str().unwrap();
    let script = "echo \"$MUSCLE_AGENT_ID on $MUSCLE_AGENT_ARCH\"; echo warn >&2; exit 3";
    let sign = ["--sign-key", key_arg, "--timeout", "20s", "--"];
    let (ok, job) = exec(d, &[&sign[..], &["sh", "-c", script]].concat())?;
    ensure!(!ok, "exit 3 is a failure");
    ensure!(job["signed"] == true, "{job:#}");
    for (agent, arch) in [("x86_64-1", "x86_64"), ("aarch64-1", "aarch64")] {
        let report = &target(&job, agent)["report"];
        ensure!(
            report["outcome"] == serde_json::json!({"kind": "exited", "code": 3}),
            "{report:#}"
        );
        ensure!(
            report["stdout"] == format!("{agent} on {arch}\n"),
            "{report:#}"
        );
        ensure!(report["stderr"] == "warn\n", "{report:#}");
    }

    // Text as results arrive, a summary, and exit 0 when every agent succeeded.
    let out = d.cli(&[&["exec"][..], &sign, &["sh", "-c", "echo fine"]].concat())?;
    let text = common::text(&out);
    ensure!(out.status.success(), "{text}");
    for agent in agents {
        ensure!(text.contains(&format!("== {agent} (")), "{text}");
    }
    ensure!(
        text.contains("   fine\n") && text.contains("AGENT"),
        "{text}"
    );

    // A command past its timeout is killed and reported as such.
    let (ok, job) = exec(
        d,
        &[
            "--sign-key",
            key_arg,
            "--timeout",
            "1s",
            "--selector",
            "arch=x86_64",
            "--",
            "sleep",
            "30",
        ],
    )?;
    ensure!(!ok);
    ensure!(
        target(&job, "x86_64-1")["report"]["outcome"]["kind"] == "timed_out",
        "{job:#}"
    );
    ensure!(
        job["targets"].as_array().map(Vec::len) == Some(1),
        "the selector chose: {job:#}"
    );

    // Kept with their results.
    let listed: serde_json::Value = serde_json::from_str(&d.ok(&["jobs", "--json"])?)?;
    ensure!(listed.as_array().map(Vec::len) == Some(4), "{listed:#}");
    let table = d.ok(&["jobs"])?;
    ensure!(
        table.contains("sleep 30") && table.contains("PENDING"),
        "{table}"
    );
    let id = listed[0]["id"].as_str().context("job id")?;
    ensure!(d.ok(&["jobs", id])?.contains("timed out"));
    Ok(())
}

/// No agent matches: said, with what would help; nothing is stored.
#[test]
fn a_job_for_no_live_agent_is_refused_naming_the_selector() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("jobs-none");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    let out = deployer.cli(&["exec", "--selector", "site=mars", "--", "true"])?;
    let text = common::text(&out);
    ensure!(!out.status.success(), "{text}");
    ensure!(
        text.contains("no live agent matches the selector site=mars"),
        "{text}"
    );
    ensure!(deployer.ok(&["jobs", "--json"])?.trim() == "[]");
    Ok(())
}

/// The tail of a service's log from each arch, then `logs --follow` showing a line the service
/// prints after the command started; an app the agent does not run is named.
#[test]
fn logs_follow_shows_a_line_the_service_prints_after_the_command_started() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("logs");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    let fleet = Fleet::start(deployer, &b.both_arches(), 1, &dir)?;
    common::roll_out(&fleet, "0.1.0")?;
    let d = &fleet.deployer;

    for arch in ["x86_64", "aarch64"] {
        let tail = d.ok(&["logs", &format!("{arch}-1"), "hello-service", "--tail", "5"])?;
        ensure!(
            tail.contains(&format!("hello-service 0.1.0 ({arch}) listening on")),
            "{tail}"
        );
    }

    let mut follow = Command::new(&d.bin)
        .arg("--data-dir")
        .arg(&d.data_dir)
        .args([
            "logs",
            "x86_64-1",
            "hello-service",
            "--follow",
            "--tail",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let (tx, lines) = mpsc::channel();
    let out = follow.stdout.take().context("stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The tail first: the follow is running.
    let first = lines.recv_timeout(Duration::from_secs(30));
    ensure!(first.is_ok(), "no tail within 30 s");
    let port = fleet.agent("x86_64-1").port;
    ureq::post(&format!("http://127.0.0.1:{port}/fail")).call()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = vec![];
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("health check switched to failing") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    ensure!(found, "the new line never came; got {seen:#?}");

    let out = d.cli(&["logs", "x86_64-1", "nope"])?;
    let text = common::text(&out);
    ensure!(
        !out.status.success() && text.contains("no log of nope"),
        "{text}"
    );
    let out = d.cli(&["logs", "arm-9", "hello-service"])?;
    ensure!(common::text(&out).contains("no agent arm-9"));
    Ok(())
}
