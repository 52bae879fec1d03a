//! A malicious deployer against an agent that pins the release key. docs/security.md promises
//! that such an agent need not trust its deployer: whatever the deployer says, the agent runs
//! only what the release key signed, writes nothing outside its state dir, keeps the running
//! service untouched when it refuses, and tells the deployer why.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{signed, signing_key};
use muscle_e2e::{wait_until, Agent, AgentOptions, Blob, ScriptedServer};
use serde_json::{json, Value};

const APP: &str = "hello-service";

/// Every file under `dir` but the agent's state dir, with its size: what an attack must not
/// change.
fn snapshot(dir: &Path, state_dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.starts_with(state_dir) || path.extension().is_some_and(|e| e == "log") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).expect("listed");
            if meta.is_dir() {
                todo.push(path.clone());
            }
            files.insert(path, meta.len());
        }
    }
    files
}

struct Target {
    server: ScriptedServer,
    agent: Agent,
    dir: PathBuf,
    /// The v1 manifest as released (with its signed service spec) and the x86_64 binaries.
    v1: (Value, Vec<u8>),
    v2: (Value, Vec<u8>),
}

/// What the malicious deployer offers: a release's manifest (re-signed with the pinned key and
/// `counter`) and bytes, under an app name and version, naming a binary of its choosing.
struct Offer<'a> {
    app: &'a str,
    version: &'a str,
    manifest: &'a Value,
    bytes: &'a [u8],
    counter: u64,
    binary: &'a str,
}

impl<'a> Offer<'a> {
    /// `release` offered as hello-service `version`, as released.
    fn of(release: &'a (Value, Vec<u8>), version: &'a str, counter: u64) -> Offer<'a> {
        Offer {
            app: APP,
            version,
            manifest: &release.0,
            bytes: &release.1,
            counter,
            binary: APP,
        }
    }
}

impl Target {
    /// Offers `o`, with `service` as the deployer's own spec.
    fn offer(&self, o: Offer, service: Value) {
        let Offer {
            app,
            version,
            manifest,
            bytes,
            counter,
            binary,
        } = o;
        let (text, sig) = signed(manifest, counter, None, &signing_key(7));
        let entry = manifest["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["arch"] == "x86_64")
            .unwrap();
        let sha = entry["sha256"].as_str().unwrap();
        let path = format!("/blobs/{sha}");
        self.server.put_blob(
            &path,
            Blob {
                bytes: bytes.to_vec(),
                ..Default::default()
            },
        );
        self.server.set_desired(json!([{
            "app": app,
            "version": version,
            "artifact": {"url": path, "sha256": sha, "size": entry["size"], "binary": binary},
            "manifest": text,
            "signature": sig,
            "service": service,
        }]));
    }

    /// Waits until the agent reports `version` installed and healthy.
    fn wait_healthy(&self, version: &str) -> Result<()> {
        wait_until(
            &format!("{version} healthy"),
            Duration::from_secs(60),
            || {
                let r = self.server.last_app_report(APP).context("no report")?;
                ensure!(
                    r["installed_version"] == version && r["health"] == "healthy",
                    "{r}"
                );
                Ok(Some(()))
            },
        )
    }

    /// Waits until the agent's report for `app` says it refused `version` for `reason`.
    fn wait_refused(&self, app: &str, version: &str, reason: &str) -> Result<()> {
        wait_until(
            &format!("{app} {version} refused: {reason}"),
            Duration::from_secs(60),
            || {
                let r = self.server.last_app_report(app).context("no report")?;
                ensure!(
                    r["failed_version"] == version
                        && r["last_error"]
                            .as_str()
                            .unwrap_or_default()
                            .contains(reason),
                    "report: {r}"
                );
                Ok(Some(()))
            },
        )
    }

    /// Waits until the agent reports that it refused the whole answer for `reason`.
    fn wait_answer_refused(&self, reason: &str) -> Result<()> {
        wait_until(
            &format!("the answer refused: {reason}"),
            Duration::from_secs(60),
            || {
                let reports = self.server.reports();
                let problem = reports
                    .last()
                    .map(|r| r["problem"].clone())
                    .unwrap_or_default();
                ensure!(
                    problem.as_str().unwrap_or_default().contains(reason),
                    "last report's problem: {problem}"
                );
                Ok(Some(()))
            },
        )
    }
}

fn parts(release: &muscle_e2e::Artifacts) -> Result<(Value, Vec<u8>)> {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(release.dir.join("manifest.json"))?)?;
    let bytes = std::fs::read(release.binary("x86_64-unknown-linux-musl", APP))?;
    Ok((manifest, bytes))
}

