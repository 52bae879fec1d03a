//! Real processes killed at real moments: agents SIGKILLed mid-install, the deployer SIGKILLed
//! mid-rollout, agents cut off from the deployer, and a full disk under an agent.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use muscle_e2e::{wait_until, Agent, Deployer, Fleet};

const APP: &str = "hello-service";

/// Exactly one service process runs, it is healthy, it serves the agent's committed version, and
/// no install is left half-done. Returns that version.
fn one_healthy_version(agent: &Agent) -> Result<String> {
    wait_until(
        "exactly one healthy committed version",
        Duration::from_secs(60),
        || {
            let state = agent.state()?;
            let app = &state["apps"][APP];
            ensure!(
                app["pending"].is_null(),
                "install still pending: {}",
                app["pending"]["version"]
            );
            let pids = agent.service_pids();
            ensure!(
                pids.len() == 1,
                "{} service processes: {pids:?}",
                pids.len()
            );
            let health = ureq::get(&format!("http://127.0.0.1:{}/healthz", agent.port))
                .timeout(Duration::from_secs(2))
                .call()?;
            ensure!(health.status() == 200, "health {}", health.status());
            let serving = agent.service_version()?;
            ensure!(
                app["current"]["version"] == serving.as_str(),
                "serves {serving}, committed {}",
                app["current"]["version"]
            );
            Ok(Some(serving))
        },
    )
}

#[test]
fn an_agent_killed_at_any_point_of_an_install_comes_back_with_exactly_one_healthy_version(
) -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("crash-loop");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    deployer.publish(&b.v2.dir)?;
    let mut fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 1, &dir)?;
    let spec = common::service_spec();
    common::roll_out(&fleet, "0.1.0")?;

    let mut seen = std::collections::BTreeSet::new();
    for i in 0..24u64 {
        let target = if i % 2 == 0 { "0.2.0" } else { "0.1.0" };
        fleet.start_rollout(&[
            APP,
            target,
            "--service",
            &spec,
            "--supersede",
            "--min-healthy-time",
            "1s",
        ])?;
        // Spread the kills over download, stop, switch, start and health probation.
        std::thread::sleep(Duration::from_millis(300 + (i * 137) % 2200));
        let agent = fleet.agent_mut("x86_64-1");
        agent.kill9();
        agent.restart()?;
        let version = one_healthy_version(fleet.agent("x86_64-1"))
            .with_context(|| format!("iteration {i}"))?;
        seen.insert(version);
    }
    // Both versions were found running after some crash, many kills landed mid-install, and the
    // last rollout still converges.
    assert_eq!(
        seen.len(),
        2,
        "kills landed both before and after commits: {seen:?}"
    );
    let interrupted = fleet
        .agent("x86_64-1")
        .log()
        .matches("was interrupted")
        .count();
    assert!(
        interrupted >= 5,
        "only {interrupted} of 24 kills landed during an install"
    );
    wait_until(
        "the last rollout's version",
        Duration::from_secs(90),
        || Ok((one_healthy_version(fleet.agent("x86_64-1"))? == "0.1.0").then_some(())),
    )?;
    Ok(())
}

#[test]
fn an_agent_that_lost_its_state_adopts_the_running_service_instead_of_orphaning_it() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("lost-state");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    let mut fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 1, &dir)?;
    common::roll_out(&fleet, "0.1.0")?;
    let agent = fleet.agent_mut("x86_64-1");
    let before = one_healthy_version(agent)?;
    let pids = agent.service_pids();

    // The agent dies and its state file is damaged (a torn write, a disk fault).
    agent.kill9();
    let state_file = agent.opts.state_dir.join("state.json");
    std::fs::write(&state_file, "{\"apps\": {\"hello-service\": ")?;
    agent.restart()?;
    let status = agent.wait_exit(Duration::from_secs(30))?;
    ensure!(
        !status.success(),
        "the agent started on a corrupt state file"
    );
    ensure!(
        agent.log().contains("move it away to start afresh"),
        "the refusal says what to do: {}",
        agent.log()
    );
    assert_eq!(agent.service_pids(), pids, "the service kept running");

    // The operator does as told; the agent recovers the app from its receipt and adopts the
    // process that runs it: one service, the same process, supervised.
    std::fs::rename(&state_file, state_file.with_extension("json.corrupt"))?;
    agent.restart()?;
    let agent = fleet.agent("x86_64-1");
    wait_until("a new state file", Duration::from_secs(30), || {
        let state = agent.state()?;
        ensure!(
            state["apps"][APP]["current"]["version"] == "0.1.0",
            "{state}"
        );
        Ok(Some(()))
    })?;
    assert_eq!(one_healthy_version(agent)?, before);
    assert_eq!(
        agent.service_pids(),
        pids,
        "the running process was adopted"
    );
    assert!(agent.log().contains("recovered"), "{}", agent.log());
    let id_file = agent.opts.state_dir.join("agent-id");
    assert_eq!(
        std::fs::read_to_string(id_file)?,
        "x86_64-1",
        "the id outlives state.json (without --id it is what the agent comes back as)"
    );
    // Supervised: killed, it comes back.
    Command::new("kill")
        .args(["-9", &pids[0].to_string()])
        .status()?;
    wait_until(
        "a restart of the adopted service",
        Duration::from_secs(30),
        || {
            let now = agent.service_pids();
            Ok((now.len() == 1 && now != pids).then_some(()))
        },
    )?;
    Ok(())
}

