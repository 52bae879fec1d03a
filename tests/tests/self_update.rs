//! The agent is an app like any other: agents of both architectures update themselves through a
//! rollout, keep their services running untouched, and a broken agent release is refused by its
//! probe, reported, and rolled back.

mod common;

use std::time::Duration;

use anyhow::Result;
use muscle_e2e::{
    release_agent_version, release_broken_agent, release_lying_agent, target_dir, wait_until,
    Deployer, Fleet,
};

const SELF: &str = "muscle-agent";

/// The fleet row's report for `app`.
fn app_row(row: &serde_json::Value, app: &str) -> serde_json::Value {
    row["apps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["app"] == app)
        .cloned()
        .unwrap_or_default()
}

#[test]
fn agents_of_both_arches_update_themselves_and_a_broken_agent_release_is_refused() -> Result<()> {
    let b = common::builds();
    let dist = target_dir().join("e2e-dist");
    let next = release_agent_version("0.1.1", &dist)?;
    let broken = release_broken_agent("0.1.2", &dist)?;
    let dir = common::scratch("self-update");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    for release in [&b.v1, &b.agents, &next, &broken] {
        deployer.publish(&release.dir)?;
    }
    let fleet = Fleet::start(deployer, &b.both_arches(), 1, &dir)?;
    common::roll_out(&fleet, "0.1.0")?;
    let services: Vec<Vec<u32>> = fleet.agents.iter().map(|a| a.service_pids()).collect();
    let agent_pids: Vec<Option<u32>> = fleet.agents.iter().map(|a| a.pid()).collect();

    // A real new agent: verified, probed, exec'd in place; services untouched.
    let id = fleet.start_rollout(&[
        SELF,
        "0.1.1",
        "--min-healthy-time",
        "1s",
        "--healthy-deadline",
        "60s",
    ])?;
    let r = fleet
        .deployer
        .wait_rollout_end(id, Duration::from_secs(240))?;
    assert_eq!(r["status"], "succeeded", "{r:#}");
    for (i, agent) in fleet.agents.iter().enumerate() {
        let row = fleet.deployer.fleet_row(&agent.opts.id)?;
        assert_eq!(
            row["agent_version"], "0.1.1",
            "{} runs the new agent",
            agent.opts.id
        );
        assert_eq!(agent.pid(), agent_pids[i], "exec keeps the process");
        assert!(
            agent.log().contains("agent updated to 0.1.1"),
            "{}",
            agent.log()
        );
        assert_eq!(
            agent.service_pids(),
            services[i],
            "{}'s service was not restarted",
            agent.opts.id
        );
        assert_eq!(agent.service_version()?, "0.1.0");
        let staged = agent
            .opts
            .state_dir
            .join("apps/muscle-agent/versions/0.1.1/muscle-agent");
        let elf = std::fs::read(&staged)?;
        let machine = u16::from_le_bytes([elf[18], elf[19]]);
        assert_eq!(
            machine,
            if agent.opts.arch == "aarch64" {
                183
            } else {
                62
            },
            "an {} agent updates only to an {} agent",
            agent.opts.arch,
            agent.opts.arch
        );
    }
    // The new agent still supervises: a killed service comes back.
    let x86 = fleet.agent("x86_64-1");
    let pid = x86.service_pids()[0];
    // SAFETY: kill(2) on a service process of this test.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_until(
        "the service restarted by the updated agent",
        Duration::from_secs(30),
        || {
            let pids = x86.service_pids();
            Ok((pids.len() == 1 && pids[0] != pid && x86.service_version().is_ok()).then_some(()))
        },
    )?;

    // A broken agent release: the probe fails, nothing is exec'd, the failure is reported and the
    // rollout halts in its canary wave and rolls back.
    let id = fleet.start_rollout(&[
        SELF,
        "0.1.2",
        "--min-healthy-time",
        "1s",
        "--healthy-deadline",
        "60s",
        "--auto-rollback",
    ])?;
    let r = fleet
        .deployer
        .wait_rollout_end(id, Duration::from_secs(180))?;
    assert_eq!(r["status"], "rolled_back", "{r:#}");
    let failed: Vec<&serde_json::Value> = r["waves"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "failed")
        .collect();
    assert!(!failed.is_empty(), "{r:#}");
    for m in failed {
        let error = m["error"].as_str().unwrap();
        assert!(
            error.contains("failed its probe") && error.contains("exiting at once"),
            "{error}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    for agent in &fleet.agents {
        let row = fleet.deployer.fleet_row(&agent.opts.id)?;
        assert_eq!(
            row["agent_version"], "0.1.1",
            "{} still runs the good agent",
            agent.opts.id
        );
        assert_eq!(app_row(&row, "hello-service")["health"], "healthy");
        assert_eq!(agent.service_version()?, "0.1.0");
    }
    Ok(())
}

#[test]
fn a_new_agent_whose_probe_exits_0_without_checking_in_is_refused() -> Result<()> {
    let b = common::builds();
    let dist = target_dir().join("e2e-dist");
    let lying = release_lying_agent("0.1.3", &dist)?;
    let dir = common::scratch("self-lying");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&lying.dir)?;
    let fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 1, &dir)?;
    let before = fleet.deployer.fleet_row("x86_64-1")?["agent_version"].clone();
    let id = fleet.start_rollout(&[SELF, "0.1.3", "--healthy-deadline", "60s"])?;
    let r = fleet
        .deployer
        .wait_rollout_end(id, Duration::from_secs(120))?;
    assert_eq!(r["status"], "halted", "{r:#}");
    let error = r["waves"][0]["members"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("exited 0 but never checked in"),
        "the refusal names the missing check-in: {error}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let row = fleet.deployer.fleet_row("x86_64-1")?;
    assert_eq!(row["agent_version"], before, "the old agent still runs");
    assert!(
        !fleet.agent("x86_64-1").log().contains("handing over"),
        "{}",
        fleet.agent("x86_64-1").log()
    );
    Ok(())
}

