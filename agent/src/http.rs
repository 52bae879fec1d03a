//! The agent's HTTP client: one ureq agent for check-ins, downloads and HTTP health checks, with
//! TLS (`tls.rs`) for `https://` deployers.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

/// A hint for TLS errors an operator can fix: a self-signed certificate given both as the
/// server's certificate and as `--ca-file`.
pub fn hint_for(error: &str) -> Option<String> {
    error.contains("CaUsedAsEndEntity").then(|| {
        "the deployer's certificate is a CA certificate; serve with a server certificate signed \
         by a CA and give agents the CA (`muscle-deploy tls init` makes both)"
            .to_owned()
    })
}

/// Why a POST to the deployer failed.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("POST {url} answered {code}: {body}")]
    Status {
        url: String,
        code: u16,
        body: String,
    },
    #[error("the answer of POST {url} is larger than {max} bytes")]
    TooLarge { url: String, max: u64 },
    #[error("reading the answer of POST {url}")]
    Read {
        url: String,
        #[source]
        source: std::io::Error,
    },
    // ureq's message names the URL already.
    #[error("POST {path}")]
    Transport {
        path: String,
        #[source]
        source: Box<ureq::Error>,
    },
}

impl PostError {
    /// Worth another try: the deployer did not answer, or answered 5xx.
    pub fn is_passing(&self) -> bool {
        match self {
            PostError::Status { code, .. } => *code >= 500,
            PostError::Transport { .. } | PostError::Read { .. } => true,
            PostError::TooLarge { .. } => false,
        }
    }

    /// The request never reached the deployer (no address, no connection): asking another one
    /// at once cannot do the same thing twice.
    pub fn is_unsent(&self) -> bool {
        match self {
            PostError::Transport { source, .. } => matches!(
                source.as_ref(),
                ureq::Error::Transport(t)
                    if matches!(t.kind(), ureq::ErrorKind::Dns | ureq::ErrorKind::ConnectionFailed)
            ),
            _ => false,
        }
    }
}

/// POSTs `body` (JSON) to `path` on `server` with `bearer`, within `deadline` for the whole
/// exchange; returns the answer's bytes, at most `max` of them.
pub fn post(
    http: &ureq::Agent,
    server: &str,
    path: &str,
    bearer: Option<&str>,
    body: &[u8],
    deadline: Duration,
    max: u64,
) -> Result<Vec<u8>, PostError> {
    let url = format!("{}{path}", server.trim_end_matches('/'));
    let mut req = http
        .post(&url)
        .timeout(deadline)
        .set("Content-Type", "application/json");
    if let Some(secret) = bearer {
        req = req.set("Authorization", &format!("Bearer {secret}"));
    }
    match req.send_bytes(body) {
        Ok(resp) => {
            let mut bytes = Vec::new();
            let read = std::io::Read::read_to_end(
                &mut std::io::Read::take(resp.into_reader(), max + 1),
                &mut bytes,
            );
            if let Err(source) = read {
                return Err(PostError::Read { url, source });
            }
            if bytes.len() as u64 > max {
                return Err(PostError::TooLarge { url, max });
            }
            Ok(bytes)
        }
        Err(ureq::Error::Status(code, resp)) => {
            let body = resp.into_string().unwrap_or_default().trim().to_owned();
            Err(PostError::Status { url, code, body })
        }
        Err(e) => Err(PostError::Transport {
            path: path.to_owned(),
            source: Box::new(e),
        }),
    }
}

/// A client with the agent's timeouts, trusting the CA bundle at `ca_file` when given (see
/// `tls.rs` for whom it trusts otherwise).
pub fn client(ca_file: Option<&Path>) -> Result<ureq::Agent> {
    let builder = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout_read(Duration::from_secs(15))
        .user_agent(concat!("muscle-agent/", env!("CARGO_PKG_VERSION")));
    Ok(trusting(builder, ca_file)?.build())
}

#[cfg(feature = "tls")]
fn trusting(builder: ureq::AgentBuilder, ca_file: Option<&Path>) -> Result<ureq::AgentBuilder> {
    Ok(builder.tls_connector(crate::tls::connector(ca_file)?))
}

#[cfg(not(feature = "tls"))]
fn trusting(builder: ureq::AgentBuilder, ca_file: Option<&Path>) -> Result<ureq::AgentBuilder> {
    match ca_file {
        Some(path) => anyhow::bail!(
            "--ca-file {}: this agent was built without the `tls` feature",
            path.display()
        ),
        None => Ok(builder),
    }
}
