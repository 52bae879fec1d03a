//! Rollouts across a real mixed ARM/x86 fleet: real deployer, real agents (aarch64 ones under
//! qemu-user), real hello-service releases built by `cargo xtask release`.

mod common;

use std::time::Duration;

use anyhow::Result;
use muscle_e2e::{wait_until, Deployer, Fleet};

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn mixed_arch_rollout_goes_canary_per_arch_then_batches_and_a_bad_version_is_rolled_back(
) -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("mixed-arch");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    for release in [&b.v1, &b.v2, &b.v3_bad] {
        deployer.publish(&release.dir)?;
    }
    let fleet = Fleet::start(deployer, &b.both_arches(), 2, &dir)?;
    let spec = common::service_spec();

    // v1 then v2: every agent converges; the canary wave holds exactly one agent per arch.
    for version in ["0.1.0", "0.2.0"] {
        let id = fleet.start_rollout(&[
            "hello-service",
            version,
            "--service",
            &spec,
            "--max-parallel",
            "2",
            "--auto-rollback",
        ])?;
        let r = fleet.deployer.wait_rollout_end(id, ROLLOUT_TIMEOUT)?;
        assert_eq!(r["status"], "succeeded", "{r:#}");
        let waves = r["waves"].as_array().unwrap();
        assert_eq!(waves[0]["name"], "canary");
        let mut canary_arches: Vec<&str> = waves[0]["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["arch"].as_str().unwrap())
            .collect();
        canary_arches.sort();
        assert_eq!(
            canary_arches,
            ["aarch64", "x86_64"],
            "one canary per architecture"
        );
        assert_eq!(waves[1]["name"], "batch 1");
        assert_eq!(waves[1]["members"].as_array().unwrap().len(), 2);
        for agent in &fleet.agents {
            assert_eq!(
                agent.service_version()?,
                version,
                "{} serves {version}",
                agent.opts.id
            );
            assert_eq!(
                agent.service_pids().len(),
                1,
                "{} runs exactly one service process",
                agent.opts.id
            );
        }
    }
    // The aarch64 agents run the aarch64 build: the installed file says so.
    for agent in fleet.agents.iter().filter(|a| a.opts.arch == "aarch64") {
        let bin = agent
            .opts
            .state_dir
            .join("apps/hello-service/versions/0.2.0/hello-service");
        let facts = muscle_inspect_facts(&bin)?;
        assert_eq!(facts, "EM_AARCH64", "{}", bin.display());
    }

    // v3's health always fails: halted in the canary wave, rolled back, batches never touched.
    let id = fleet.start_rollout(&[
        "hello-service",
        "0.3.0",
        "--service",
        &spec,
        "--healthy-deadline",
        "10s",
        "--auto-rollback",
    ])?;
    let r = fleet.deployer.wait_rollout_end(id, ROLLOUT_TIMEOUT)?;
    assert_eq!(r["status"], "rolled_back", "{r:#}");
    assert!(
        r["message"].as_str().unwrap().contains("halted in canary"),
        "{}",
        r["message"]
    );
    let canary: Vec<String> = r["waves"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["agent_id"].as_str().unwrap().to_owned())
        .collect();
    for agent in &fleet.agents {
        let in_canary = canary.contains(&agent.opts.id);
        // Every agent is back on (or never left) 0.2.0, with one process.
        muscle_e2e::wait_until(
            "0.2.0 served after the rollback",
            Duration::from_secs(60),
            || Ok((agent.service_version()? == "0.2.0").then_some(())),
        )?;
        assert_eq!(agent.service_pids().len(), 1);
        let state = agent.state()?;
        let app = &state["apps"]["hello-service"];
        assert_eq!(app["current"]["version"], "0.2.0");
        if in_canary {
            assert_eq!(
                app["failure"]["version"], "0.3.0",
                "{} reported its failure",
                agent.opts.id
            );
            assert!(
                app["failure"]["reason"]
                    .as_str()
                    .unwrap()
                    .contains("rolled back"),
                "{app:#}"
            );
        } else {
            assert_eq!(
                common::member_state(&r, &agent.opts.id),
                "pending",
                "{} was never asked to move",
                agent.opts.id
            );
            assert!(
                !agent
                    .opts
                    .state_dir
                    .join("apps/hello-service/versions/0.3.0")
                    .exists(),
                "{} never downloaded 0.3.0",
                agent.opts.id
            );
        }
    }
    // The deployer heard why: the canaries' reports carry the failure.
    for id in &canary {
        let error = muscle_e2e::wait_until(
            "the canary's failure report",
            Duration::from_secs(20),
            || {
                let fleet_view = fleet.deployer.fleet()?;
                let row = fleet_view
                    .iter()
                    .find(|a| a["id"] == id.as_str())
                    .cloned()
                    .unwrap_or_default();
                Ok(row["apps"][0]["error"].as_str().map(str::to_owned))
            },
        )?;
        assert!(
            error.contains("0.3.0 rolled back") && error.contains("503"),
            "{id}: {error}"
        );
    }
    Ok(())
}