fn start(name: &str) -> Result<Target> {
    let b = common::builds();
    let dir = common::scratch(name);
    // A folder beside the state dir, holding the kind of file the agent's repair step deletes.
    std::fs::create_dir_all(dir.join("outside"))?;
    std::fs::write(dir.join("outside/keep.tmp"), "not the agent's")?;
    let server = ScriptedServer::start();
    let key = signing_key(7);
    let opts = AgentOptions {
        extra_args: vec![
            "--trusted-key".into(),
            muscle_protocol::public_key_hex(&key),
        ],
        ..AgentOptions::new("pinned", b.agent("x86_64"), "x86_64", dir.join("agent"))
    };
    let agent = Agent::start(opts, &server.url())?;
    Ok(Target {
        server,
        agent,
        v1: parts(&b.v1)?,
        v2: parts(&b.v2)?,
        dir,
    })
}

#[test]
fn a_malicious_deployer_cannot_make_a_key_pinning_agent_run_or_write_anything_unsigned(
) -> Result<()> {
    let t = start("attacks")?;
    let state_dir = t.agent.opts.state_dir.clone();
    let pwned = t.dir.join("outside/pwned");
    // The deployer's own spec: a command health check that writes outside the state dir.
    let evil_spec = json!({
        "args": ["--listen", "127.0.0.1:${port}"],
        "health": {"kind": "command", "argv": ["/bin/sh", "-c", format!("touch {}", pwned.display())]},
        "min_healthy_time": "1s",
    });

    // 1. A properly signed release, offered with the deployer's spec: the signed spec runs.
    assert!(
        t.v1.0["service"].is_object(),
        "the release carries its spec: {}",
        t.v1.0
    );
    t.offer(Offer::of(&t.v1, "0.1.0", 100), evil_spec.clone());
    t.wait_healthy("0.1.0")?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(!pwned.exists(), "the deployer's command health check ran");
    let installed = &t.agent.state()?["apps"][APP]["current"]["spec"];
    assert_eq!(installed["health"]["kind"], "http", "{installed}");
    assert_eq!(t.agent.service_version()?, "0.1.0");
    let pids = t.agent.service_pids();
    let before = snapshot(&t.dir, &state_dir);
    let untouched = |what: &str| -> Result<()> {
        assert_eq!(t.agent.service_version()?, "0.1.0", "{what}");
        assert_eq!(
            t.agent.service_pids(),
            pids,
            "{what}: the service was restarted"
        );
        assert_eq!(
            snapshot(&t.dir, &state_dir),
            before,
            "{what}: files outside the state dir changed"
        );
        assert!(!pwned.exists(), "{what}: the deployer's command ran");
        Ok(())
    };

    // 2. A signed release without a signed spec: nothing unsigned runs.
    let mut unsigned_spec = t.v2.0.clone();
    unsigned_spec.as_object_mut().unwrap().remove("service");
    t.offer(
        Offer {
            manifest: &unsigned_spec,
            ..Offer::of(&t.v2, "0.2.0", 200)
        },
        evil_spec.clone(),
    );
    t.wait_refused(APP, "0.2.0", "carries no signed service spec")?;
    untouched("an unsigned spec")?;

    // 3. Another binary of a signed release than the one its signed spec runs.
    let mut two_bins = t.v2.0.clone();
    let mut other = two_bins["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["arch"] == "x86_64")
        .unwrap()
        .clone();
    other["binary"] = "other-bin".into();
    other["path"] = "x86_64-unknown-linux-musl/other-bin".into();
    two_bins["artifacts"].as_array_mut().unwrap().push(other);
    t.offer(
        Offer {
            manifest: &two_bins,
            binary: "other-bin",
            ..Offer::of(&t.v2, "0.2.0", 200)
        },
        evil_spec.clone(),
    );
    t.wait_refused(
        APP,
        "0.2.0",
        "the signed service spec runs hello-service, not the other-bin offered",
    )?;
    untouched("another binary")?;

    // 4. Cross-app replay: an older signed release of hello-service offered as another app.
    t.offer(
        Offer {
            app: "other-app",
            ..Offer::of(&t.v1, "0.1.0", 50)
        },
        evil_spec.clone(),
    );
    t.wait_refused(
        "other-app",
        "0.1.0",
        "the manifest is for hello-service 0.1.0, not other-app 0.1.0",
    )?;
    untouched("a cross-app replay")?;

    // 5. Server strings as paths, and names without bounds: the answer is refused whole.
    for (app, reason) in [
        ("../../outside", "starts with '.'"),
        (t.dir.join("outside").to_str().unwrap(), "'/' at position 0"),
        (&"x".repeat(300), "300 characters long"),
    ] {
        t.offer(
            Offer {
                app,
                ..Offer::of(&t.v1, "0.1.0", 100)
            },
            evil_spec.clone(),
        );
        t.wait_answer_refused(reason)?;
        untouched(&format!("app name {app:?}"))?;
    }
    let state = t.agent.state()?;
    let names: Vec<&String> = state["apps"].as_object().unwrap().keys().collect();
    assert!(
        names
            .iter()
            .all(|n| muscle_protocol::Name::parse(n).is_ok()),
        "an invalid name reached state.json: {names:?}"
    );

    // 6. An oversized answer (64 MiB: as good as endless) is refused, not buffered: the agent
    // reads at most 4 MiB of it, and its peak memory stays under 24 MiB.
    t.offer(Offer::of(&t.v1, "0.1.0", 100), evil_spec);
    t.server.pad_answers(64 * 1024 * 1024);
    t.wait_answer_refused("larger than")?;
    untouched("an oversized answer")?;
    let pid = t.agent.pid().context("the agent runs")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    eprintln!("agent peak RSS after an oversized answer: {peak_kib} KiB");
    assert!(
        peak_kib < 24 * 1024,
        "the agent's peak RSS reached {peak_kib} KiB"
    );

    // The agent restarts on the state it kept (its repair step deletes *.tmp files of the apps
    // it knows): nothing outside is repaired or removed.
    let mut t = t;
    t.server.pad_answers(0);
    let seen = t.server.reports().len();
    t.agent.restart()?;
    wait_until(
        "two check-ins after the restart",
        Duration::from_secs(30),
        || Ok((t.server.reports().len() >= seen + 2).then_some(())),
    )?;
    assert_eq!(snapshot(&t.dir, &state_dir), before, "after a restart");
    Ok(())
}

#[test]
fn a_trickling_answer_is_abandoned_at_its_deadline_and_the_agent_checks_in_again() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("trickle-answer");
    let server = ScriptedServer::start();
    let opts = AgentOptions::new("trickled", b.agent("x86_64"), "x86_64", dir.join("agent"));
    let agent = Agent::start(opts, &server.url())?;
    wait_until("a first check-in", Duration::from_secs(30), || {
        Ok((!server.reports().is_empty()).then_some(()))
    })?;
    // Every answer now comes one byte a second: each check-in is abandoned at its 30 s deadline,
    // and the agent comes back for more instead of hanging on the first.
    // (Padded to ~250 bytes: without a deadline, one answer would hold the agent 4 minutes.)
    server.pad_answers(200);
    server.trickle_answers(true);
    let seen = server.reports().len();
    wait_until(
        "a check-in after an abandoned one",
        Duration::from_secs(90),
        || Ok((server.reports().len() >= seen + 2).then_some(())),
    )?;
    assert!(
        agent.log().contains("check-in failed"),
        "the abandoned check-in is logged: {}",
        agent.log()
    );
    Ok(())
}

