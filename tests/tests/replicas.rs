//! Several deployer replicas on one PostgreSQL and one S3 bucket (s3s-fs, which checks request
//! signatures): any of them answers agents and the CLI, one at
//! a time runs the rollout engine, and when that one dies (SIGKILL, in the middle of a rollout
//! on a mixed-arch fleet) the other takes the engine over, the agents fail over to it, and the
//! rollout completes.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use muscle_e2e::{wait_until, Backends, Deployer, Fleet, Postgres, S3Server};

#[test]
fn the_replica_running_the_engine_is_killed_mid_rollout_and_the_other_completes_it() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("replicas");
    let pg = Postgres::start(&dir.join("postgresql"))?;
    let s3 = S3Server::start(&dir, &["releases"])?;
    let backends = Backends {
        database: Some(pg.database("muscle")?),
        blob_store: Some(s3.url("releases")),
        env: s3.env(),
    };
    let first = Deployer::start_on(&b.deployer, &dir.join("first"), &backends, &[])?;
    let second = Deployer::start_on(&b.deployer, &dir.join("second"), &backends, &[])?;
    first.publish(&b.v1.dir)?;
    // The release's files went to the bucket; the second replica has none of its own yet.
    let in_bucket = std::fs::read_dir(s3.root.join("releases/sha256"))?.count();
    ensure!(in_bucket >= 2, "{in_bucket} blobs in the bucket");
    ensure!(std::fs::read_dir(dir.join("second/blobs/sha256"))?
        .next()
        .is_none());
    let taken_by = |d: &Deployer| format!("replica {}:{} runs the rollout engine", host(), d.port);
    wait_until(
        "the first replica to take the engine",
        Duration::from_secs(10),
        || {
            Ok(second
                .ok(&["audit"])?
                .contains(&taken_by(&first))
                .then_some(()))
        },
    )?;

    // Every agent knows both replicas; the first one it asks is the engine's.
    let mut fleet = Fleet::start_with(
        first,
        &b.both_arches(),
        2,
        &dir,
        &["--server", &second.url()],
    )?;
    let spec = common::service_spec();
    let id = fleet.start_rollout(&[
        "hello-service",
        "0.1.0",
        "--service",
        &spec,
        "--max-parallel",
        "2",
        "--min-healthy-time",
        "3s",
    ])?;
    wait_until("the canary wave to pass", Duration::from_secs(120), || {
        let r = second.rollout(Some(id))?;
        ensure!(
            r["status"] == "running",
            "the rollout ended before the kill: {r:#}"
        );
        Ok((r["current_wave"].as_u64() >= Some(1)).then_some(()))
    })?;
    ensure!(
        !second.ok(&["audit"])?.contains(&taken_by(&second)),
        "the engine runs on one replica until the kill"
    );
    fleet.deployer.kill9();
    let killed = std::time::Instant::now();

    let r = second.wait_rollout_end(id, Duration::from_secs(180))?;
    ensure!(r["status"] == "succeeded", "{r:#}");
    for agent in &fleet.agents {
        ensure!(
            agent.service_version()? == "0.1.0",
            "{} serves 0.1.0",
            agent.opts.id
        );
    }
    // The agents moved to the replica left: it hears from every one of them.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(killed.elapsed()));
    wait_until(
        "every agent to check in with the second replica",
        Duration::from_secs(30),
        || {
            let fleet = second.fleet()?;
            let fresh = fleet
                .iter()
                .filter(|a| a["last_seen_s"].as_u64().is_some_and(|age| age <= 2))
                .count();
            Ok((fresh == 4).then_some(()))
        },
    )?;
    let audit = second.ok(&["audit"])?;
    let took_over = audit.find(&taken_by(&second));
    let started = audit.find(&format!("started rollout {id}"));
    ensure!(
        matches!((started, took_over), (Some(s), Some(t)) if s < t),
        "the second replica took the engine over after the rollout started:\n{audit}"
    );
    // A clean stop with PostgreSQL and S3 behind it: check-ins written, exit 0.
    let mut second = second;
    let pid = second.pid().expect("running").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()?;
    let status = second.wait_exit(Duration::from_secs(30))?;
    ensure!(
        status.success() && second.log().contains("stopped"),
        "{status}: {}",
        second.log()
    );
    Ok(())
}

fn host() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    name.trim().to_owned()
}