#[test]
fn pause_holds_a_rollout_resume_finishes_it_and_abort_stops_it() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("pause-resume");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    deployer.publish(&b.v2.dir)?;
    let fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 3, &dir)?;
    let spec = common::service_spec();

    let id = fleet.start_rollout(&[
        "hello-service",
        "0.1.0",
        "--service",
        &spec,
        "--max-parallel",
        "1",
    ])?;
    fleet.deployer.ok(&["rollout", "pause", &id.to_string()])?;
    muscle_e2e::wait_until("the pause to apply", Duration::from_secs(10), || {
        Ok((fleet.deployer.rollout(Some(id))?["status"] == "paused").then_some(()))
    })?;
    // The CLI and the engine share one transition table: an illegal request fails at once.
    let again = fleet.deployer.cli(&["rollout", "pause", &id.to_string()])?;
    assert_eq!(again.status.code(), Some(1), "pausing a paused rollout");
    assert!(String::from_utf8_lossy(&again.stderr).contains("while it is Paused"));
    let paused = fleet.deployer.rollout(Some(id))?;
    std::thread::sleep(Duration::from_secs(4));
    let later = fleet.deployer.rollout(Some(id))?;
    assert_eq!(
        later["current_wave"], paused["current_wave"],
        "a paused rollout does not advance"
    );
    assert_eq!(common::member_state(&later, "x86_64-3"), "pending");

    fleet.deployer.ok(&["rollout", "resume", &id.to_string()])?;
    let r = fleet.deployer.wait_rollout_end(id, ROLLOUT_TIMEOUT)?;
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(
        r["waves"].as_array().unwrap().len(),
        3,
        "canary + 2 batches of 1"
    );

    let id = fleet.start_rollout(&[
        "hello-service",
        "0.2.0",
        "--service",
        &spec,
        "--max-parallel",
        "1",
    ])?;
    fleet.deployer.ok(&["rollout", "abort", &id.to_string()])?;
    let r = fleet
        .deployer
        .wait_rollout_end(id, Duration::from_secs(30))?;
    assert_eq!(r["status"], "aborted");
    std::thread::sleep(Duration::from_secs(3));
    // Aborted before the batches: the last agent still runs 0.1.0.
    assert_eq!(
        common::member_state(&fleet.deployer.rollout(Some(id))?, "x86_64-3"),
        "pending"
    );
    assert_eq!(fleet.agent("x86_64-3").service_version()?, "0.1.0");
    let rollback = fleet
        .deployer
        .cli(&["rollout", "rollback", &id.to_string()])?;
    assert_eq!(
        rollback.status.code(),
        Some(1),
        "rolling back an aborted rollout"
    );
    assert!(
        String::from_utf8_lossy(&rollback.stderr).contains("cannot rollback rollout"),
        "{}",
        String::from_utf8_lossy(&rollback.stderr)
    );
    // A second active rollout is refused unless it supersedes.
    let out = fleet.deployer.cli(&[
        "rollout",
        "start",
        "hello-service",
        "0.2.0",
        "--service",
        &spec,
    ])?;
    assert!(
        out.status.success(),
        "the aborted rollout is no longer active: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = fleet.deployer.cli(&[
        "rollout",
        "start",
        "hello-service",
        "0.2.0",
        "--service",
        &spec,
    ])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--supersede"));
    Ok(())
}