/// The agent's state as a crashed self-update leaves it: `to` exec'd, not yet checked in.
fn pending_update(
    state_dir: &std::path::Path,
    from: &std::path::Path,
    to: &std::path::Path,
    starts: u32,
) -> Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let state = serde_json::json!({
        "agent_id": "reverting",
        "self_update": {"version": "9.9.9", "sha256": "00", "offer": "00", "from": from, "to": to, "starts": starts},
    });
    std::fs::write(
        state_dir.join("state.json"),
        serde_json::to_vec_pretty(&state)?,
    )?;
    Ok(())
}

/// Waits for the agent's self report to name 9.9.9 as failed, and returns the reason.
fn reported_revert(server: &muscle_e2e::ScriptedServer) -> Result<String> {
    wait_until(
        "the reverted self-update to be reported",
        Duration::from_secs(30),
        || {
            let r = server.last_app_report(SELF).unwrap_or_default();
            Ok((r["failed_version"] == "9.9.9")
                .then(|| r["last_error"].as_str().unwrap_or_default().to_owned()))
        },
    )
}

#[test]
fn a_new_agent_that_does_not_come_up_is_reverted_and_reported() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("self-revert");
    let bin = b.agent("x86_64");
    // Each case reports to its own scripted server, so one's report cannot pass for the other's.
    let agent_at = |name: &str, server: &muscle_e2e::ScriptedServer| {
        let opts = muscle_e2e::AgentOptions::new(name, bin.clone(), "x86_64", dir.join(name));
        muscle_e2e::Agent::start(opts, &server.url())
    };

    // The new binary crashed and the service manager started the old one again.
    pending_update(
        &dir.join("old-again"),
        &bin,
        &dir.join("gone/muscle-agent"),
        1,
    )?;
    let server = muscle_e2e::ScriptedServer::start();
    let old = agent_at("old-again", &server)?;
    let reason = reported_revert(&server)?;
    assert!(reason.contains("did not come up"), "{reason}");
    assert!(old.state()?["self_update"].is_null());
    drop(old);

    // The new binary keeps starting without ever checking in: after 3 starts, back to `from`.
    pending_update(&dir.join("counter"), &bin, &bin, 3)?;
    let server = muscle_e2e::ScriptedServer::start();
    let counted = agent_at("counter", &server)?;
    let reason = reported_revert(&server)?;
    assert!(
        reason.contains("started 3 times without checking in"),
        "{reason}"
    );
    assert!(
        counted.log().contains("reverting the self-update"),
        "{}",
        counted.log()
    );
    Ok(())
}
