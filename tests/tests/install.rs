//! Existing hosts join with one line (#15): `curl -fsSL DEPLOYER/install.sh | sh -s -- --enroll-token
//! T` downloads the agent for the host's architecture from the deployer's store, checks its
//! sha256, installs it, starts it (here with the built-in supervisor: no systemd on this host)
//! and waits for it to enrol. Run with the host's real `curl` and `sh`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result};
use muscle_e2e::{host_deployer, release_agents, target_dir, Artifacts, Deployer};

const TOKEN: &str = "install-enrolment-token";

/// The deployer for this host and the released agents, built once for both tests.
fn builds() -> &'static (std::path::PathBuf, Artifacts) {
    static BUILT: std::sync::OnceLock<(std::path::PathBuf, Artifacts)> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let deployer = host_deployer(false).expect("muscle-deploy builds");
        let agents = release_agents(&target_dir().join("e2e-dist")).expect("the agents release");
        (deployer, agents)
    })
}

/// `curl -fsSL URL/install.sh | sh -s -- ARGS`, with `path_first` ahead on PATH.
fn one_line(deployer: &Deployer, args: &[&str], path_first: Option<&Path>) -> Result<Output> {
    // Each argument single-quoted: the words the script must refuse reach it as they are.
    let quoted: Vec<String> = args
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let line = format!(
        "curl -fsSL {}/install.sh | sh -s -- {}",
        deployer.url(),
        quoted.join(" ")
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &line]).env_remove("MUSCLE_ENROLL_TOKEN");
    if let Some(first) = path_first {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", first.display()));
    }
    Ok(cmd.output()?)
}

/// Stops the agent the script started in the background, whatever the test's outcome.
struct Started(std::path::PathBuf);

impl Drop for Started {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

#[test]
fn one_line_installs_the_checked_agent_and_enrols() -> Result<()> {
    let (deployer_bin, agents) = builds();
    let dir = common::scratch("install");
    let deployer =
        Deployer::start_with(deployer_bin, &dir.join("data"), &["--enroll-token", TOKEN])?;
    let host = dir.join("host");
    let (prefix, state, config) = (host.join("usr"), host.join("state"), host.join("etc"));
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--enroll-token",
            TOKEN,
            "--supervisor",
            "builtin",
            "--prefix",
            prefix.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--config-dir",
            config.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |extra: &[&str], path_first: Option<&Path>| -> Result<Output> {
        let a = args(extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        one_line(&deployer, &a, path_first)
    };

    // No agent release yet: the script says what to publish, and installs nothing.
    let out = run(&[], None)?;
    let said = common::text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("no muscle-agent release"), "{said}");
    assert!(!prefix.join("bin/muscle-agent").exists());

    deployer.publish(&agents.dir)?;
    let _agent = Started(state.join("agent.pid"));
    let out = run(&["--label", "site=installed"], None)?;
    let said = common::text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("enrolled as"), "{said}");
    let installed = std::fs::read(prefix.join("bin/muscle-agent"))?;
    let released = std::fs::read(
        agents.binary(
            muscle_e2e::ALL_TARGETS
                .iter()
                .find(|t| t.1 == std::env::consts::ARCH)
                .context("a target for this host")?
                .0,
            "muscle-agent",
        ),
    )?;
    assert!(
        installed == released,
        "the installed agent is the released one"
    );
    let mode = std::fs::metadata(config.join("env"))?.permissions().mode();
    assert_eq!(mode & 0o077, 0, "the token is the owner's alone: {mode:o}");
    let id = std::fs::read_to_string(state.join("agent-id"))?;
    let row = deployer.fleet_row(id.trim())?;
    assert_eq!(row["labels"]["site"], "installed", "{row:#}");

