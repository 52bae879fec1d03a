//! The chain of trust end to end: enrolment and per-agent credentials, the admin token, keys made
//! by `muscle-deploy keygen`, releases signed by `cargo xtask release --sign`, publish refusing
//! unsigned or strangers' releases, and agents pinning the key.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use muscle_e2e::{Deployer, Fleet};
use serde_json::json;

const ENROLL: &str = "enrol-3f9c2a";
const ADMIN: &str = "admin-77b1e0";

/// POSTs `body` with an optional bearer; returns (status, body).
fn post(url: &str, bearer: Option<&str>, body: &serde_json::Value) -> (u16, String) {
    let mut req = ureq::post(url).set("content-type", "application/json");
    if let Some(b) = bearer {
        req = req.set("Authorization", &format!("Bearer {b}"));
    }
    match req.send_string(&body.to_string()) {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("transport error: {e}"),
    }
}

fn get(url: &str, bearer: Option<&str>) -> u16 {
    let mut req = ureq::get(url);
    if let Some(b) = bearer {
        req = req.set("Authorization", &format!("Bearer {b}"));
    }
    match req.call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("transport error: {e}"),
    }
}

#[test]
fn agents_enrol_once_and_checkins_without_their_credential_get_401_and_change_nothing() -> Result<()>
{
    let b = common::builds();
    let dir = common::scratch("enrolment");
    let deployer = Deployer::start_with(
        &b.deployer,
        &dir.join("data"),
        &["--enroll-token", ENROLL, "--admin-token", ADMIN],
    )?;
    deployer.publish(&b.v1.dir)?;
    let fleet = Fleet::start_with(
        deployer,
        &b.both_arches(),
        1,
        &dir,
        &["--enroll-token", ENROLL],
    )?;
    common::roll_out(&fleet, "0.1.0")?;

    let x86 = fleet.agent("x86_64-1");
    let credential_file = x86.opts.state_dir.join("credential");
    assert_eq!(
        std::fs::metadata(&credential_file)?.permissions().mode() & 0o777,
        0o600
    );
    let x86_credential = std::fs::read_to_string(&credential_file)?;
    let before = fleet.deployer.fleet()?;

    let base = fleet.deployer.url();
    let forged = |id: &str| json!({"agent_id": id, "arch": "x86_64", "hostname": "evil", "agent_version": "6.6.6", "apps": []});
    let (status, body) = post(&format!("{base}/v1/checkin"), None, &forged("x86_64-1"));
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("enrol first"), "{body}");
    let (status, body) = post(
        &format!("{base}/v1/checkin"),
        Some("0000"),
        &forged("x86_64-1"),
    );
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("invalid credential for agent x86_64-1"),
        "{body}"
    );
    // One agent's credential does not speak for another.
    let (status, _) = post(
        &format!("{base}/v1/checkin"),
        Some(x86_credential.trim()),
        &forged("aarch64-1"),
    );
    assert_eq!(status, 401);
    // Enrolment needs the token, and happens once per agent.
    let (status, _) = post(
        &format!("{base}/v1/enroll"),
        Some("wrong"),
        &forged("newcomer"),
    );
    assert_eq!(status, 401);
    let (status, body) = post(
        &format!("{base}/v1/enroll"),
        Some(ENROLL),
        &forged("x86_64-1"),
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("already enrolled"), "{body}");

    // Nothing of the refused requests was recorded.
    std::thread::sleep(Duration::from_secs(1));
    let after = fleet.deployer.fleet()?;
    assert_eq!(after.len(), before.len(), "no agent was added");
    for row in &after {
        assert_ne!(row["hostname"], "evil");
        assert_ne!(row["agent_version"], "6.6.6");
        assert_eq!(row["apps"][0]["version"], "0.1.0");
    }
    // The JSON views need the admin token.
    assert_eq!(get(&format!("{base}/v1/fleet"), None), 401);
    assert_eq!(get(&format!("{base}/v1/fleet"), Some("not-it")), 401);
    assert_eq!(get(&format!("{base}/v1/fleet"), Some(ADMIN)), 200);
    Ok(())
}

