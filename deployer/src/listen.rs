//! The deployer's HTTP front: accepts connections up to a limit, gives every client a deadline
//! for its TLS handshake and for each request's headers, and answers plain HTTP sent to a TLS
//! port with a hint instead of a TLS alert. Without these, idle half-open connections pile up
//! until the open-file limit stops real check-ins.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Time a client has for its TLS handshake, and for each request's headers.
    pub header_deadline: Duration,
}

/// Descriptors kept out of the connection budget: the store, blobs being read, logs.
const RESERVED_FILES: u64 = 64;

impl Limits {
    /// Derived from the open-file limit: each connection costs a socket and, while it
    /// downloads, a blob file.
    pub fn for_open_file_limit() -> Limits {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct that we own.
        let files = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            limit.rlim_cur
        } else {
            1024
        };
        let budget = files.saturating_sub(RESERVED_FILES) / 2;
        Limits {
            max_connections: budget.clamp(16, 16_384) as usize,
            header_deadline: Duration::from_secs(5),
        }
    }
}

/// Loads a PEM certificate chain and key for HTTPS.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read the TLS certificate chain {} (PEM expected)",
                cert.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate in it (PEM expected)",
        cert.display()
    );
    let private_key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "cannot read the TLS private key {} (PEM expected)",
            key.display()
        )
    })?;
    // rustls is built with ring only (no aws-lc: nothing to build with cmake).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, private_key)
        .with_context(|| {
            format!(
                "{} and {} do not make a usable certificate and key",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open requests finish for
/// up to 10 s.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopped) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: wait for a descriptor to free up rather than spin.
                    say!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (app, tls, stopped) = (app.clone(), tls.clone(), stopped.clone());
        tokio::spawn(async move {
            connection(stream, app, tls, limits, stopped).await;
            drop(permit);
        });
    }
    // New clients are refused at once rather than left waiting through the drain.
    drop(listener);
    let _ = stop.send(true);
    let all = limits.max_connections as u32;
    let _ = tokio::time::timeout(Duration::from_secs(10), permits.acquire_many(all)).await;
}

async fn connection(
    stream: TcpStream,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    stopped: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = tls else {
        return http(TokioIo::new(stream), app, limits, stopped).await;
    };
    let deadline = limits.header_deadline;
    let mut first = [0u8; 1];
    match tokio::time::timeout(deadline, stream.peek(&mut first)).await {
        // A TLS record of type handshake: a ClientHello.
        Ok(Ok(1)) if first[0] == 0x16 => {}
        Ok(Ok(1)) => return answer_plain_http(stream).await,
        _ => return,
    }
    if let Ok(Ok(stream)) = tokio::time::timeout(deadline, acceptor.accept(stream)).await {
        http(TokioIo::new(stream), app, limits, stopped).await;
    }
}

/// Plain HTTP sent to the TLS port: say so in a way `curl` and the agent show.
async fn answer_plain_http(mut stream: TcpStream) {
    let body = "this server speaks TLS: use https://\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = stream.write_all(answer.as_bytes());
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
    let _ = stream.shutdown().await;
}

async fn http<I>(io: I, app: Router, limits: Limits, mut stopped: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_deadline);
    let conn = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