#[test]
fn a_rollout_with_a_failed_member_ends_succeeded_with_failures_and_watch_exits_non_zero(
) -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("failed-member");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    let fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 3, &dir)?;
    // Another process holds x86_64-3's port: its hello-service cannot listen.
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", fleet.agent("x86_64-3").port))?;
    let spec = common::service_spec();
    let id = fleet.start_rollout(&[
        "hello-service",
        "0.1.0",
        "--service",
        &spec,
        "--max-failures",
        "2",
        "--healthy-deadline",
        "8s",
    ])?;
    let watch = fleet
        .deployer
        .cli(&["rollout", "status", "--watch", "--json", &id.to_string()])?;
    // --watch --json: one JSON rollout per line, as it changes; the last one is the end.
    let lines: Vec<serde_json::Value> = String::from_utf8(watch.stdout.clone())?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert!(lines.len() >= 2, "{lines:?}");
    assert_eq!(lines.last().unwrap()["status"], "succeeded_with_failures");
    let r = fleet.deployer.rollout(Some(id))?;
    assert_eq!(r["status"], "succeeded_with_failures", "{r:#}");
    assert!(
        r["message"].as_str().unwrap().contains("x86_64-3"),
        "{}",
        r["message"]
    );
    assert_eq!(common::member_state(&r, "x86_64-3"), "failed");
    assert!(
        !watch.status.success(),
        "--watch exits non-zero for anything but a clean success"
    );
    Ok(())
}

#[test]
fn rollback_returns_each_agent_to_its_last_known_good_version_not_a_failed_one() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("last-known-good");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    for release in [&b.v1, &b.v2, &b.v3_bad] {
        deployer.publish(&release.dir)?;
    }
    let fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 2, &dir)?;
    let spec = common::service_spec();
    common::roll_out(&fleet, "0.1.0")?;
    // 0.3.0 fails in the canary, without auto-rollback: x86_64-1 stays assigned 0.3.0 but rolls
    // itself back and runs 0.1.0.
    let bad = fleet.start_rollout(&[
        "hello-service",
        "0.3.0",
        "--service",
        &spec,
        "--healthy-deadline",
        "8s",
    ])?;
    let r = fleet.deployer.wait_rollout_end(bad, ROLLOUT_TIMEOUT)?;
    assert_eq!(r["status"], "halted", "{r:#}");
    assert_eq!(fleet.agent("x86_64-1").service_version()?, "0.1.0");
    // The failed member shows the log lines around its failure, in JSON and in the status.
    let canary = &r["waves"][0]["members"][0];
    let log: Vec<&str> = canary["log"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str())
        .collect();
    assert!(
        log.iter()
            .any(|l| l.contains("hello-service 0.3.0 (x86_64) listening")),
        "{canary:#}"
    );
    let status = fleet
        .deployer
        .ok(&["rollout", "status", &bad.to_string()])?;
    assert!(
        status.contains("        | ") && status.contains("0.3.0 (x86_64) listening"),
        "{status}"
    );
    // The canary's history tells the install, the failure with its reason, and health changes.
    let history = fleet.deployer.ok(&["agent", "x86_64-1"])?;
    for told in [
        "joined (x86_64",
        "hello-service 0.1.0 installed",
        "hello-service 0.3.0 refused or rolled back: ",
        "-> healthy",
    ] {
        assert!(history.contains(told), "{told:?} missing from\n{history}");
    }
    let first = fleet.deployer.rollout(Some(1))?;
    assert_eq!(first["status"], "succeeded", "{first:#}");
    common::roll_out(&fleet, "0.2.0")?;
    let good = fleet.deployer.rollout(None)?["id"].as_i64().unwrap();
    // Rolling back an older rollout would replay history: refused, naming the newer one.
    let stale = fleet.deployer.cli(&["rollout", "rollback", "1"])?;
    let said = String::from_utf8_lossy(&stale.stderr);
    assert_eq!(stale.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("rollout {good} of hello-service is newer")),
        "{said}"
    );
    fleet
        .deployer
        .ok(&["rollout", "rollback", &good.to_string()])?;
    for agent in &fleet.agents {
        muscle_e2e::wait_until(
            &format!("{} back on 0.1.0", agent.opts.id),
            Duration::from_secs(90),
            || Ok((agent.service_version()? == "0.1.0").then_some(())),
        )?;
    }
    std::thread::sleep(Duration::from_secs(3));
    let state = fleet.agent("x86_64-1").state()?;
    assert_ne!(
        state["apps"]["hello-service"]["failure"]["version"], "0.3.0",
        "sent to the failed 0.3.0 again, it would fail anew"
    );
    assert_eq!(fleet.agent("x86_64-1").service_version()?, "0.1.0");
    Ok(())
}