#[test]
fn signed_releases_flow_from_xtask_to_a_key_pinning_agent_and_unsigned_ones_are_refused(
) -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("signed");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;

    // keygen: a private key only its owner reads, the public key on stdout.
    let key = dir.join("release.key");
    let public = deployer
        .ok(&["keygen", "--out", key.to_str().unwrap()])?
        .trim()
        .to_owned();
    assert_eq!(public.len(), 64);
    assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
    let out = deployer.cli(&["keygen", "--out", key.to_str().unwrap()])?;
    assert!(!out.status.success(), "keygen never overwrites a key");

    // cargo xtask release --sign, on the scratch workspace of hello-service 0.2.0.
    let manifest_path =
        b.v2.dir
            .parent()
            .unwrap()
            .join("src/hello-service-0.2.0/Cargo.toml");
    let out_dir = dir.join("dist");
    let key_arg = key.to_str().unwrap();
    let manifest_arg = manifest_path.to_str().unwrap();
    let args = [
        "--target",
        "x86_64-unknown-linux-musl",
        "--sign",
        key_arg,
        "--manifest-path",
        manifest_arg,
    ];
    muscle_e2e::xtask_release(&args, &out_dir)?;
    let signed = out_dir.join("hello-service-0.2.0");
    assert!(signed.join("manifest.json.sig").exists());

    // Publish with the key trusted: unsigned and strangers' releases are refused.
    let trust = ["--trusted-key", public.as_str()];
    let publish = |release: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["publish", release.to_str().unwrap()];
        args.extend(extra);
        deployer.cli(&args)
    };
    let out = publish(&b.v1.dir, &trust)?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not signed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stranger = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    let out = publish(&signed, &["--trusted-key", stranger])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not verify"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = publish(&signed, &trust)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An agent pinning the key installs it, the signature checked on the device.
    let fleet = Fleet::start_with(
        deployer,
        &[(b.agent("x86_64"), "x86_64")],
        1,
        &dir,
        &["--trusted-key", &public],
    )?;
    common::roll_out(&fleet, "0.2.0")?;
    assert_eq!(fleet.agent("x86_64-1").service_version()?, "0.2.0");
    Ok(())
}

#[test]
fn agents_of_both_arches_check_in_over_tls_trusting_only_the_given_ca() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("tls");
    // A private CA, and a certificate for 127.0.0.1 signed by it: what `tls init` makes.
    let init = Command::new(&b.deployer)
        .args(["tls", "init", "--name", "127.0.0.1", "--out"])
        .arg(&dir)
        .output()?;
    ensure!(
        init.status.success(),
        "tls init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert!(
        String::from_utf8_lossy(&init.stdout).contains("--ca-file"),
        "it says how to use them"
    );
    let path = |name: &str| dir.join(name).display().to_string();

    let deployer = Deployer::start_with(
        &b.deployer,
        &dir.join("data"),
        &[
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server.key"),
        ],
    )?;
    assert!(deployer.url().starts_with("https://"));
    deployer.publish(&b.v1.dir)?;
    let fleet = Fleet::start_with(
        deployer,
        &b.both_arches(),
        1,
        &dir,
        &["--ca-file", &path("ca.pem")],
    )?;
    common::roll_out(&fleet, "0.1.0")?;
    for agent in &fleet.agents {
        assert_eq!(
            agent.service_version()?,
            "0.1.0",
            "{} installed over https",
            agent.opts.id
        );
    }

    // An agent that trusts another CA (as its host's trust, through SSL_CERT_FILE, so that the
    // test does not depend on this machine's bundle) refuses this server's certificate.
    let other = dir.join("other-ca");
    let init = Command::new(&b.deployer)
        .args(["tls", "init", "--name", "127.0.0.1", "--out"])
        .arg(&other)
        .output()?;
    ensure!(init.status.success(), "tls init: {}", common::text(&init));
    let mut opts = muscle_e2e::AgentOptions::new(
        "untrusting",
        b.agent("x86_64"),
        "x86_64",
        dir.join("untrusting"),
    );
    opts.env = vec![(
        "SSL_CERT_FILE".into(),
        other.join("ca.pem").display().to_string(),
    )];
    let stranger = muscle_e2e::Agent::start(opts, &fleet.deployer.url())?;
    let log = muscle_e2e::wait_until(
        "the certificate to be refused",
        Duration::from_secs(30),
        || {
            let log = stranger.log();
            Ok(log.contains("check-in failed").then_some(log))
        },
    )?;
    assert!(
        log.contains("UnknownIssuer") || log.contains("invalid peer certificate"),
        "{log}"
    );
    assert!(fleet
        .deployer
        .fleet()?
        .iter()
        .all(|r| r["id"] != "untrusting"));

    // Without --ca-file, the bundle SSL_CERT_FILE names is the host's trust, as for OpenSSL:
    // an aarch64 agent trusting the CA that way checks in; one pointed at no file says so.
    let mut opts = muscle_e2e::AgentOptions::new(
        "host-trust",
        b.agent("aarch64"),
        "aarch64",
        dir.join("host-trust"),
    );
    opts.env = vec![("SSL_CERT_FILE".into(), path("ca.pem"))];
    let _host_trust = muscle_e2e::Agent::start(opts, &fleet.deployer.url())?;
    let mut opts = muscle_e2e::AgentOptions::new(
        "no-bundle",
        b.agent("x86_64"),
        "x86_64",
        dir.join("no-bundle"),
    );
    opts.env = vec![("SSL_CERT_FILE".into(), path("missing.pem"))];
    let no_bundle = muscle_e2e::Agent::start(opts, &fleet.deployer.url())?;
    muscle_e2e::wait_until(
        "the agent trusting SSL_CERT_FILE to check in",
        Duration::from_secs(60),
        || {
            Ok(fleet
                .deployer
                .fleet()?
                .iter()
                .any(|r| r["id"] == "host-trust")
                .then_some(()))
        },
    )?;
    let log = muscle_e2e::wait_until(
        "the missing bundle to be named",
        Duration::from_secs(30),
        || {
            let log = no_bundle.log();
            Ok(log.contains("check-in failed").then_some(log))
        },
    )?;
    assert!(
        log.contains(&format!(
            "SSL_CERT_FILE {}: cannot read it",
            path("missing.pem")
        )),
        "{log}"
    );

    // Plain HTTP to the TLS port is told what to do, not sent a TLS alert.
    let plain = fleet.deployer.url().replace("https://", "http://");
    match ureq::get(&format!("{plain}/healthz")).call() {
        Err(ureq::Error::Status(400, answer)) => {
            let text = answer.into_string()?;
            assert!(text.contains("speaks TLS: use https://"), "{text}");
        }
        other => panic!("plain HTTP to the TLS port: {other:?}"),
    }
    Ok(())
}

