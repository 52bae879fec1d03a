//! The operators' API end to end: from another working directory, with only `--server` and a
//! token, an operator publishes (a streamed upload the deployer re-checks), rolls out to a
//! mixed-arch fleet, pauses, resumes and watches; roles decide who may do what.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Result};
use muscle_e2e::{Deployer, Fleet};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The command's stdout, failing with its stderr unless it succeeded.
fn ok(d: &Deployer, token: &str, cwd: &Path, args: &[&str]) -> Result<String> {
    let out = d.remote(token, cwd, args)?;
    ensure!(
        out.status.success(),
        "muscle-deploy --server {} {} failed: {}{}",
        d.url(),
        args.join(" "),
        stdout(&out),
        stderr(&out)
    );
    Ok(stdout(&out))
}

/// The command's stderr, failing unless it failed.
fn refused(d: &Deployer, token: &str, cwd: &Path, args: &[&str]) -> Result<String> {
    let out = d.remote(token, cwd, args)?;
    ensure!(
        !out.status.success(),
        "muscle-deploy {} succeeded: {}",
        args.join(" "),
        stdout(&out)
    );
    Ok(stderr(&out))
}

#[test]
fn from_elsewhere_with_a_server_url_and_a_token_an_operator_publishes_rolls_out_and_steers(
) -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("remote");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    operator_steers_from_elsewhere(deployer, &dir)
}

#[test]
fn the_same_on_a_deployer_whose_records_are_in_postgresql() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("remote-postgresql");
    let pg = muscle_e2e::Postgres::start(&dir.join("postgresql"))?;
    let url = pg.database("muscle")?;
    let backends = muscle_e2e::Backends {
        database: Some(url),
        ..Default::default()
    };
    let deployer = Deployer::start_on(&b.deployer, &dir.join("data"), &backends, &[])?;
    operator_steers_from_elsewhere(deployer, &dir)?;
    // The records are where the deployer said: in PostgreSQL, none in a SQLite file.
    let rows = pg.psql(
        "muscle",
        "SELECT (SELECT count(*) FROM audit) || ' ' || (SELECT count(*) FROM agents)",
    )?;
    let counts: Vec<u32> = rows
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    ensure!(
        counts.len() == 2 && counts.iter().all(|&n| n >= 2),
        "{rows}"
    );
    ensure!(
        !dir.join("data/muscle.db").exists(),
        "no SQLite store beside PostgreSQL"
    );
    Ok(())
}

