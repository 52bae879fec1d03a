//! Bad input at the deployer's boundaries: corrupt or tampered releases at publish, malformed and
//! oversized check-ins over HTTP. Each is refused with a message naming what was wrong, and
//! nothing already stored or running is disturbed.

mod common;

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use muscle_e2e::{Artifacts, Deployer, Fleet};
use serde_json::Value;

/// A copy of a release directory that a test may damage.
fn copy_release(release: &Artifacts, to: &Path) -> Result<std::path::PathBuf> {
    let dest = to.join(release.dir.file_name().unwrap());
    let _ = std::fs::remove_dir_all(&dest);
    for (triple, _) in muscle_e2e::ALL_TARGETS {
        std::fs::create_dir_all(dest.join(triple))?;
        for entry in std::fs::read_dir(release.dir.join(triple))? {
            let entry = entry?;
            std::fs::copy(entry.path(), dest.join(triple).join(entry.file_name()))?;
        }
    }
    for file in ["manifest.json", "SHA256SUMS"] {
        std::fs::copy(release.dir.join(file), dest.join(file))?;
    }
    Ok(dest)
}

fn refused(deployer: &Deployer, dir: &Path, expect: &[&str]) -> Result<()> {
    let out = deployer.cli(&["publish", dir.to_str().unwrap()])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "publish of {} should fail",
        dir.display()
    );
    for e in expect {
        assert!(stderr.contains(e), "expected {e:?} in: {stderr}");
    }
    Ok(())
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Value)) -> Result<()> {
    let path = dir.join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    edit(&mut m);
    std::fs::write(path, serde_json::to_string_pretty(&m)?)?;
    Ok(())
}

#[test]
fn publish_refuses_corrupt_tampered_and_conflicting_releases_and_keeps_the_store_intact(
) -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("bad-publish");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    let releases_before = deployer.ok(&["releases", "--json"])?;

    // A manifest cut in the middle.
    let d = copy_release(&b.v2, &dir.join("truncated"))?;
    let text = std::fs::read_to_string(d.join("manifest.json"))?;
    std::fs::write(d.join("manifest.json"), &text[..text.len() / 2])?;
    refused(
        &deployer,
        &d,
        &["manifest.json", "not a valid release manifest"],
    )?;

    // An artifact whose bytes changed after the release.
    let d = copy_release(&b.v2, &dir.join("hash"))?;
    let bin = d.join("x86_64-unknown-linux-musl/hello-service");
    let mut bytes = std::fs::read(&bin)?;
    bytes[4096] ^= 0xff;
    std::fs::write(&bin, bytes)?;
    refused(
        &deployer,
        &d,
        &[
            "x86_64-unknown-linux-musl/hello-service",
            "sha256 is",
            "manifest.json says",
        ],
    )?;

    // The aarch64 binary in the x86_64 slot, with the manifest's hashes made to match.
    let d = copy_release(&b.v2, &dir.join("arch"))?;
    let arm = d.join("aarch64-unknown-linux-musl/hello-service");
    std::fs::copy(&arm, d.join("x86_64-unknown-linux-musl/hello-service"))?;
    let arm_entry: Value = {
        let m: Value = serde_json::from_slice(&std::fs::read(d.join("manifest.json"))?)?;
        m["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["arch"] == "aarch64")
            .unwrap()
            .clone()
    };
    edit_manifest(&d, |m| {
        let x86 = m["artifacts"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|a| a["arch"] == "x86_64")
            .unwrap();
        for field in ["sha256", "size", "elf"] {
            x86[field] = arm_entry[field].clone();
        }
    })?;
    refused(
        &deployer,
        &d,
        &[
            "x86_64-unknown-linux-musl/hello-service",
            "elf-machine",
            "EM_AARCH64",
        ],
    )?;

    // A path that escapes the release directory.
    let d = copy_release(&b.v2, &dir.join("escape"))?;
    edit_manifest(&d, |m| {
        m["artifacts"][0]["path"] = "../../etc/passwd".into()
    })?;
    refused(&deployer, &d, &["../../etc/passwd", "must be relative"])?;

    // Names without bounds: a 300-character version.
    let d = copy_release(&b.v2, &dir.join("long"))?;
    edit_manifest(&d, |m| m["version"] = "9".repeat(300).into())?;
    refused(&deployer, &d, &["300 characters long, more than 64"])?;

    // Symlinks are never followed: the target folder, or manifest.json, elsewhere.
    let d = copy_release(&b.v2, &dir.join("linked-folder"))?;
    let real = dir.join("elsewhere-folder");
    std::fs::rename(d.join("x86_64-unknown-linux-musl"), &real)?;
    std::os::unix::fs::symlink(&real, d.join("x86_64-unknown-linux-musl"))?;
    refused(&deployer, &d, &["x86_64-unknown-linux-musl: is a symlink"])?;
    let d = copy_release(&b.v2, &dir.join("linked-manifest"))?;
    let real = dir.join("elsewhere-manifest.json");
    std::fs::rename(d.join("manifest.json"), &real)?;
    std::os::unix::fs::symlink(&real, d.join("manifest.json"))?;
    refused(&deployer, &d, &["manifest.json: is a symlink"])?;

    // Different bytes under an already published version.
    let d = copy_release(&b.v2, &dir.join("conflict"))?;
    edit_manifest(&d, |m| m["version"] = "0.1.0".into())?;
    refused(
        &deployer,
        &d,
        &["hello-service 0.1.0 is already published with a different manifest"],
    )?;

    // Nothing was stored, and the same release again is a no-op.
    assert_eq!(deployer.ok(&["releases", "--json"])?, releases_before);
    assert!(deployer
        .publish(&b.v1.dir)?
        .contains("already published; nothing to do"));
    Ok(())
}