#[test]
fn a_service_killed_while_a_check_in_answer_trickles_is_restarted_within_two_seconds() -> Result<()>
{
    let t = start("killed-while-trickling")?;
    t.offer(Offer::of(&t.v1, "0.1.0", 100), json!({}));
    t.wait_healthy("0.1.0")?;
    // From now on each answer takes minutes to trickle in; the agent abandons it after 30 s.
    t.server.pad_answers(200);
    t.server.trickle_answers(true);
    let seen = t.server.reports().len();
    wait_until(
        "a check-in whose answer trickles",
        Duration::from_secs(30),
        || Ok((t.server.reports().len() > seen).then_some(())),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let pids = t.agent.service_pids();
    ensure!(pids.len() == 1, "service processes: {pids:?}");
    let killed = std::time::Instant::now();
    nix_kill(pids[0])?;
    let restarted = wait_until("a new service process", Duration::from_secs(40), || {
        let now = t.agent.service_pids();
        Ok((now.len() == 1 && now[0] != pids[0]).then(|| now[0]))
    })?;
    let took = killed.elapsed();
    eprintln!("service restarted {took:?} after SIGKILL while a check-in answer trickled");
    // Still inside the trickling check-in: the restart owed nothing to the network.
    assert_eq!(
        t.server.reports().len(),
        seen + 1,
        "the check-in in flight ended before the restart"
    );
    assert!(
        took < Duration::from_secs(2),
        "pid {restarted} restarted {took:?} after the kill, behind a trickling answer"
    );
    Ok(())
}

fn nix_kill(pid: u32) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -9 {pid}: {status}");
    Ok(())
}
