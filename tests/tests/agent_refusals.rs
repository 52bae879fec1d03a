//! A real agent against a scripted deployer that offers what the real one never would: truncated
//! blobs, wrong hashes, wrong-architecture and dynamically linked binaries, unsigned, tampered,
//! expired and replayed manifests. Each is refused, the reason reaches the server, and the
//! running version keeps running, untouched.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::{signed, signing_key};
use muscle_e2e::{wait_until, Agent, AgentOptions, Artifacts, Blob, ScriptedServer};
use serde_json::{json, Value};

const APP: &str = "hello-service";

fn spec() -> Value {
    json!({
        "args": ["--listen", "127.0.0.1:${port}"],
        "health": {"kind": "http", "url": "http://127.0.0.1:${port}/healthz"},
        "min_healthy_time": "1s",
        "healthy_deadline": "15s",
        "stop_grace": "2s",
    })
}

/// A release's manifest, the bytes of its x86_64 binary, and that artifact's manifest entry.
fn release_parts(release: &Artifacts) -> Result<(Value, Vec<u8>)> {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(release.dir.join("manifest.json"))?)?;
    let bytes = std::fs::read(release.binary("x86_64-unknown-linux-musl", APP))?;
    Ok((manifest, bytes))
}

/// Points the x86_64 entry of `manifest` at `bytes` (a tampered, unsigned manifest).
fn retarget(manifest: &mut Value, bytes: &[u8]) {
    let entry = manifest["artifacts"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|a| a["arch"] == "x86_64")
        .unwrap();
    entry["sha256"] = muscle_protocol::sha256_hex(bytes).into();
    entry["size"] = bytes.len().into();
}

/// Offers `bytes` as `version` with `manifest` (serialized as given) and its optional signature.
fn offer(
    server: &ScriptedServer,
    version: &str,
    manifest_text: &str,
    signature: Option<String>,
    bytes: Vec<u8>,
    truncate_at: Option<usize>,
) -> Result<String> {
    let blob = Blob {
        bytes,
        truncate_at,
        trickle: false,
    };
    offer_blob(server, version, manifest_text, signature, blob)
}

/// Like [`offer`], with the blob served as `blob` says.
fn offer_blob(
    server: &ScriptedServer,
    version: &str,
    manifest_text: &str,
    signature: Option<String>,
    blob: Blob,
) -> Result<String> {
    let manifest: Value = serde_json::from_str(manifest_text)?;
    let entry = x86_64_entry(&manifest)?;
    let sha = entry["sha256"].as_str().unwrap().to_owned();
    let path = format!("/blobs/{sha}-{}", blob.bytes.len());
    server.put_blob(&path, blob);
    server.set_desired(json!([desired_entry(
        APP,
        version,
        manifest_text,
        signature,
        &path,
        &entry,
        spec()
    )]));
    Ok(sha)
}

/// The manifest's entry for the x86_64 artifact.
fn x86_64_entry(manifest: &Value) -> Result<Value> {
    manifest["artifacts"]
        .as_array()
        .context("artifacts")?
        .iter()
        .find(|a| a["arch"] == "x86_64")
        .cloned()
        .context("x86_64 entry")
}

/// One entry of the answer's `apps`: `app` at `version`, its artifact the manifest's `entry`
/// served at `path`.
fn desired_entry(
    app: &str,
    version: &str,
    manifest_text: &str,
    signature: Option<String>,
    path: &str,
    entry: &Value,
    service: Value,
) -> Value {
    json!({
        "app": app,
        "version": version,
        "artifact": {"url": path, "sha256": entry["sha256"], "size": entry["size"], "binary": APP},
        "manifest": manifest_text,
        "signature": signature,
        "service": service,
    })
}

fn start_agent(server: &ScriptedServer, name: &str, extra_args: Vec<String>) -> Result<Agent> {
    let b = common::builds();
    let dir = common::scratch(name);
    let opts = AgentOptions {
        extra_args,
        ..AgentOptions::new(name, b.agent("x86_64"), "x86_64", dir.join("agent"))
    };
    Agent::start(opts, &server.url())
}

fn wait_installed(server: &ScriptedServer, agent: &Agent, version: &str) -> Result<()> {
    wait_until(
        &format!("{version} installed and healthy"),
        Duration::from_secs(60),
        || {
            let r = server.last_app_report(APP).context("no report yet")?;
            anyhow::ensure!(
                r["installed_version"] == version && r["health"] == "healthy",
                "report: {r}"
            );
            Ok(Some(()))
        },
    )?;
    assert_eq!(agent.service_version()?, version);
    Ok(())
}