#[test]
fn malformed_and_oversized_checkins_get_clear_errors_and_do_not_disturb_the_fleet() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("bad-checkin");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    let fleet = Fleet::start(deployer, &[(b.agent("x86_64"), "x86_64")], 2, &dir)?;
    common::roll_out(&fleet, "0.1.0")?;
    let url = format!("{}/v1/checkin", fleet.deployer.url());
    let post = |body: &[u8]| match ureq::post(&url)
        .set("content-type", "application/json")
        .send_bytes(body)
    {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("transport error: {e}"),
    };

    let (status, body) = post(b"{\"agent_id\": \"x86_64-1\", \"arch\": ");
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("invalid check-in body") && body.contains("EOF"),
        "{body}"
    );

    let (status, body) = post(br#"{"agent_id": "x86_64-1", "arch": "x86_64"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("missing field"), "{body}");

    let (status, body) = post(
        br#"{"agent_id": "../../etc", "arch": "x86_64", "hostname": "h", "agent_version": "1"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("agent_id: ")
            && body.contains("../../etc")
            && body.contains("starts with '.'"),
        "{body}"
    );

    let (status, body) = post(
        br#"{"agent_id": "x86_64-1", "arch": "pdp11", "hostname": "h", "agent_version": "1"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("pdp11"), "{body}");

    let huge = format!(
        r#"{{"agent_id": "x86_64-1", "arch": "x86_64", "hostname": "{}", "agent_version": "1"}}"#,
        "h".repeat(300 * 1024)
    );
    let (status, _) = post(huge.as_bytes());
    assert_eq!(status, 413, "bodies beyond 256 KiB are refused");

    // The fleet is as it was: the real x86_64-1 still reports its healthy service.
    std::thread::sleep(Duration::from_secs(1));
    let rows = fleet.deployer.fleet()?;
    assert_eq!(rows.len(), 2, "no agent was added: {rows:?}");
    let row = rows.iter().find(|r| r["id"] == "x86_64-1").unwrap();
    assert_ne!(row["hostname"], "h", "no refused check-in was recorded");
    assert_eq!(row["apps"][0]["version"], "0.1.0");
    assert_eq!(row["apps"][0]["health"], "healthy");
    assert_eq!(fleet.agent("x86_64-1").service_version()?, "0.1.0");
    Ok(())
}

#[test]
fn command_lines_are_checked_at_start() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("cli-checks");

    // A mistyped --data-dir is not an empty fleet: refused, and nothing is created there.
    let missing = dir.join("no-such-store");
    let out = std::process::Command::new(&b.deployer)
        .arg("--data-dir")
        .arg(&missing)
        .arg("fleet")
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{}", common::text(&out));
    assert!(
        common::text(&out).contains("no store in"),
        "{}",
        common::text(&out)
    );
    assert!(!missing.exists(), "a read command created a store");

    // A server URL without its scheme is refused at start, not at every check-in.
    let agent = b.agent("x86_64");
    let out = std::process::Command::new(&agent)
        .args(["run", "--server", "127.0.0.1:7700", "--state-dir"])
        .arg(dir.join("agent"))
        .output()?;
    assert_eq!(out.status.code(), Some(2), "{}", common::text(&out));
    assert!(
        common::text(&out).contains("expected a URL with its scheme, like http://127.0.0.1:7700"),
        "{}",
        common::text(&out)
    );

    // Sizes take units: the agent starts with --log-max-bytes 1M.
    let mut child = std::process::Command::new(&agent)
        .args([
            "run",
            "--server",
            "http://127.0.0.1:9",
            "--log-max-bytes",
            "1M",
        ])
        .arg("--state-dir")
        .arg(dir.join("agent"))
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let still_running = child.try_wait()?.is_none();
    child.kill()?;
    child.wait()?;
    assert!(still_running, "the agent refused --log-max-bytes 1M");
    Ok(())
}

