//! hello-service: the tiny HTTP service muscle's demo and tests deploy.
//!
//! `GET /` greets, `GET /version` answers the version, `GET /healthz` answers 200 while healthy and
//! 503 once `POST /fail` was called (or when built with the `unhealthy` feature, or started with
//! `HELLO_FAIL_HEALTH=1`). `HELLO_ALLOCATE_MB=N` makes it fill N MiB of memory at start (to meet a
//! memory limit). Standard library only, so it builds for any target in seconds.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn main() {
    let mut listen = "127.0.0.1:8080".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--version" | "-V" => {
                println!("hello-service {VERSION} ({})", std::env::consts::ARCH);
                return;
            }
            "--listen" => match args.next() {
                Some(addr) => listen = addr,
                None => die("--listen needs an address, e.g. --listen 127.0.0.1:8080"),
            },
            "--help" | "-h" => {
                println!("usage: hello-service [--listen ADDR] [--version]");
                return;
            }
            other => die(&format!("unknown argument {other:?}; try --help")),
        }
    }
    let ballast = allocate_ballast();
    let failing = cfg!(feature = "unhealthy") || std::env::var_os("HELLO_FAIL_HEALTH").is_some();
    let failing = Arc::new(AtomicBool::new(failing));
    let listener = TcpListener::bind(&listen)
        .unwrap_or_else(|e| die(&format!("cannot listen on {listen}: {e}")));
    eprintln!(
        "hello-service {VERSION} ({}) listening on {listen}",
        std::env::consts::ARCH
    );
    for stream in listener.incoming().flatten() {
        std::hint::black_box(&ballast);
        let failing = Arc::clone(&failing);
        std::thread::spawn(move || {
            let _ = serve(stream, &failing);
        });
    }
}

/// `HELLO_ALLOCATE_MB` MiB, every page written (so that it is really used), kept alive.
fn allocate_ballast() -> Vec<u8> {
    let mib: usize = std::env::var("HELLO_ALLOCATE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if mib > 0 {
        eprintln!("hello-service: filling {mib} MiB");
    }
    vec![1u8; mib << 20]
}

fn die(message: &str) -> ! {
    eprintln!("hello-service: {message}");
    std::process::exit(2)
}

fn serve(stream: TcpStream, failing: &AtomicBool) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers; no request here has a body worth reading.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET", "/") => (200, format!("hello from {}\n", std::env::consts::ARCH)),
        ("GET", "/version") => (200, format!("{VERSION}\n")),
        ("GET", "/healthz") if failing.load(Ordering::Relaxed) => (503, "unhealthy\n".into()),
        ("GET", "/healthz") => (200, "ok\n".into()),
        ("POST", "/fail") => {
            failing.store(true, Ordering::Relaxed);
            eprintln!("hello-service: health check switched to failing");
            (200, "failing\n".into())
        }
        _ => (404, "not found\n".into()),
    };
    let reason = match status {
        200 => "OK",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}