fn operator_steers_from_elsewhere(deployer: Deployer, dir: &Path) -> Result<()> {
    let b = common::builds();
    deployer.publish(&b.v1.dir)?;
    let arches = [
        (b.agent("x86_64"), "x86_64"),
        (b.agent("aarch64"), "aarch64"),
    ];
    let fleet = Fleet::start(deployer, &arches, 1, dir)?;
    let d = &fleet.deployer;
    let token = |name: &str, role: &str| -> Result<String> {
        Ok(d.ok(&["token", "create", name, "--role", role])?
            .trim()
            .to_owned())
    };
    let (ci, ops, viewer) = (
        token("ci", "publisher")?,
        token("ops", "operator")?,
        token("viewer", "read-only")?,
    );
    let laptop = dir.join("laptop");
    std::fs::create_dir_all(&laptop)?;
    let v2 = b.v2.dir.to_str().unwrap();

    let e = refused(d, "not-a-token", &laptop, &["fleet"])?;
    ensure!(e.contains("401") && e.contains("MUSCLE_TOKEN"), "{e}");
    let e = refused(d, &viewer, &laptop, &["publish", v2])?;
    ensure!(e.contains("read-only") && e.contains("publisher"), "{e}");
    let e = refused(d, &ci, &laptop, &["publish", v2, "--trusted-key", "00"])?;
    ensure!(e.contains("the deployer decides"), "{e}");
    let out = ok(d, &ci, &laptop, &["publish", v2])?;
    ensure!(out.contains("published hello-service 0.2.0"), "{out}");
    let out = ok(d, &ci, &laptop, &["publish", v2])?;
    ensure!(out.contains("already published"), "{out}");
    let releases = ok(d, &viewer, &laptop, &["releases"])?;
    ensure!(
        releases.contains("0.2.0") && releases.contains("aarch64/hello-service"),
        "{releases}"
    );

    let spec = common::service_spec();
    let start = [
        "rollout",
        "start",
        "hello-service",
        "0.2.0",
        "--service",
        &spec,
        "--min-healthy-time",
        "2s",
    ];
    let e = refused(d, &ci, &laptop, &start)?;
    ensure!(e.contains("403") && e.contains("publisher"), "{e}");
    let out = ok(d, &ops, &laptop, &start)?;
    ensure!(out.contains("to 2 agents"), "{out}");
    let id = out.split_whitespace().nth(1).unwrap().trim_end_matches(':');
    ok(d, &ops, &laptop, &["rollout", "pause", id])?;
    // The engine applies a request at its next step.
    muscle_e2e::wait_until("the rollout to pause", Duration::from_secs(30), || {
        let out = ok(d, &viewer, &laptop, &["rollout", "status", id, "--json"])?;
        let status: serde_json::Value = serde_json::from_str(&out)?;
        Ok((status["status"] == "paused").then_some(()))
    })?;
    let e = refused(d, &ops, &laptop, &["rollout", "pause", id])?;
    ensure!(
        e.contains("409"),
        "a paused rollout is not paused again: {e}"
    );
    ok(d, &ops, &laptop, &["rollout", "resume", id])?;
    let watched = ok(d, &viewer, &laptop, &["rollout", "status", "--watch"])?;
    ensure!(
        watched.contains("Succeeded") || watched.contains("succeeded"),
        "{watched}"
    );

    let fleet_rows: Vec<serde_json::Value> =
        serde_json::from_str(&ok(d, &viewer, &laptop, &["fleet", "--json"])?)?;
    ensure!(fleet_rows.len() == 2);
    for row in &fleet_rows {
        ensure!(row["apps"][0]["version"] == "0.2.0", "{row:#}");
    }
    let detail: serde_json::Value =
        serde_json::from_str(&ok(d, &viewer, &laptop, &["agent", "aarch64-1", "--json"])?)?;
    let events: Vec<String> = detail["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| format!("{} {}", e["event"], e["version"]))
        .collect();
    ensure!(
        events.contains(&"\"joined\" null".to_owned())
            && events.contains(&"\"installed\" \"0.2.0\"".to_owned()),
        "{detail:#}"
    );
    let e = refused(d, &viewer, &laptop, &["agent", "nobody"])?;
    ensure!(e.contains("no agent"), "{e}");
    let audit = ok(d, &viewer, &laptop, &["audit"])?;
    for expected in [
        "token:ci",
        "published hello-service 0.2.0",
        "token:ops",
        &format!("started rollout {id}"),
        &format!("asked rollout {id} to pause"),
        &format!("asked rollout {id} to resume"),
    ] {
        ensure!(
            audit.contains(expected),
            "{expected:?} missing from\n{audit}"
        );
    }
    ensure!(
        std::fs::read_dir(&laptop)?.next().is_none(),
        "nothing is written where the operator stands"
    );
    ensure!(
        !d.data_dir.join("uploads").exists()
            || std::fs::read_dir(d.data_dir.join("uploads"))?
                .next()
                .is_none(),
        "uploads are cleared once published"
    );
    Ok(())
}

#[test]
fn cargo_xtask_release_publish_uploads_the_release_it_wrote() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("release-publish");
    let d = Deployer::start(&b.deployer, &dir.join("data"))?;
    let ci = d
        .ok(&["token", "create", "ci", "--role", "publisher"])?
        .trim()
        .to_owned();
    let targets = [
        "--target",
        "x86_64-unknown-linux-musl",
        "--target",
        "aarch64-unknown-linux-musl",
    ];
    let v = muscle_e2e::HelloVersion {
        version: "0.5.0",
        unhealthy: false,
    };
    // Released once to make the scratch workspace; the second run, with --publish, is cached.
    let first = muscle_e2e::release_hello_with(v, &dir.join("dist"), "", &targets)?;
    let manifest = dir.join("dist/src/hello-service-0.5.0/Cargo.toml");
    let release = |token: &str| -> Result<Output> {
        Ok(std::process::Command::new(muscle_e2e::xtask_binary()?)
            .args(["release", "--manifest-path", manifest.to_str().unwrap()])
            .args(["--out", dir.join("dist").to_str().unwrap()])
            .args(targets)
            .args(["--publish", &d.url()])
            .env("MUSCLE_TOKEN", token)
            .output()?)
    };
    let out = release("wrong")?;
    ensure!(!out.status.success(), "a wrong token fails the release");
    ensure!(stderr(&out).contains("401"), "{}", stderr(&out));
    let out = release(&ci)?;
    ensure!(out.status.success(), "{}", stderr(&out));
    ensure!(
        stderr(&out).contains("published hello-service 0.5.0 (2 artifacts)"),
        "{}",
        stderr(&out)
    );
    let releases = d.ok(&["releases", "--json"])?;
    ensure!(releases.contains("\"0.5.0\""), "{releases}");
    ensure!(first.dir.join("manifest.json").is_file());
    let audit = d.ok(&["audit"])?;
    ensure!(
        audit.contains("token:ci") && audit.contains("published hello-service 0.5.0"),
        "{audit}"
    );
    Ok(())
}