#[test]
fn rollback_of_a_first_install_and_undeploy_stop_and_uninstall_the_app() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("removal");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    let mut fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 2, &dir)?;
    let gone = |agent: &muscle_e2e::Agent| -> Result<Option<()>> {
        let state = agent.state()?;
        let app = &state["apps"]["hello-service"];
        anyhow::ensure!(
            agent.service_pids().is_empty(),
            "still runs {:?}",
            agent.service_pids()
        );
        anyhow::ensure!(app["current"].is_null(), "still installed: {app}");
        let versions = agent.opts.state_dir.join("apps/hello-service/versions");
        anyhow::ensure!(!versions.exists(), "{} left behind", versions.display());
        Ok(Some(()))
    };

    // Rolling back the first install of an app takes it off every agent.
    common::roll_out(&fleet, "0.1.0")?;
    let first = fleet.deployer.rollout(None)?["id"].as_i64().unwrap();
    fleet
        .deployer
        .ok(&["rollout", "rollback", &first.to_string()])?;
    for agent in &fleet.agents {
        wait_until(
            &format!("hello-service gone from {}", agent.opts.id),
            Duration::from_secs(60),
            || gone(agent),
        )?;
    }

    // An agent offline while an app is undeployed still removes it when it comes back.
    common::roll_out(&fleet, "0.1.0")?;
    fleet.agent_mut("x86_64-2").kill9();
    let out = fleet
        .deployer
        .ok(&["undeploy", "hello-service", "--selector", "arch=x86_64"])?;
    assert!(out.contains("taken off 2 agent(s)"), "{out}");
    wait_until(
        "hello-service gone from x86_64-1",
        Duration::from_secs(60),
        || gone(fleet.agent("x86_64-1")),
    )?;
    // Its service is still running (the agent died, not the service) until the agent is back.
    assert_eq!(fleet.agent("x86_64-2").service_pids().len(), 1);
    fleet.agent_mut("x86_64-2").restart()?;
    wait_until(
        "hello-service gone from x86_64-2",
        Duration::from_secs(60),
        || gone(fleet.agent("x86_64-2")),
    )?;
    let fleet_json = fleet.deployer.fleet()?;
    assert!(
        fleet_json.iter().all(|a| a["apps"]
            .as_array()
            .is_some_and(|apps| apps.iter().all(|app| app["app"] != "hello-service"))),
        "no agent reports the app any more: {fleet_json:#?}"
    );
    // Undeployed from the selected agents only, the rollout still stood for newcomers: without
    // a selector, it is withdrawn. After that, nothing is left: an error, not a silent success.
    let withdrawn = fleet.deployer.ok(&["undeploy", "hello-service"])?;
    assert!(withdrawn.contains("withdrawn"), "{withdrawn}");
    let again = fleet.deployer.cli(&["undeploy", "hello-service"])?;
    assert_eq!(again.status.code(), Some(1), "{}", common::text(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no agent has hello-service assigned"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    Ok(())
}

#[test]
fn agents_that_join_after_a_rollout_get_the_version_it_settled_on_until_it_is_undeployed(
) -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("late-joiner");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    let mut fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 1, &dir)?;
    let spec = common::service_spec();
    let id = fleet.start_rollout(&[
        "hello-service",
        "0.1.0",
        "--service",
        &spec,
        "--selector",
        "site=lab",
    ])?;
    let r = fleet.deployer.wait_rollout_end(id, ROLLOUT_TIMEOUT)?;
    assert_eq!(r["status"], "succeeded", "{r:#}");

    let late = |id: &str, site: &str| -> Result<muscle_e2e::Agent> {
        let opts = muscle_e2e::AgentOptions {
            labels: vec![("site".into(), site.into())],
            ..muscle_e2e::AgentOptions::new(id, b.agent("x86_64"), "x86_64", dir.join(id))
        };
        muscle_e2e::Agent::start(opts, &fleet.deployer.url())
    };
    fleet.agents.push(late("late-lab", "lab")?);
    fleet.agents.push(late("late-elsewhere", "elsewhere")?);
    fleet.wait_checked_in(Duration::from_secs(60))?;
    wait_until(
        "the late joiner runs 0.1.0",
        Duration::from_secs(60),
        || {
            Ok(
                (fleet.agent("late-lab").service_version().ok().as_deref() == Some("0.1.0"))
                    .then_some(()),
            )
        },
    )?;
    assert!(
        fleet.agent("late-elsewhere").service_pids().is_empty(),
        "an agent outside the selector got the app"
    );
    assert!(
        fleet
            .deployer
            .log()
            .contains("late joiner(s) late-lab assigned it"),
        "{}",
        fleet.deployer.log()
    );

    // Undeployed everywhere: the deployment no longer stands, and newcomers do not get it.
    let out = fleet.deployer.ok(&["undeploy", "hello-service"])?;
    assert!(out.contains("taken off 2 agent(s)"), "{out}");
    fleet.agents.push(late("later-lab", "lab")?);
    fleet.wait_checked_in(Duration::from_secs(60))?;
    for id in ["x86_64-1", "late-lab"] {
        wait_until(
            &format!("{id} stops the app"),
            Duration::from_secs(60),
            || Ok(fleet.agent(id).service_pids().is_empty().then_some(())),
        )?;
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        fleet.agent("later-lab").service_pids().is_empty(),
        "an agent that joined after the undeploy got the app"
    );
    let status = fleet.deployer.rollout(Some(id))?;
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("withdrawn"),
        "{status:#}"
    );
    Ok(())
}

