//! Wire and file formats shared by `cargo xtask release`, `muscle-deploy` and `muscle-agent`.
//!
//! All formats are JSON (the service spec may also be written as TOML). Durations are written as
//! strings with a unit (`"500ms"`, `"10s"`, `"2m"`) and also accepted as integer milliseconds.
//!
//! # Release manifest (`dist/<app>-<version>/manifest.json`, [`ReleaseManifest`])
//!
//! | field | meaning |
//! | --- | --- |
//! | `schema` | format version, currently `1` |
//! | `app`, `version` | what is released |
//! | `counter` | release counter, strictly increasing between releases of an app (default: `SOURCE_DATE_EPOCH`); agents refuse a counter lower than one they accepted |
//! | `expires` | optional Unix time after which agents refuse the manifest |
//! | `git_commit`, `rustc`, `cargo_lock_sha256`, `source_date_epoch` | provenance of the build |
//! | `artifacts[]` | per binary: `target` triple, `arch` (`uname -m`), `binary` name, `path` relative to the release directory, `size`, `sha256`, `elf` (the [`ElfFacts`](muscle_inspect::ElfFacts) found) |
//! | `service` | optional [`ServiceSpec`]: how agents run the app; signed with the rest, and the only spec an agent that pins keys runs |
//! | `debug[]` | optional, per binary built with debug info: `target`, `arch`, `binary`, `path` (`<triple>/<binary>.debug`), `size`, `sha256`, `build_id` (the binary's); stored by the deployer, never offered to agents |
//!
//! Every name (`app`, `version`, `binary`, path components) is a [`Name`]: 1-64 characters of
//! `A-Za-z0-9._-+`, not starting with `.` or `-`.
//!
//! `manifest.json.sig` holds the hex ed25519 signature of the exact bytes of `manifest.json`.
//!
//! # Check-in (`POST /v1/checkin`, [`CheckinRequest`] -> [`CheckinResponse`])
//!
//! The agent sends its id, arch, hostname, labels, agent version, the `generation` of the last
//! answer it applied, and per app an [`AppReport`]: installed and running version, health, how
//! long it has been healthy, the last error, the version it refused or rolled back from, and the
//! tail of the service's log, and `problem`: why it refused the previous answer, if it did. The
//! deployer answers with its current `generation`; when that equals
//! the agent's, `unchanged` is true and `apps` is empty (cheap). Otherwise `apps` lists each
//! [`DesiredApp`]: app, version, the artifact (URL, sha256, size, binary), the raw release manifest
//! and its signature, and the [`ServiceSpec`]; and `removed`: the apps taken off the agent
//! (a rollback of a first install, `muscle-deploy undeploy`), which it stops and uninstalls.
//! Apps in neither list are left alone: a deployer that lost its database stops nothing.
//!
//! # Service spec ([`ServiceSpec`])
//!
//! `binary` (default: the app name), `args`, `env`, `working_dir`, `health` (`{kind="http", url,
//! expect_status}`, `{kind="tcp", addr}`, `{kind="command", argv}` or `{kind="none"}`),
//! `min_healthy_time`, `healthy_deadline`, `restart` (`initial_backoff`, `max_backoff`,
//! `crash_loop_restarts` within `crash_loop_window`), `stop_signal` (`SIGTERM`, `SIGINT`, ...),
//! `stop_grace`, `limits` (`memory = "64M"`, `cpu = 0.5`, `pids = 64`), `user` (an unprivileged
//! user, created if missing) and `sandbox` (`address_families`, `system_calls`, `writable_paths`,
//! `write_execute`: what the sandbox lets through). Any string may use `${name}`, replaced by the agent's `--var name=value`.

mod causes;
mod checkin;
pub mod duration;
mod hash;
pub mod image;
mod job;
mod limits;
mod manifest;
mod name;
mod sandbox;
mod service;
mod signing;