#[test]
fn a_deployer_killed_mid_rollout_resumes_it_and_cut_off_agents_keep_serving() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("deployer-crash");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    deployer.publish(&b.v2.dir)?;
    let mut fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 4, &dir)?;
    let spec = common::service_spec();

    let id = fleet.start_rollout(&[APP, "0.1.0", "--service", &spec, "--max-parallel", "1"])?;
    wait_until(
        "the rollout to pass its canary wave",
        Duration::from_secs(90),
        || {
            Ok(
                (fleet.deployer.rollout(Some(id))?["current_wave"].as_u64() >= Some(1))
                    .then_some(()),
            )
        },
    )?;
    let before = fleet.deployer.rollout(Some(id))?;
    fleet.deployer.kill9();
    std::thread::sleep(Duration::from_secs(2));
    fleet.deployer.restart()?;
    let r = fleet
        .deployer
        .wait_rollout_end(id, Duration::from_secs(120))?;
    assert_eq!(r["status"], "succeeded", "{r:#}");
    // It continued rather than starting over: the canary kept its original assignment time.
    assert_eq!(
        r["waves"][0]["members"][0]["assigned_ms"],
        before["waves"][0]["members"][0]["assigned_ms"]
    );
    for agent in &fleet.agents {
        assert_eq!(agent.service_version()?, "0.1.0");
    }

    // The deployer goes away: services keep running, untouched, while agents back off.
    let pids: Vec<Vec<u32>> = fleet.agents.iter().map(Agent::service_pids).collect();
    fleet.deployer.kill9();
    std::thread::sleep(Duration::from_secs(6));
    for (agent, pids) in fleet.agents.iter().zip(&pids) {
        assert_eq!(
            &agent.service_pids(),
            pids,
            "{} kept its service",
            agent.opts.id
        );
        assert_eq!(agent.service_version()?, "0.1.0");
        assert!(
            agent.log().contains("check-in failed"),
            "{} noticed the outage",
            agent.opts.id
        );
    }
    // It comes back: the agents catch up with a new rollout.
    fleet.deployer.restart()?;
    let id = fleet.start_rollout(&[APP, "0.2.0", "--service", &spec, "--max-parallel", "2"])?;
    let r = fleet
        .deployer
        .wait_rollout_end(id, Duration::from_secs(180))?;
    assert_eq!(r["status"], "succeeded", "{r:#}");
    for agent in &fleet.agents {
        assert_eq!(agent.service_version()?, "0.2.0");
        assert!(
            agent.log().contains("server reachable again"),
            "{}",
            agent.opts.id
        );
    }
    Ok(())
}

