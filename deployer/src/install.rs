//! `GET /install.sh`: existing hosts join with one line,
//! `curl -fsSL http://DEPLOYER/install.sh | sh -s -- --enroll-token T`. The script is written per
//! request with the newest published `muscle-agent` release's binaries (sha256 and blob URL per
//! architecture): it downloads the one for the host, checks its sha256, installs it, and starts
//! it under systemd (a hardened unit) where systemd runs, else in the background with the
//! agent's built-in supervisor; then waits for the enrolment. It holds no secret: the token is
//! the caller's.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use muscle_protocol::{ReleaseManifest, SELF_APP};

use crate::server::Server;
use crate::store::Store;

pub fn routes() -> Router<Server> {
    Router::new().route("/install.sh", get(install_script))
}

/// One architecture's agent binary in the release.
#[derive(Debug, PartialEq, Eq)]
struct AgentBinary {
    arch: String,
    sha256: String,
    size: u64,
}

/// What the script says of the agent release it installs.
struct AgentRelease {
    version: String,
    binaries: Vec<AgentBinary>,
    /// The manifest exactly as signed, base64: the script checks the signature over it.
    manifest_base64: String,
    /// Hex; `None` when the release is unsigned.
    signature: Option<String>,
}

/// The newest published agent release (by its counter).
fn newest_agent(store: &dyn Store) -> anyhow::Result<Option<AgentRelease>> {
    let newest = store
        .releases()?
        .into_iter()
        .filter(|r| r.app == SELF_APP)
        .max_by_key(|r| (r.counter, r.published_ms));
    let Some(record) = newest else {
        return Ok(None);
    };
    // Checked at publish: names and digests are validated types there.
    let manifest = ReleaseManifest::parse(record.manifest.as_bytes())?;
    let binaries = manifest
        .artifacts
        .iter()
        .filter(|a| a.binary == SELF_APP)
        .map(|a| AgentBinary {
            arch: a.arch.clone(),
            sha256: a.sha256.clone(),
            size: a.size,
        })
        .collect();
    use base64::Engine;
    Ok(Some(AgentRelease {
        version: manifest.version.to_string(),
        binaries,
        manifest_base64: base64::engine::general_purpose::STANDARD.encode(&record.manifest),
        // Checked at publish; anything else than hex digits is not written into a script.
        signature: record
            .signature
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())),
    }))
}

/// The deployer's URL as the script writes it: one URL of plain characters (no quote, `$`,
/// `%` or comma: it goes into a shell script and a systemd unit), without a trailing slash.
fn script_url(url: &str) -> Option<String> {
    let url = url.trim_end_matches('/');
    let plain = url
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._:/[]".contains(&b));
    (plain && (url.starts_with("http://") || url.starts_with("https://"))).then(|| url.to_owned())
}

async fn install_script(State(s): State<Server>, headers: HeaderMap) -> Response {
    let server = crate::boot::public_url(&s, &headers)
        .as_deref()
        .and_then(script_url);
    let store = s.store.clone();
    let found = tokio::task::spawn_blocking(move || newest_agent(store.as_ref())).await;
    // Refusals are scripts that fail, answered 200: `curl -f ... | sh` would turn an error
    // status into an empty script that "succeeds".
    let body = match (server, found) {
        (None, _) => refusal(
            "this deployer cannot say its own URL (an unusable Host header, or a --boot-server \
             with characters a script cannot hold): start it with --boot-server http://HOST:PORT",
        ),
        (Some(server), found) => answer(&server, found),
    };
    (
        [
            (header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

type Found = Result<anyhow::Result<Option<AgentRelease>>, tokio::task::JoinError>;

/// The installer, or why there is none.
fn answer(server: &str, found: Found) -> String {
    match found {
        Ok(Ok(Some(release))) => script(server, &release),
        Ok(Ok(None)) => refusal(
            "this deployer has no muscle-agent release: publish one first \
             (cargo xtask release --package muscle-agent; muscle-deploy publish dist/muscle-agent-VERSION)",
        ),
        Ok(Err(e)) => {
            say!("install.sh: {e:#}");
            refusal("the deployer could not read its releases (its log says why); try again")
        }
        Err(e) => {
            say!("install.sh: {e}");
            refusal("the deployer could not read its releases (its log says why); try again")
        }
    }
}

/// A script that only says why it cannot install, and fails.
fn refusal(why: &str) -> String {
    format!("#!/bin/sh\necho 'muscle install: {why}' >&2\nexit 1\n")
}

/// The installer for `server`'s agent `version`. Every value written into it is a URL checked
/// by [`script_url`], a validated name or a hex digest: nothing to quote.
fn script(server: &str, release: &AgentRelease) -> String {
    let mut cases = String::new();
    for b in &release.binaries {
        // uname -m says arm64 on some systems for aarch64.
        let names = match b.arch.as_str() {
            "aarch64" => "aarch64|arm64",
            other => other,
        };
        cases.push_str(&format!(
            "  {names}) sha256={}; size={};;\n",
            b.sha256, b.size
        ));
    }
    let arches: Vec<&str> = release.binaries.iter().map(|b| b.arch.as_str()).collect();
    TEMPLATE
        .replace("@SERVER@", server)
        .replace("@VERSION@", &release.version)
        .replace("@MANIFEST@", &release.manifest_base64)
        .replace(
            "@SIGNATURE@",
            release.signature.as_deref().unwrap_or_default(),
        )
        .replace("@CASES@", &cases)
        .replace("@ARCHES@", &arches.join(", "))
}

const TEMPLATE: &str = include_str!("install.sh");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_urls_go_into_the_script() {
        assert_eq!(
            script_url("http://10.0.0.1:7700/").as_deref(),
            Some("http://10.0.0.1:7700")
        );
        assert!(script_url("https://[::1]:7700").is_some());
        for bad in [
            "http://a'b",
            "http://a$(reboot)",
            "http://a%2f",
            "http://a,http://b",
            "ftp://a",
        ] {
            assert_eq!(script_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_script_lists_each_architecture_and_leaves_no_placeholder() {
        let s = script(
            "http://10.0.0.1:7700",
            &AgentRelease {
                version: "0.4.0".into(),
                binaries: vec![
                    AgentBinary {
                        arch: "x86_64".into(),
                        sha256: "a".repeat(64),
                        size: 10,
                    },
                    AgentBinary {
                        arch: "aarch64".into(),
                        sha256: "b".repeat(64),
                        size: 20,
                    },
                ],
                manifest_base64: "e30=".into(),
                signature: Some("c".repeat(128)),
            },
        );
        assert!(s.contains("manifest='e30='"), "{s}");
        assert!(s.contains(&format!("signature='{}'", "c".repeat(128))));
        for placeholder in [
            "@SERVER@",
            "@VERSION@",
            "@CASES@",
            "@ARCHES@",
            "@MANIFEST@",
            "@SIGNATURE@",
        ] {
            assert!(!s.contains(placeholder), "{s}");
        }
        assert!(s.contains(&format!("  x86_64) sha256={}; size=10;;", "a".repeat(64))));
        assert!(s.contains(&format!(
            "  aarch64|arm64) sha256={}; size=20;;",
            "b".repeat(64)
        )));
        assert!(s.contains("x86_64, aarch64"));
        assert!(s.starts_with("#!/bin/sh\n"));
    }
}