/// Tokens made by `token create` open the JSON views by role, an operator token steers a
/// rollout through the API and a read-only one cannot, a revoked token is refused, and every
/// change (from the CLI or the API) is in the audit log with who made it.
#[test]
fn tokens_with_roles_guard_the_api_and_every_change_is_audited() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("tokens");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    let fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 1, &dir)?;
    let d = &fleet.deployer;
    let base = d.url();
    // Open while no token exists (a deployer on loopback, as before).
    assert_eq!(get(&format!("{base}/v1/fleet"), None), 200);
    let viewer = d
        .ok(&["token", "create", "viewer", "--role", "read-only"])?
        .trim()
        .to_owned();
    let ops = d
        .ok(&["token", "create", "ops", "--role", "operator"])?
        .trim()
        .to_owned();
    ensure!(viewer.len() == 64 && ops.len() == 64);
    let again = d.cli(&["token", "create", "ops", "--role", "operator"])?;
    ensure!(!again.status.success(), "a name is taken once");
    assert_eq!(get(&format!("{base}/v1/fleet"), None), 401);
    assert_eq!(get(&format!("{base}/v1/fleet"), Some(&viewer)), 200);
    assert_eq!(get(&format!("{base}/v1/audit"), Some(&ops)), 200);

    let spec = common::service_spec();
    let id = fleet.start_rollout(&[
        "hello-service",
        "0.1.0",
        "--service",
        &spec,
        "--min-healthy-time",
        "60s",
    ])?;
    let steer = |what: &str, token: &str| {
        post(
            &format!("{base}/v1/rollouts/{id}/{what}"),
            Some(token),
            &json!({}),
        )
    };
    let (code, body) = steer("pause", &viewer);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("read-only"), "{body}");
    let (code, body) = steer("pause", &ops);
    assert_eq!(code, 202, "{body}");
    muscle_e2e::wait_until("the rollout to pause", Duration::from_secs(30), || {
        Ok((d.rollout(Some(id))?["status"] == "paused").then_some(()))
    })?;
    let (code, body) = steer("pause", &ops);
    assert_eq!(code, 409, "a paused rollout is not paused again: {body}");
    assert_eq!(steer("supersede", &ops).0, 404);
    assert_eq!(steer("abort", &ops).0, 202);

    d.ok(&["token", "revoke", "viewer"])?;
    assert_eq!(get(&format!("{base}/v1/fleet"), Some(&viewer)), 401);

    let audit: serde_json::Value = serde_json::from_str(&d.ok(&["audit", "--json"])?)?;
    let lines: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["who"].as_str().unwrap_or("?"),
                e["action"].as_str().unwrap_or("?"),
                e["request"].as_str().unwrap_or("")
            )
        })
        .collect();
    let local = lines[0].split(' ').next().unwrap_or("").to_owned();
    assert!(local.starts_with("local:"), "{lines:#?}");
    let expected = [
        format!("{local} publish "),
        format!("{local} token_create "),
        format!("{local} token_create "),
        format!("{local} rollout_start "),
        "token:ops rollout_request pause".to_owned(),
        "token:ops rollout_request abort".to_owned(),
        format!("{local} token_revoke "),
    ];
    assert_eq!(lines, expected);
    let table = d.ok(&["audit"])?;
    assert!(
        table.contains("asked rollout") && table.contains("revoked token viewer"),
        "{table}"
    );
    Ok(())
}