/// Waits until the agent has refused the offer of `version` with bytes `sha` for a reason that
/// contains every one of `expect`, and has told the server so; returns the reason.
fn wait_refused(
    server: &ScriptedServer,
    version: &str,
    sha: &str,
    agent: &Agent,
    expect: &[&str],
) -> Result<String> {
    wait_until(
        &format!("{version} refused ({expect:?}) and reported"),
        Duration::from_secs(60),
        || {
            let state = agent.state()?;
            let failure = &state["apps"][APP]["failure"];
            let reason = failure["reason"].as_str().unwrap_or_default();
            let matches = expect.iter().all(|e| reason.contains(e));
            anyhow::ensure!(
                failure["version"] == version && failure["sha256"] == sha && matches,
                "agent state: {failure}"
            );
            // The server heard it: a final refusal fails the version; a transient one (a cut
            // download) is only reported as the last error while the agent retries.
            let r = server.last_app_report(APP).context("no report yet")?;
            let last_error = r["last_error"].as_str().unwrap_or_default();
            let failed_version = if failure["permanent"] == true {
                Value::from(version)
            } else {
                Value::Null
            };
            anyhow::ensure!(
                r["failed_version"] == failed_version
                    && expect.iter().all(|e| last_error.contains(e)),
                "last report: {r}"
            );
            Ok(Some(last_error.to_owned()))
        },
    )
}

/// The running version is untouched: same process, same answer, nothing staged for `version`.
fn assert_untouched(agent: &Agent, running: &str, pids: &[u32], refused: &str) -> Result<()> {
    assert_eq!(agent.service_version()?, running);
    assert_eq!(
        agent.service_pids(),
        pids,
        "the running service was not restarted"
    );
    assert!(
        !agent
            .opts
            .state_dir
            .join(format!("apps/{APP}/versions/{refused}"))
            .exists(),
        "nothing of {refused} was installed"
    );
    Ok(())
}

#[test]
fn bad_artifacts_are_refused_and_the_running_version_keeps_running() -> Result<()> {
    let b = common::builds();
    let server = ScriptedServer::start();
    let agent = start_agent(&server, "refusals", vec![])?;
    let (m1, v1) = release_parts(&b.v1)?;
    offer(&server, "0.1.0", &m1.to_string(), None, v1, None)?;
    wait_installed(&server, &agent, "0.1.0")?;
    let pids = agent.service_pids();
    assert_eq!(pids.len(), 1);
    let (m2, v2) = release_parts(&b.v2)?;

    // A blob whose bytes are not the ones the manifest names.
    let mut corrupt = v2.clone();
    corrupt[1000] ^= 0xff;
    let sha = offer(&server, "0.2.0", &m2.to_string(), None, corrupt, None)?;
    wait_refused(&server, "0.2.0", &sha, &agent, &["sha256 mismatch", &sha])?;
    assert_untouched(&agent, "0.1.0", &pids, "0.2.0")?;
    assert!(
        !agent
            .opts
            .state_dir
            .join(format!("apps/{APP}/downloads/{sha}.part"))
            .exists(),
        "a corrupt download is not kept"
    );

    // An aarch64 binary offered to an x86_64 agent, hashes consistent.
    let arm = std::fs::read(b.v2.binary("aarch64-unknown-linux-musl", APP))?;
    let mut m = m2.clone();
    retarget(&mut m, &arm);
    let sha = offer(&server, "0.2.0", &m.to_string(), None, arm, None)?;
    wait_refused(
        &server,
        "0.2.0",
        &sha,
        &agent,
        &["elf-machine", "EM_AARCH64"],
    )?;
    assert_untouched(&agent, "0.1.0", &pids, "0.2.0")?;

    // Endless data: the server sends more than the signed size (the same offer as the corrupt
    // blob, tried again because another refusal came in between).
    let mut endless = v2.clone();
    endless.extend(std::iter::repeat_n(0u8, 1 << 20));
    let sha = offer(&server, "0.2.0", &m2.to_string(), None, endless, None)?;
    wait_refused(
        &server,
        "0.2.0",
        &sha,
        &agent,
        &["sent more than the signed size"],
    )?;
    assert_untouched(&agent, "0.1.0", &pids, "0.2.0")?;

    // A dynamically linked binary (this machine's /bin/ls).
    let ls = std::fs::read("/bin/ls")?;
    let mut m = m2.clone();
    retarget(&mut m, &ls);
    let sha = offer(&server, "0.2.0", &m.to_string(), None, ls, None)?;
    wait_refused(&server, "0.2.0", &sha, &agent, &["no-interp", "PT_INTERP="])?;
    assert_untouched(&agent, "0.1.0", &pids, "0.2.0")?;

    // Slow retrieval: 16 bytes a second is abandoned once a 10 s window passes with less than
    // 1 KiB, reported, and what arrived is kept for resuming.
    let slow = Blob {
        bytes: v2.clone(),
        truncate_at: None,
        trickle: true,
    };
    let sha = offer_blob(&server, "0.2.0", &m2.to_string(), None, slow)?;
    wait_refused(
        &server,
        "0.2.0",
        &sha,
        &agent,
        &["slower than 1024 bytes per 10s"],
    )?;
    assert_untouched(&agent, "0.1.0", &pids, "0.2.0")?;

    // A download cut off halfway: reported, kept for resuming, and resumed with a Range request
    // once the server behaves.
    let half = v2.len() / 2;
    let sha = offer(
        &server,
        "0.2.0",
        &m2.to_string(),
        None,
        v2.clone(),
        Some(half),
    )?;
    wait_refused(
        &server,
        "0.2.0",
        &sha,
        &agent,
        &[&format!("{half} of {} bytes", v2.len())],
    )?;
    assert_untouched(&agent, "0.1.0", &pids, "0.2.0")?;
    let part = agent
        .opts
        .state_dir
        .join(format!("apps/{APP}/downloads/{sha}.part"));
    assert_eq!(
        std::fs::metadata(&part)?.len(),
        half as u64,
        "the partial download is kept"
    );
    offer(&server, "0.2.0", &m2.to_string(), None, v2.clone(), None)?;
    wait_installed(&server, &agent, "0.2.0")?;
    let path = format!("/blobs/{sha}-{}", v2.len());
    assert!(
        server
            .blob_requests()
            .iter()
            .any(|(p, start)| *p == path && *start == half),
        "resumed at byte {half}: {:?}",
        server.blob_requests()
    );
    Ok(())
}

