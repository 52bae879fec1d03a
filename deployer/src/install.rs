//! `GET /install.sh`: existing hosts join with one line,
//! `curl -fsSL http://DEPLOYER/install.sh | sh -s -- --enroll-token T`. The script is written per
//! request with the newest published `muscle-agent` release's binaries (sha256 and blob URL per
//! architecture): it downloads the one for the host, checks its sha256, installs it, and starts
//! it under systemd (a hardened unit) where systemd runs, else in the background with the
//! agent's built-in supervisor; then waits for the enrolment. It holds no secret: the token is
//! the caller's.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
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

/// The newest published agent release (by its counter): version and binaries.
fn newest_agent(store: &dyn Store) -> anyhow::Result<Option<(String, Vec<AgentBinary>)>> {
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
    Ok(Some((manifest.version.to_string(), binaries)))
}

async fn install_script(State(s): State<Server>, headers: HeaderMap) -> Response {
    let Some(server) = crate::boot::public_url(&s, &headers) else {
        return (
            StatusCode::BAD_REQUEST,
            "no usable Host header: start the deployer with --boot-server URL\n",
        )
            .into_response();
    };
    let store = s.store.clone();
    let body = match tokio::task::spawn_blocking(move || newest_agent(store.as_ref())).await {
        Ok(Ok(Some((version, binaries)))) => script(&server, &version, &binaries),
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

/// A script that only says why it cannot install, and fails.
fn refusal(why: &str) -> String {
    format!("#!/bin/sh\necho 'muscle install: {why}' >&2\nexit 1\n")
}

/// The installer for `server`'s agent `version`. Every value written into it is a URL from
/// [`public_url`](crate::boot::public_url), a validated name or a hex digest: nothing to quote.
fn script(server: &str, version: &str, binaries: &[AgentBinary]) -> String {
    let mut cases = String::new();
    for b in binaries {
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
    let arches: Vec<&str> = binaries.iter().map(|b| b.arch.as_str()).collect();
    TEMPLATE
        .replace("@SERVER@", server)
        .replace("@VERSION@", version)
        .replace("@CASES@", &cases)
        .replace("@ARCHES@", &arches.join(", "))
}

const TEMPLATE: &str = include_str!("install.sh");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_lists_each_architecture_and_leaves_no_placeholder() {
        let s = script(
            "http://10.0.0.1:7700",
            "0.4.0",
            &[
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
        );
        assert!(!s.contains('@'), "{s}");
        assert!(s.contains(&format!("  x86_64) sha256={}; size=10;;", "a".repeat(64))));
        assert!(s.contains(&format!(
            "  aarch64|arm64) sha256={}; size=20;;",
            "b".repeat(64)
        )));
        assert!(s.contains("x86_64, aarch64"));
        assert!(s.starts_with("#!/bin/sh\n"));
    }
}