#[test]
fn one_rollout_spans_four_architectures_with_a_canary_for_each() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("four-arches");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    for release in [&b.v1, &b.v2] {
        deployer.publish(&release.dir)?;
    }
    // One agent per arch: x86_64 natively, aarch64, armv7 and riscv64 under qemu-user.
    let fleet = Fleet::start(deployer, &b.all_arches(), 1, &dir)?;
    let mut reported: Vec<String> = fleet
        .deployer
        .fleet()?
        .iter()
        .map(|a| a["arch"].as_str().unwrap_or_default().to_owned())
        .collect();
    reported.sort();
    assert_eq!(reported, ["aarch64", "arm", "riscv64", "x86_64"]);
    // Each reports its own interval, which its staleness is judged by.
    for row in fleet.deployer.fleet()? {
        assert_eq!(row["interval_ms"], 500, "{row}");
    }
    common::roll_out(&fleet, "0.1.0")?;
    let spec = common::service_spec();
    let id = fleet.start_rollout(&["hello-service", "0.2.0", "--service", &spec])?;
    let r = fleet.deployer.wait_rollout_end(id, ROLLOUT_TIMEOUT)?;
    assert_eq!(r["status"], "succeeded", "{r:#}");
    let mut canary: Vec<&str> = r["waves"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["arch"].as_str().unwrap())
        .collect();
    canary.sort();
    assert_eq!(canary, ["aarch64", "arm", "riscv64", "x86_64"], "{r:#}");
    for agent in &fleet.agents {
        assert_eq!(agent.service_version()?, "0.2.0", "{}", agent.opts.id);
        let bin = agent
            .opts
            .state_dir
            .join("apps/hello-service/versions/0.2.0/hello-service");
        let expected = match agent.opts.arch.as_str() {
            "x86_64" => "EM_X86_64",
            "aarch64" => "EM_AARCH64",
            "arm" => "EM_ARM",
            _ => "EM_RISCV",
        };
        assert_eq!(muscle_inspect_facts(&bin)?, expected, "{}", bin.display());
    }
    Ok(())
}

/// The ELF machine of a file, by object inspection (the same library the agent uses).
fn muscle_inspect_facts(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path)?;
    // e_machine is the little-endian u16 at offset 18 of an ELF header.
    anyhow::ensure!(
        bytes.starts_with(b"\x7fELF"),
        "{} is not an ELF",
        path.display()
    );
    Ok(match u16::from_le_bytes([bytes[18], bytes[19]]) {
        62 => "EM_X86_64".into(),
        183 => "EM_AARCH64".into(),
        40 => "EM_ARM".into(),
        243 => "EM_RISCV".into(),
        other => format!("e_machine {other}"),
    })
}
