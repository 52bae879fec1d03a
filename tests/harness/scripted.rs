//! A scripted deployer for the agent's bad-input tests: it answers check-ins with exactly the
//! desired state a test crafts (a tampered manifest, a wrong hash, a truncated blob, ...), which
//! the real deployer would refuse to publish, and records every report it receives.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// How a blob is served.
#[derive(Clone, Default)]
pub struct Blob {
    pub bytes: Vec<u8>,
    /// Hang up after this many bytes (a cut download).
    pub truncate_at: Option<usize>,
    /// Trickle 16 bytes a second (a slow-retrieval attack).
    pub trickle: bool,
}

#[derive(Default)]
struct Script {
    /// The `apps` of every check-in answer.
    apps: Value,
    generation: u64,
    /// Blob bytes by URL path, and how many of them to send before hanging up (truncation).
    blobs: HashMap<String, Blob>,
    reports: Vec<Value>,
    /// Spaces appended to every check-in answer (an oversized answer).
    padding: usize,
    /// Send check-in answers one byte a second (a trickling peer).
    trickle_answers: bool,
    /// Every blob request as (path, first byte asked for).
    blob_requests: Vec<(String, usize)>,
}

#[derive(Clone)]
pub struct ScriptedServer {
    pub port: u16,
    script: Arc<Mutex<Script>>,
}

impl ScriptedServer {
    pub fn start() -> ScriptedServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("loopback");
        let port = listener.local_addr().expect("bound").port();
        let script = Arc::new(Mutex::new(Script {
            apps: Value::Array(vec![]),
            ..Default::default()
        }));
        let shared = script.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let script = shared.clone();
                std::thread::spawn(move || {
                    let _ = handle(stream, &script);
                });
            }
        });
        ScriptedServer { port, script }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Serves `blob` at `path`.
    pub fn put_blob(&self, path: &str, blob: Blob) {
        self.script
            .lock()
            .unwrap()
            .blobs
            .insert(path.to_owned(), blob);
    }

    /// From now on, check-ins get `apps` (a JSON array of `DesiredApp`) as the desired state.
    pub fn set_desired(&self, apps: Value) {
        let mut s = self.script.lock().unwrap();
        s.apps = apps;
        s.generation += 1;
    }

    /// From now on, every check-in answer ends with `bytes` spaces (still valid JSON).
    pub fn pad_answers(&self, bytes: usize) {
        self.script.lock().unwrap().padding = bytes;
    }

    /// From now on, check-in answers trickle: one byte a second, for as long as the agent reads.
    pub fn trickle_answers(&self, on: bool) {
        self.script.lock().unwrap().trickle_answers = on;
    }

    pub fn reports(&self) -> Vec<Value> {
        self.script.lock().unwrap().reports.clone()
    }

    pub fn blob_requests(&self) -> Vec<(String, usize)> {
        self.script.lock().unwrap().blob_requests.clone()
    }

    /// The last report's entry for `app`.
    pub fn last_app_report(&self, app: &str) -> Option<Value> {
        let reports = self.reports();
        let last = reports.last()?;
        last["apps"]
            .as_array()?
            .iter()
            .find(|a| a["app"] == app)
            .cloned()
    }
}

fn handle(stream: TcpStream, script: &Mutex<Script>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let (mut length, mut range_start) = (0usize, 0usize);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? <= 2 {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            range_start = v.trim().trim_end_matches('-').parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let mut out = stream;
    if method == "POST" && path == "/v1/checkin" {
        let report: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (answer, padding, trickle) = {
            let mut s = script.lock().unwrap();
            s.reports.push(report);
            let answer = serde_json::json!({ "generation": s.generation, "unchanged": false, "apps": s.apps });
            (answer, s.padding, s.trickle_answers)
        };
        let text = answer.to_string() + &" ".repeat(padding);
        write!(out, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", text.len())?;
        if !trickle {
            return out.write_all(text.as_bytes());
        }
        for byte in text.as_bytes() {
            out.write_all(&[*byte])?;
            out.flush()?;
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        return Ok(());
    }
    let blob = {
        let mut s = script.lock().unwrap();
        s.blob_requests.push((path.clone(), range_start));
        s.blobs.get(&path).cloned()
    };
    match blob {
        Some(Blob {
            bytes,
            truncate_at,
            trickle,
        }) => {
            let start = range_start.min(bytes.len());
            let status = if range_start > 0 {
                "206 Partial Content"
            } else {
                "200 OK"
            };
            // The advertised length is the whole remainder; a truncated blob hangs up early.
            write!(
                out,
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                bytes.len() - start
            )?;
            let end = truncate_at.map_or(bytes.len(), |t| t.max(start).min(bytes.len()));
            if !trickle {
                return out.write_all(&bytes[start..end]);
            }
            for chunk in bytes[start..end].chunks(16) {
                out.write_all(chunk)?;
                out.flush()?;
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Ok(())
        }
        None => write!(
            out,
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ),
    }
}