#[test]
fn untrusted_tampered_expired_and_replayed_manifests_are_refused() -> Result<()> {
    let b = common::builds();
    let key = signing_key(7);
    let stranger = signing_key(9);
    let server = ScriptedServer::start();
    let trusted = vec![
        "--trusted-key".to_owned(),
        muscle_protocol::public_key_hex(&key),
    ];
    let agent = start_agent(&server, "signatures", trusted)?;
    let (m1, v1) = release_parts(&b.v1)?;
    let (m2, v2) = release_parts(&b.v2)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();

    // Unsigned: refused outright while keys are pinned.
    let sha = offer(&server, "0.2.0", &m2.to_string(), None, v2.clone(), None)?;
    wait_refused(&server, "0.2.0", &sha, &agent, &["not signed"])?;

    // The good path: signed by the trusted key.
    let (text, sig) = signed(&m2, 200, Some(now + 3600), &key);
    offer(&server, "0.2.0", &text, Some(sig), v2.clone(), None)?;
    wait_installed(&server, &agent, "0.2.0")?;
    let pids = agent.service_pids();

    // Signed by a key nobody trusts.
    let (text, sig) = signed(&m1, 300, None, &stranger);
    let sha = offer(&server, "0.1.0", &text, Some(sig), v1.clone(), None)?;
    wait_refused(&server, "0.1.0", &sha, &agent, &["does not verify"])?;
    assert_untouched(&agent, "0.2.0", &pids, "0.1.0")?;

    // Signed, then tampered with (the sha256 of the x86_64 binary swapped for other bytes).
    let (text, sig) = signed(&m1, 300, None, &key);
    let mut tampered: Value = serde_json::from_str(&text)?;
    let mut other = v1.clone();
    other[500] ^= 1;
    retarget(&mut tampered, &other);
    let sha = offer(
        &server,
        "0.1.0",
        &serde_json::to_string_pretty(&tampered)?,
        Some(sig),
        other,
        None,
    )?;
    wait_refused(&server, "0.1.0", &sha, &agent, &["does not verify"])?;
    assert_untouched(&agent, "0.2.0", &pids, "0.1.0")?;

    // Properly signed but expired (freeze attack).
    let (text, sig) = signed(&m1, 300, Some(now - 60), &key);
    let sha = offer(&server, "0.1.0", &text, Some(sig), v1.clone(), None)?;
    wait_refused(&server, "0.1.0", &sha, &agent, &["expired"])?;
    assert_untouched(&agent, "0.2.0", &pids, "0.1.0")?;

    // Properly signed, unexpired, but older than what the agent accepted: a replay.
    let (text, sig) = signed(&m1, 100, None, &key);
    let sha = offer(&server, "0.1.0", &text, Some(sig), v1, None)?;
    wait_refused(
        &server,
        "0.1.0",
        &sha,
        &agent,
        &["release counter 100 is lower than 200"],
    )?;
    assert_untouched(&agent, "0.2.0", &pids, "0.1.0")?;
    Ok(())
}