#[test]
fn a_deployer_crashing_inside_an_engine_step_leaves_it_undone_and_rollback_still_restores(
) -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("engine-step-crash");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    deployer.publish(&b.v2.dir)?;
    let mut fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 2, &dir)?;
    common::roll_out(&fleet, "0.1.0")?;

    // The engine dies between writing the canary's assignment and saving the rollout.
    fleet.deployer.env = vec![("MUSCLE_FAILPOINTS".into(), "engine-step".into())];
    fleet.deployer.restart()?;
    let spec = common::service_spec();
    let id = fleet.start_rollout(&[APP, "0.2.0", "--service", &spec, "--max-parallel", "1"])?;
    let status = fleet.deployer.wait_exit(Duration::from_secs(30))?;
    assert!(!status.success(), "the failpoint aborts the deployer");
    assert!(fleet.deployer.log().contains("failpoint engine-step"));

    // What the crash left: no assignment of 0.2.0 without the rollout that made it.
    let db = rusqlite::Connection::open(fleet.deployer.data_dir.join("muscle.db"))?;
    let assigned: i64 = db.query_row(
        "SELECT count(*) FROM assignments WHERE json_extract(body, '$.version') = '0.2.0'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(assigned, 0, "an assignment outlived the step that made it");
    drop(db);
    let r = fleet.deployer.rollout(Some(id))?;
    assert_eq!(common::member_state(&r, "x86_64-1"), "pending", "{r:#}");

    // Restarted without the failpoint, the step is redone; a rollback then restores 0.1.0.
    fleet.deployer.env.clear();
    fleet.deployer.restart()?;
    wait_until("a canary on 0.2.0", Duration::from_secs(90), || {
        let r = fleet.deployer.rollout(Some(id))?;
        let canary = r["waves"][0]["members"][0]["agent_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Ok((fleet.agent(&canary).service_version()? == "0.2.0").then_some(()))
    })?;
    fleet
        .deployer
        .ok(&["rollout", "rollback", &id.to_string()])?;
    let r = fleet
        .deployer
        .wait_rollout_end(id, Duration::from_secs(90))?;
    assert_eq!(r["status"], "rolled_back", "{r:#}");
    for agent in &fleet.agents {
        wait_until("0.1.0 after the rollback", Duration::from_secs(60), || {
            Ok((one_healthy_version(agent)? == "0.1.0").then_some(()))
        })?;
    }
    Ok(())
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "this test needs root to mount a small tmpfs (CI runs as root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_reported_and_nothing_is_half_installed() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("disk-full");
    let v1_size = std::fs::metadata(b.v1.binary("x86_64-unknown-linux-musl", APP))?.len();
    // Room for one version, its log and state, not for a second version.
    let tmpfs = Tmpfs::mount(
        &dir.join("x86_64-1"),
        &format!("{}k", v1_size * 3 / 2 / 1024),
    )?;
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    deployer.publish(&b.v2.dir)?;
    let fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 1, &dir)?;
    let spec = common::service_spec();
    common::roll_out(&fleet, "0.1.0")?;
    let agent = fleet.agent("x86_64-1");
    let pids = agent.service_pids();

    fleet.start_rollout(&[APP, "0.2.0", "--service", &spec])?;
    let error = wait_until(
        "the full disk to be reported",
        Duration::from_secs(60),
        || {
            let row = fleet
                .deployer
                .fleet()?
                .into_iter()
                .next()
                .context("no agent")?;
            Ok(row["apps"][0]["error"]
                .as_str()
                .filter(|e| e.contains("No space left on device"))
                .map(str::to_owned))
        },
    )?;
    assert!(error.contains("cannot write"), "{error}");
    assert_eq!(agent.service_pids(), pids, "0.1.0 kept running");
    assert_eq!(agent.service_version()?, "0.1.0");
    let app_dir = tmpfs.0.join("apps").join(APP);
    assert!(
        !app_dir.join("versions/0.2.0").exists(),
        "no half-installed version"
    );
    let leftovers: Vec<_> = std::fs::read_dir(app_dir.join("downloads"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        leftovers.is_empty(),
        "the failed download was cleaned up: {leftovers:?}"
    );
    assert_eq!(agent.state()?["apps"][APP]["current"]["version"], "0.1.0");
    drop(fleet);
    Ok(())
}

#[test]
fn killed_services_restart_with_backoff_a_crash_loop_is_reported_and_sigterm_stops_them(
) -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("supervision");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    // Small logs, to see every start's line stamped and the files rotated on write.
    let mut fleet = Fleet::start_with(
        deployer,
        &[(b.agent("x86_64"), "x86_64")],
        2,
        &dir,
        &["--log-max-bytes", "200", "--log-keep", "2"],
    )?;
    common::roll_out(&fleet, "0.1.0")?;

    // kill -9 the service, again and again: restarted each time, then reported as a crash loop
    // (5 restarts within a minute, the spec's default).
    let agent = fleet.agent("x86_64-1");
    for round in 1..=5 {
        let pid = *agent.service_pids().first().context("a service runs")?;
        // SAFETY: kill(2) on the service process this test started through the agent.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        wait_until(
            &format!("restart #{round}"),
            Duration::from_secs(30),
            || {
                let pids = agent.service_pids();
                Ok(
                    (pids.len() == 1 && pids[0] != pid && agent.service_version().is_ok())
                        .then_some(()),
                )
            },
        )?;
    }
    let row = wait_until(
        "the crash loop to be reported",
        Duration::from_secs(20),
        || {
            let row = fleet.deployer.fleet_row("x86_64-1")?;
            Ok((row["apps"][0]["health"] == "crash_loop").then_some(row))
        },
    )?;
    assert!(
        row["apps"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("exited"),
        "{row}"
    );
    assert!(
        agent.log().matches("exited (signal: 9").count() >= 5,
        "{}",
        agent.log()
    );
    // Six starts, six stamped lines, in at most three files of at most 200 bytes each.
    let logs = agent.opts.state_dir.join("apps").join(APP);
    let mut lines = vec![];
    for name in ["service.log.2", "service.log.1", "service.log"] {
        let text = std::fs::read_to_string(logs.join(name)).with_context(|| name.to_owned())?;
        assert!(
            text.len() <= 200,
            "{name} has {} bytes:\n{text}",
            text.len()
        );
        lines.extend(text.lines().map(str::to_owned));
    }
    assert!(!logs.join("service.log.3").exists(), "--log-keep 2");
    assert!(
        lines.len() >= 5,
        "the last starts' lines are kept: {lines:#?}"
    );
    let last = lines.last().context("no log line")?;
    // 2026-11-27T22:40:01.123Z 0.1.0 hello-service 0.1.0 (x86_64) listening on ...
    assert!(
        last.len() > 31 && &last[10..11] == "T" && &last[23..31] == "Z 0.1.0 ",
        "{last}"
    );
    assert!(last.contains("listening on"), "{lines:#?}");

    // SIGTERM stops the agent and, by default, its services, gracefully.
    let agent = fleet.agent_mut("x86_64-1");
    agent.terminate()?;
    assert!(
        agent.service_pids().is_empty(),
        "the service was stopped with the agent"
    );
    assert!(agent.log().contains("stopping services"));
    assert!(agent.state()?["apps"][APP]["pid"].is_null());

    // With --leave-services-running the service outlives the agent, and the next agent adopts it.
    let agent = fleet.agent_mut("x86_64-2");
    agent
        .opts
        .extra_args
        .push("--leave-services-running".into());
    agent.restart()?;
    wait_until("the restarted agent", Duration::from_secs(20), || {
        Ok(agent.log().contains("adopted running 0.1.0").then_some(()))
    })?;
    let pids = agent.service_pids();
    agent.terminate()?;
    assert_eq!(agent.service_pids(), pids, "the service kept running");
    assert!(agent.log().contains("services left running"));
    agent.restart()?;
    wait_until("the service re-adopted", Duration::from_secs(20), || {
        Ok((agent.log().matches("adopted running 0.1.0").count() >= 2).then_some(()))
    })?;
    assert_eq!(agent.service_pids(), pids, "adopted, not restarted");
    Ok(())
}