    // Run again (a second try, a new label): the agent it started before is stopped, not
    // doubled, and the same member comes back with the new label.
    let first = std::fs::read_to_string(state.join("agent.pid"))?;
    let out = run(&["--label", "site=again"], None)?;
    let said = common::text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("stopped the agent this script started before"),
        "{said}"
    );
    assert_ne!(std::fs::read_to_string(state.join("agent.pid"))?, first);
    assert!(
        !Path::new(&format!("/proc/{}", first.trim())).exists(),
        "the first agent has exited"
    );
    muscle_e2e::wait_until("the new label", std::time::Duration::from_secs(30), || {
        Ok((deployer.fleet_row(id.trim())?["labels"]["site"] == "again").then_some(()))
    })?;

    // A host of an architecture the release has no agent for is told so.
    let fake = dir.join("fake-bin");
    std::fs::create_dir_all(&fake)?;
    std::fs::write(fake.join("uname"), "#!/bin/sh\necho mips\n")?;
    std::fs::set_permissions(fake.join("uname"), std::fs::Permissions::from_mode(0o755))?;
    let out = run(&[], Some(&fake))?;
    let said = common::text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("unknown architecture mips") && said.contains("x86_64"),
        "{said}"
    );

    // --help says how, and an unknown option is refused with it.
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("curl -fsSL {}/install.sh | sh -s -- --help", deployer.url()),
        ])
        .output()?;
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(
        common::text(&out).contains("${KEY}"),
        "{}",
        common::text(&out)
    );
    let out = run(&["--colour", "blue"], None)?;
    assert!(!out.status.success());
    assert!(
        common::text(&out).contains("unknown option --colour"),
        "{}",
        common::text(&out)
    );

    // Words that would reach the agent's command line or the unit are checked.
    let out = run(&["--label", "a=b;x"], None)?;
    assert!(!out.status.success());
    assert!(
        common::text(&out).contains("expected letters"),
        "{}",
        common::text(&out)
    );

    // A download that is not what the release says is not installed.
    let blob = find_blob(&dir.join("data"), &muscle_protocol::sha256_hex(&released))?;
    let mut damaged = std::fs::read(&blob)?;
    damaged[1000] ^= 0xff;
    std::fs::write(&blob, damaged)?;
    let elsewhere = host.join("other");
    let other = elsewhere.to_str().unwrap();
    let out = run(&["--prefix", other], None)?;
    let said = common::text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("503"),
        "the deployer does not serve a damaged blob: {said}"
    );
    assert!(!elsewhere.join("bin/muscle-agent").exists());

    // A peer that serves other bytes under the agent's URL: the script's own check refuses them.
    let script = ureq::get(&format!("{}/install.sh", deployer.url()))
        .call()?
        .into_string()?;
    let forger = forging_server()?;
    let forged = script.replace(
        &format!("server='{}'", deployer.url()),
        &format!("server='http://127.0.0.1:{forger}'"),
    );
    assert_ne!(forged, script);
    let a = args(&["--prefix", other]);
    let mut child = Command::new("sh")
        .arg("-s")
        .arg("--")
        .args(&a)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), forged.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = common::text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("sha256 is") && said.contains("not installed"),
        "{said}"
    );
    assert!(!elsewhere.join("bin/muscle-agent").exists());
    Ok(())
}

/// With `--trusted-key`, the agent's release must be signed by that key: checked by the script
/// with openssl (the release signed here with openssl too, as any ed25519 signer would).
#[test]
fn a_pinned_key_must_have_signed_the_agent_release() -> Result<()> {
    let (deployer_bin, agents) = builds();
    let dir = common::scratch("install-signed");
    let key = dir.join("release.pem");
    let openssl = |args: &[&str]| -> Result<Vec<u8>> {
        let out = Command::new("openssl").args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            common::text(&out)
        );
        Ok(out.stdout)
    };
    let key_arg = key.to_str().unwrap();
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", key_arg])?;
    let public = hex(&openssl(&["pkey", "-in", key_arg, "-pubout", "-outform", "DER"])?[12..]);
    let stranger = "7".repeat(64);

    // The released agent, signed, on a deployer of its own.
    let signed = dir.join("signed");
    copy_dir(&agents.dir, &signed)?;
    let manifest = signed.join("manifest.json");
    let signature = openssl(&[
        "pkeyutl",
        "-sign",
        "-inkey",
        key_arg,
        "-rawin",
        "-in",
        manifest.to_str().unwrap(),
    ])?;
    std::fs::write(signed.join("manifest.json.sig"), hex(&signature))?;
    let deployer =
        Deployer::start_with(deployer_bin, &dir.join("data"), &["--enroll-token", TOKEN])?;
    deployer.publish(&signed)?;

    let host = dir.join("host");
    let install = |key: &str, prefix: &str| -> Result<Output> {
        let state = host.join(format!("state-{prefix}"));
        let args = [
            "--enroll-token",
            TOKEN,
            "--supervisor",
            "builtin",
            "--trusted-key",
            key,
            "--prefix",
            &host.join(prefix).to_string_lossy(),
            "--state-dir",
            &state.to_string_lossy(),
            "--config-dir",
            &host.join("etc").to_string_lossy(),
        ]
        .map(String::from);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        one_line(&deployer, &args, None)
    };
    let out = install(&stranger, "stranger")?;
    let said = common::text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("by none of the --trusted-key keys"), "{said}");
    assert!(!host.join("stranger/bin/muscle-agent").exists());

    let _agent = Started(host.join("state-pinned/agent.pid"));
    let out = install(&public, "pinned")?;
    let said = common::text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains(&format!("signed by {public}")), "{said}");
    assert!(said.contains("enrolled as"), "{said}");
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)?.flatten() {
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// An HTTP server on loopback that answers every request with 4096 zero bytes; its port.
fn forging_server() -> Result<u16> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let body = vec![0u8; 4096];
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    Ok(port)
}

/// The file of blob `sha256` in the deployer's data dir.
fn find_blob(data: &Path, sha256: &str) -> Result<std::path::PathBuf> {
    let mut dirs = vec![data.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().is_some_and(|n| n.to_string_lossy() == sha256) {
                return Ok(p);
            }
        }
    }
    anyhow::bail!("no blob {sha256} under {}", data.display())
}