pub use causes::causes;
pub use checkin::{
    AppReport, Artifact, CheckinRequest, CheckinResponse, DesiredApp, DesiredEntry, Health,
    ProbeNonce, Unreadable,
};
pub use hash::{sha256_hex, Sha256};
pub use job::{
    JobId, JobOffer, JobOffers, JobOrder, JobOutcome, JobPoll, JobReport, LogAck, LogBatch,
    LogRequest, JOB_SIGNING_CONTEXT, MAX_JOB_ARGV_BYTES, MAX_JOB_OUTPUT, MAX_JOB_REASON_CHARS,
    MAX_JOB_TIMEOUT, MAX_LOG_BATCH, MAX_LOG_TAIL,
};
pub use limits::{Cpu, Limits, Memory};
pub use manifest::{
    DebugArtifact, ManifestArtifact, ManifestError, ReleaseManifest, MANIFEST_SCHEMA,
};
pub use name::{Name, NameError, MAX_NAME_LEN};
pub use sandbox::{AbsolutePath, AddressFamily, Sandbox, SyscallName, UserName};
#[cfg(feature = "toml")]
pub use service::SpecFileError;
pub use service::{HealthCheck, RestartPolicy, ServiceSpec, SpecError};
pub use signing::{
    parse_public_key, parse_signing_key, public_key_hex, sign, verify_signature, PublicKey,
    SignatureError, SigningKey,
};

/// The app under which agents' own releases are rolled out (a self-update).
pub const SELF_APP: &str = "muscle-agent";

/// Environment variables an agent is started with that what it starts (services, jobs) must not
/// see: the fleet's enrolment token is a secret, the boot image the machine's business.
pub const AGENT_ONLY_ENV: [&str; 2] = ["MUSCLE_ENROLL_TOKEN", "MUSCLE_BOOT_IMAGE"];

/// The app under which boot images are rolled out: a machine booted from the network reports
/// the image it runs as this app, and is rebooted into the version a rollout assigns it.
pub const IMAGE_APP: &str = "muscle-image";

/// Parses a label, selector or variable written `key=value` (the value may be empty).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

/// Parses a server URL given on a command line: `http://` or `https://` and a host, so that a
/// forgotten scheme is refused at start rather than failing at every check-in.
pub fn parse_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| {
            format!("{s:?}: expected a URL with its scheme, like http://{s} or https://{s}")
        })?;
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        return Err(format!("{s:?}: expected a host after the scheme"));
    }
    // The agent's URL parser knows no Unicode tables (they cost it 120 KiB): IDNA's ASCII form.
    let host = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    if !host.is_ascii() {
        return Err(format!(
            "{s:?}: the host name is not ASCII; write it in its IDNA form (xn--...)"
        ));
    }
    Ok(s.to_owned())
}

/// Parses a size: bytes, or a number with `K`, `M` or `G` (powers of 1024; `KiB`, `MiB`, `GiB`
/// too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a size like 1048576, 64K or 1M"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => return Err(format!("{s:?}: unknown unit {other:?}, expected K, M or G")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// Parses a label or selector written `key=value`, both parts valid [`Name`]s.
pub fn parse_label(s: &str) -> Result<(Name, Name), String> {
    let (k, v) = parse_key_value(s)?;
    let part =
        |what: &str, p: &str| Name::parse(p).map_err(|e| format!("{s:?}: label {what}: {e}"));
    Ok((part("key", &k)?, part("value", &v)?))
}

/// The largest check-in body the deployer accepts (and the agent sends).
pub const MAX_CHECKIN_BYTES: usize = 256 * 1024;

/// The largest check-in answer the agent reads: a desired state with its manifests is a few KiB
/// per app; anything past this is refused rather than buffered.
pub const MAX_ANSWER_BYTES: u64 = 4 * 1024 * 1024;

#[cfg(test)]
mod cli_value_tests {
    use super::*;

    #[test]
    fn urls_need_their_scheme_and_sizes_take_units() {
        assert!(parse_url("http://127.0.0.1:7700").is_ok());
        assert!(parse_url("https://deployer.lan").is_ok());
        let err = parse_url("127.0.0.1:7700").unwrap_err();
        assert!(err.contains("like http://127.0.0.1:7700"), "{err}");
        assert!(parse_url("http://").is_err());
        let err = parse_url("http://bücher.example:7700").unwrap_err();
        assert!(err.contains("IDNA form"), "{err}");
        assert!(parse_url("http://xn--bcher-kva.example:7700/ü").is_ok());
        assert!(parse_url("http://deployer.lan?q=ü#ü").is_ok());
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("20000"), Ok(20_000));
        assert!(parse_size("1T").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999999G")
            .unwrap_err()
            .contains("too large"));
    }
}