#[test]
fn read_commands_work_with_read_access_alone_and_say_each_cause_once() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("read-only");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    drop(deployer);
    // A copy nobody may write: the deployer's folder as an operator without its rights sees it.
    let store = std::env::temp_dir().join(format!("muscle-ro-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(dir.join("data"))
        .arg(&store)
        .status()?;
    anyhow::ensure!(copied.success());
    let chmod = std::process::Command::new("chmod")
        .args(["-R", "a-w,a+rX"])
        .arg(&store)
        .status()?;
    anyhow::ensure!(chmod.success());
    // Root ignores file modes: run as nobody then.
    let as_reader = |args: &[&str]| -> Result<std::process::Output> {
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&b.deployer);
            c
        } else {
            std::process::Command::new(&b.deployer)
        };
        Ok(cmd.arg("--data-dir").arg(&store).args(args).output()?)
    };
    for args in [
        &["fleet"][..],
        &["releases"],
        &["fsck"],
        &["rollout", "status"],
    ] {
        let out = as_reader(args)?;
        let text = common::text(&out);
        assert!(!text.contains("READONLY"), "{args:?}: {text}");
        if args[0] == "rollout" {
            // No rollout yet: said plainly, with the command that starts one.
            assert!(text.contains("there are no rollouts yet"), "{text}");
        } else {
            assert!(out.status.success(), "{args:?}: {text}");
        }
    }
    let out = as_reader(&["releases"])?;
    assert!(
        common::text(&out).contains("0.1.0"),
        "{}",
        common::text(&out)
    );
    // A write command says what is wrong, each cause once.
    let out = as_reader(&["publish", b.v2.dir.to_str().unwrap()])?;
    let text = common::text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let first_line = text.lines().next().unwrap_or_default().to_owned();
    let parts: Vec<&str> = first_line.split(": ").collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(part),
            "{part:?} said twice: {first_line}"
        );
    }
    let _ = std::process::Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(&store)
        .status();
    let _ = std::fs::remove_dir_all(&store);
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
    })
}
