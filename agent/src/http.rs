//! The agent's HTTP client: one ureq agent for check-ins, downloads and HTTP health checks, with
//! TLS (rustls) for `https://` deployers, trusting `--ca-file` when given.

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

/// A client with the agent's timeouts, trusting the CA bundle at `ca_file` when given.
pub fn client(ca_file: Option<&Path>) -> Result<ureq::Agent> {
    let builder = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout_read(Duration::from_secs(15))
        .user_agent(concat!("muscle-agent/", env!("CARGO_PKG_VERSION")));
    let builder = match ca_file {
        Some(path) => trusting(builder, path)?,
        None => builder,
    };
    Ok(builder.build())
}

#[cfg(feature = "tls")]
fn trusting(builder: ureq::AgentBuilder, path: &Path) -> Result<ureq::AgentBuilder> {
    use anyhow::Context;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use std::sync::Arc;

    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("--ca-file {}: cannot read it", path.display()))?;
    for cert in certs {
        let cert = cert.with_context(|| {
            format!("--ca-file {}: not a PEM certificate bundle", path.display())
        })?;
        roots
            .add(cert)
            .with_context(|| format!("--ca-file {}: unusable certificate", path.display()))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "--ca-file {}: no certificate in it",
        path.display()
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(builder.tls_config(Arc::new(config)))
}

#[cfg(not(feature = "tls"))]
fn trusting(_: ureq::AgentBuilder, path: &Path) -> Result<ureq::AgentBuilder> {
    anyhow::bail!(
        "--ca-file {}: this agent was built without the `tls` feature",
        path.display()
    )
}