#[test]
fn a_service_over_its_memory_limit_is_killed_by_the_kernel_and_the_rollout_says_so() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("memory-limit");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    let mut fleet = Fleet::start_with(
        deployer,
        &[(b.agent("x86_64"), "x86_64")],
        1,
        &dir,
        &["--var", "mb=8"],
    )?;
    let greedy = muscle_e2e::AgentOptions {
        labels: vec![("site".into(), "lab".into())],
        extra_args: vec!["--var".into(), "mb=256".into()],
        ..muscle_e2e::AgentOptions::new("greedy", b.agent("x86_64"), "x86_64", dir.join("greedy"))
    };
    fleet
        .agents
        .push(muscle_e2e::Agent::start(greedy, &fleet.deployer.url())?);
    fleet.wait_checked_in(Duration::from_secs(60))?;
    // The example spec, filling ${mb} MiB at start, under a 64M limit.
    let spec = dir.join("limited.toml");
    std::fs::write(
        &spec,
        std::fs::read_to_string(common::service_spec())?
            + "\n[env]\nHELLO_ALLOCATE_MB = \"${mb}\"\n\n[limits]\nmemory = \"64M\"\npids = 64\n",
    )?;
    let id = fleet.start_rollout(&[
        APP,
        "0.1.0",
        "--service",
        spec.to_str().context("path")?,
        "--max-failures",
        "2",
    ])?;
    let r = fleet
        .deployer
        .wait_rollout_end(id, Duration::from_secs(180))?;
    assert_eq!(r["status"], "succeeded_with_failures", "{r:#}");
    let failed = r["waves"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|w| w["members"].as_array().cloned().unwrap_or_default())
        .find(|m| m["agent_id"] == "greedy")
        .context("greedy is a member")?;
    assert_eq!(failed["state"], "failed", "{failed:#}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("killed by the kernel: memory limit 64M reached"),
        "the cause is named: {error}"
    );
    // The one within its limit runs in its own control group.
    let modest = fleet.agent("x86_64-1");
    let pid = *modest.service_pids().first().context("a service runs")?;
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    assert!(
        groups
            .lines()
            .any(|l| l.contains("memory") && l.contains("/muscle/hello-service-")),
        "{groups}"
    );
    Ok(())
}