#[test]
fn an_expiry_refusal_by_a_wrong_clock_is_retried_and_clears_once_the_clock_is_right() -> Result<()>
{
    let b = common::builds();
    let server = ScriptedServer::start();
    let dir = common::scratch("wrong-clock");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    // The device's clock runs two hours ahead (through the agent's test clock hook).
    let clock = dir.join("clock");
    std::fs::write(&clock, (now + 7200).to_string())?;
    let opts = AgentOptions {
        env: vec![("MUSCLE_TEST_CLOCK_FILE".into(), clock.display().to_string())],
        ..AgentOptions::new(
            "wrong-clock",
            b.agent("x86_64"),
            "x86_64",
            dir.join("agent"),
        )
    };
    let agent = Agent::start(opts, &server.url())?;
    let (m1, v1) = release_parts(&b.v1)?;
    let (text, _) = signed(&m1, 100, Some(now + 3600), &signing_key(7));
    let sha = offer(&server, "0.1.0", &text, None, v1, None)?;
    let reason = wait_refused(
        &server,
        "0.1.0",
        &sha,
        &agent,
        &["expired", "check", "clock"],
    )?;
    assert!(reason.contains("this device's clock"), "{reason}");
    // Not a final refusal: the deployer is not told the version failed, and the agent's report
    // carries its clock, two hours ahead.
    let report = server.reports().last().cloned().context("no report")?;
    let skew = report["clock_unix"].as_u64().unwrap_or(0) as i64 - now as i64;
    assert!((7100..7400).contains(&skew), "reported clock: {report}");
    // The clock is fixed: the same offer installs at a following check-in.
    std::fs::write(&clock, now.to_string())?;
    wait_installed(&server, &agent, "0.1.0")?;
    Ok(())
}

#[test]
fn failing_downloads_back_off_and_a_repaired_blob_is_fetched_again() -> Result<()> {
    let b = common::builds();
    let server = ScriptedServer::start();
    let agent = start_agent(&server, "backoff", vec![])?;
    let (m1, v1) = release_parts(&b.v1)?;

    // A download the server always cuts off: retried, but with doubling delays (1, 2, 4, 8 s),
    // not once per check-in.
    let sha = offer(
        &server,
        "0.1.0",
        &m1.to_string(),
        None,
        v1.clone(),
        Some(1000),
    )?;
    std::thread::sleep(Duration::from_secs(20));
    let path = format!("/blobs/{sha}-{}", v1.len());
    let attempts = server
        .blob_requests()
        .iter()
        .filter(|(p, _)| *p == path)
        .count();
    assert!(
        (2..=7).contains(&attempts),
        "{attempts} download attempts in 20 s (backoff allows about 5)"
    );

    // Bytes that do not match the signed hash, then the store is repaired: fetched again (a
    // new offer, so its backoff starts afresh).
    let (m2, v2) = release_parts(&b.v2)?;
    let mut corrupt = v2.clone();
    corrupt[1000] ^= 0xff;
    let sha = offer(&server, "0.2.0", &m2.to_string(), None, corrupt, None)?;
    wait_refused(&server, "0.2.0", &sha, &agent, &["sha256 mismatch"])?;
    offer(&server, "0.2.0", &m2.to_string(), None, v2, None)?;
    wait_installed(&server, &agent, "0.2.0")?;
    Ok(())
}

/// An answer entry with a spec field this agent does not know (what a newer deployer's feature
/// looks like to it) is refused for that app and version alone, with the reason reported; the
/// rest of the same answer is installed. One unknown field used to refuse the whole answer.
#[test]
fn an_entry_this_agent_cannot_read_is_refused_alone_and_the_rest_is_installed() -> Result<()> {
    let b = common::builds();
    let server = ScriptedServer::start();
    let agent = start_agent(&server, "unreadable", vec![])?;
    let (m1, v1) = release_parts(&b.v1)?;
    let entry = x86_64_entry(&m1)?;
    let path = "/blobs/v1";
    server.put_blob(
        path,
        Blob {
            bytes: v1,
            truncate_at: None,
            trickle: false,
        },
    );
    // A field no agent knows yet stands for the next one a deployer learns.
    let mut newer = spec();
    newer["from_a_newer_deployer"] = json!({"memory": "64M"});
    let text = m1.to_string();
    server.set_desired(json!([
        desired_entry("from-the-future", "2.0.0", &text, None, path, &entry, newer),
        desired_entry(APP, "0.1.0", &text, None, path, &entry, spec()),
    ]));
    wait_installed(&server, &agent, "0.1.0")?;
    let report = wait_until(
        "the unreadable entry refused and reported",
        Duration::from_secs(30),
        || {
            let r = server.last_app_report("from-the-future");
            Ok(r.filter(|r| r["failed_version"] == "2.0.0"))
        },
    )?;
    let reason = report["last_error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("unknown field `from_a_newer_deployer`")
            && reason.contains("update the agent"),
        "{report}"
    );
    assert!(
        server.reports().iter().all(|r| r["problem"].is_null()),
        "the answer itself was taken"
    );
    Ok(())
}
