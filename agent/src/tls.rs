//! TLS for `https://` deployers: rustls over ring, plugged into ureq as its connector.
//!
//! Whom the agent trusts, first match wins: `--ca-file`; the file `SSL_CERT_FILE` names; the
//! host's CA bundle (the first of [`HOST_BUNDLES`] that exists); Mozilla's roots compiled in,
//! with the `mozilla-roots` feature, for hosts that have no bundle. The host's bundle is read on
//! the first `https://` connection, so an agent on plain HTTP never holds it in memory.
//!
//! The agent is only ever a client without a client certificate: its crypto provider has no key
//! loader, so the code that signs with private keys is not linked in.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustls::client::{ClientConfig, ClientConnection};
use rustls::crypto::{CryptoProvider, GetRandomFailed, KeyProvider, SecureRandom};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::SigningKey;
use rustls::{RootCertStore, StreamOwned};
use ureq::{ReadWrite, TlsConnector};

/// Where Linux distributions keep their CA bundle (the list Go's crypto/x509 reads).
pub const HOST_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Arch, Gentoo
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL 6
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/pki/tls/cacert.pem",            // OpenELEC
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", // CentOS, RHEL 7
    "/etc/ssl/cert.pem",                  // Alpine
];

/// The connector for a client: trusting only `ca_file` (read now, so a bad file stops the agent
/// at start-up) or, without one, the host's roots (read on first use).
pub fn connector(ca_file: Option<&Path>) -> Result<Arc<Connector>> {
    let trust = match ca_file {
        Some(path) => Some(Arc::new(config(read_bundle(
            path,
            "--ca-file",
            Strict::Yes,
        )?)?)),
        None => None,
    };
    Ok(Arc::new(Connector { given: trust }))
}

pub struct Connector {
    /// `None`: the host's roots, shared by every client of the process.
    given: Option<Arc<ClientConfig>>,
}

impl TlsConnector for Connector {
    fn connect(
        &self,
        host: &str,
        mut io: Box<dyn ReadWrite>,
    ) -> Result<Box<dyn ReadWrite>, ureq::Error> {
        let config = match &self.given {
            Some(config) => config.clone(),
            None => host_config().map_err(io::Error::other)?,
        };
        // An IPv6 host comes in brackets from the URL.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).map_err(|e| {
            io::Error::other(format!("{host:?} cannot be named by a certificate: {e}"))
        })?;
        let mut conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        conn.complete_io(&mut io)?;
        Ok(Box::new(TlsStream(StreamOwned::new(conn, io))))
    }
}

/// How long a failure to read the host's roots is reported before they are looked for again (a
/// CA bundle being reinstalled, an `SSL_CERT_FILE` fixed after the agent started).
const HOST_ROOTS_RETRY: Duration = Duration::from_secs(30);

/// The host's roots, read once per process once they are read. A failure is kept for
/// [`HOST_ROOTS_RETRY`]: it names every place looked in, and every `https://` connection
/// reports it meanwhile.
fn host_config() -> Result<Arc<ClientConfig>, String> {
    type Cached = Option<(Instant, Result<Arc<ClientConfig>, String>)>;
    static HOST: Mutex<Cached> = Mutex::new(None);
    let mut cached = HOST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let stale = match &*cached {
        Some((_, Ok(_))) => false,
        Some((at, Err(_))) => at.elapsed() >= HOST_ROOTS_RETRY,
        None => true,
    };
    if stale {
        let read = host_roots()
            .and_then(config)
            .map(Arc::new)
            .map_err(|e| format!("{e:#}"));
        *cached = Some((Instant::now(), read));
    }
    cached.as_ref().expect("filled above").1.clone()
}

fn host_roots() -> Result<RootCertStore> {
    if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
        return read_bundle(Path::new(&file), "SSL_CERT_FILE", Strict::No);
    }
    if let Some(found) = HOST_BUNDLES.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return read_bundle(&found, "the host's CA bundle", Strict::No);
    }
    compiled_in_roots()
}

#[cfg(feature = "mozilla-roots")]
fn compiled_in_roots() -> Result<RootCertStore> {
    Ok(RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    })
}

#[cfg(not(feature = "mozilla-roots"))]
fn compiled_in_roots() -> Result<RootCertStore> {
    anyhow::bail!(
        "no CA bundle to check the deployer's certificate against: none of {} exists and \
         SSL_CERT_FILE is not set; give --ca-file, install the host's CA certificates, or use \
         an agent built with the `mozilla-roots` feature",
        HOST_BUNDLES.join(", ")
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Strict {
    /// A bundle the operator gave: every certificate in it must be usable.
    Yes,
    /// A host's bundle: the odd certificate rustls cannot use is skipped, as OpenSSL does.
    No,
}

/// The certificates of a PEM bundle; one with no usable certificate is an error.
fn read_bundle(path: &Path, what: &str, strict: Strict) -> Result<RootCertStore> {
    let at = || format!("{what} {}", path.display());
    let certs =
        CertificateDer::pem_file_iter(path).with_context(|| format!("{}: cannot read it", at()))?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        let cert = cert.with_context(|| format!("{}: not a PEM certificate bundle", at()))?;
        let added = roots.add(cert);
        if strict == Strict::Yes {
            added.with_context(|| format!("{}: unusable certificate", at()))?;
        }
    }
    anyhow::ensure!(!roots.is_empty(), "{}: no usable certificate in it", at());
    Ok(roots)
}

fn config(roots: RootCertStore) -> Result<ClientConfig> {
    let provider = CryptoProvider {
        key_provider: &NoClientKeys,
        secure_random: &SystemRandom,
        ..rustls::crypto::ring::default_provider()
    };
    // Named, not "whatever rustls was built with": a workspace build that includes the
    // deployer turns rustls' tls12 on for the agent too.
    let versions: &[&rustls::SupportedProtocolVersion] = &[
        &rustls::version::TLS13,
        #[cfg(feature = "tls12")]
        &rustls::version::TLS12,
    ];
    Ok(ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The agent presents no client certificate, so it never loads a private key.
#[derive(Debug)]
struct NoClientKeys;

impl KeyProvider for NoClientKeys {
    fn load_private_key(
        &self,
        _: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn SigningKey>, rustls::Error> {
        Err(rustls::Error::General(
            "the agent uses no client certificate".into(),
        ))
    }
}

#[derive(Debug)]
struct SystemRandom;

impl SecureRandom for SystemRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), buf)
            .map_err(|_| GetRandomFailed)
    }
}

/// A TLS connection as ureq's stream. `socket()` gives ureq the TCP socket, where it sets the
/// read and write deadlines.
struct TlsStream(StreamOwned<ClientConnection, Box<dyn ReadWrite>>);

impl ReadWrite for TlsStream {
    fn socket(&self) -> Option<&TcpStream> {
        self.0.get_ref().socket()
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsStream")
    }
}
