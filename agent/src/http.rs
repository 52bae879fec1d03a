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
