//! The deployer against hostile clients and a damaged store: slow readers of large blobs,
//! thousands of half-open connections under a small open-file limit, a blob damaged on disk.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use muscle_e2e::Deployer;

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// Puts `bytes` in the store's blob directory under their sha256, as publish would.
fn plant_blob(deployer: &Deployer, bytes: &[u8]) -> Result<String> {
    let sha = muscle_protocol::sha256_hex(bytes);
    std::fs::write(deployer.data_dir.join("blobs/sha256").join(&sha), bytes)?;
    Ok(sha)
}

fn get(url: &str) -> (u16, Vec<u8>) {
    match ureq::get(url).timeout(Duration::from_secs(30)).call() {
        Ok(r) => {
            let mut body = Vec::new();
            r.into_reader().read_to_end(&mut body).unwrap();
            (200, body)
        }
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default().into()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// A check-in of an agent nobody enrolled: the deployer records it and answers 200.
fn check_in(url: &str) -> Result<u16> {
    let body = r#"{"agent_id": "probe", "arch": "x86_64", "hostname": "h", "agent_version": "1"}"#;
    let answer = ureq::post(&format!("{url}/v1/checkin"))
        .timeout(Duration::from_secs(30))
        .set("content-type", "application/json")
        .send_string(body)?;
    Ok(answer.status())
}

#[test]
fn sixteen_slow_readers_of_a_64_mib_blob_leave_the_deployers_memory_flat() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("slow-readers");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    let blob: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let sha = plant_blob(&deployer, &blob)?;
    let pid = deployer.pid().context("running")?;
    let before = rss_kib(pid)?;
    let request = format!("GET /v1/blobs/sha256/{sha} HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut readers = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(("127.0.0.1", deployer.port))?;
        s.write_all(request.as_bytes())?;
        readers.push(s);
    }
    // Each reader takes 4 KiB a second: the answers are far from done when RSS is read.
    let mut buf = [0u8; 4096];
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        for s in &mut readers {
            let n = s.read(&mut buf)?;
            assert!(n > 0, "the download started");
        }
    }
    let after = rss_kib(pid)?;
    let grown = after.saturating_sub(before);
    eprintln!("deployer RSS {before} KiB -> {after} KiB with 16 slow readers of a 64 MiB blob");
    assert!(
        grown < 64 * 1024,
        "RSS grew by {grown} KiB: blobs are read into memory"
    );
    // And the bytes served are the blob's.
    let (status, served) = get(&format!("{}/v1/blobs/sha256/{sha}", deployer.url()));
    assert_eq!(status, 200);
    assert!(
        served == blob,
        "the streamed blob differs from the stored one"
    );
    Ok(())
}

#[test]
fn check_ins_are_served_while_2000_half_open_connections_sit_under_a_1024_file_limit() -> Result<()>
{
    let b = common::builds();
    let dir = common::scratch("half-open");
    let mut deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.open_file_limit = Some(1024);
    deployer.restart()?;
    raise_own_file_limit(4096);
    // Request heads that never end, from 8 threads (connects wait while the deployer's
    // accept queue is full).
    let port = deployer.port;
    let opened = Instant::now();
    let openers: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || -> Result<Vec<TcpStream>> {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                (0..250)
                    .map(|_| {
                        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(60))?;
                        s.write_all(b"POST /v1/checkin HTTP/1.1\r\nHost: t\r\n")?;
                        Ok(s)
                    })
                    .collect()
            })
        })
        .collect();
    let idle: Vec<TcpStream> = openers
        .into_iter()
        .map(|t| t.join().expect("opener thread"))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(idle.len(), 2000);
    eprintln!(
        "2000 half-open connections opened in {:?}",
        opened.elapsed()
    );
    let asked = Instant::now();
    assert_eq!(check_in(&deployer.url())?, 200);
    eprintln!("a check-in was answered {:?} after", asked.elapsed());
    drop(idle);
    Ok(())
}

/// The test itself holds 2000 sockets.
fn raise_own_file_limit(n: u64) {
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit reads one rlimit struct we own.
    let raised = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(raised, 0, "cannot raise this test's open-file limit to {n}");
}

#[test]
fn a_damaged_blob_is_found_by_fsck_never_served_and_repaired_by_republishing() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("damaged-blob");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.v1.dir.join("manifest.json"))?)?;
    let sha = manifest["artifacts"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("{}/v1/blobs/sha256/{sha}", deployer.url());
    assert_eq!(get(&url).0, 200);

    // One byte changed in place: same size, same name.
    let path = deployer.data_dir.join("blobs/sha256").join(&sha);
    let mut bytes = std::fs::read(&path)?;
    bytes[4096] ^= 0xff;
    std::fs::write(&path, &bytes)?;

    let (status, body) = get(&url);
    assert_eq!(status, 503, "a damaged blob is never served");
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("damaged") && body.contains(&sha), "{body}");
    let fsck = deployer.cli(&["fsck"])?;
    let out = common::text(&fsck);
    assert_eq!(fsck.status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!("blob sha256:{sha} is damaged"))
            && out.contains("re-publish hello-service 0.1.0 to repair"),
        "{out}"
    );

    let out = deployer.publish(&b.v1.dir)?;
    assert!(out.contains("repaired 1 damaged blob"), "{out}");
    let fsck = deployer.cli(&["fsck"])?;
    assert!(fsck.status.success(), "{}", common::text(&fsck));
    let (status, served) = get(&url);
    assert_eq!(status, 200);
    assert_eq!(muscle_protocol::sha256_hex(&served), sha);
    Ok(())
}

/// The agent's last-seen time as the store on disk has it.
fn stored_last_seen(deployer: &Deployer, agent: &str) -> Result<i64> {
    let db = rusqlite::Connection::open(deployer.data_dir.join("muscle.db"))?;
    Ok(db.query_row(
        "SELECT last_seen_ms FROM agents WHERE id = ?1",
        [agent],
        |r| r.get(0),
    )?)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn steady_check_ins_are_written_in_batches_and_all_of_them_by_a_clean_shutdown() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("steady-checkins");
    let mut d = Deployer::start(&b.deployer, &dir.join("data"))?;
    // The first check-in is written at once; the same report again waits in memory and is
    // written with the others every second.
    check_in(&d.url())?;
    let mut sent = now_ms();
    let until = sent + 3_000;
    while sent < until {
        std::thread::sleep(Duration::from_millis(100));
        sent = now_ms();
        check_in(&d.url())?;
    }
    // SIGKILL: a crash loses at most the last flush interval (1 s) of last-seen times.
    d.kill9();
    let after_crash = stored_last_seen(&d, "probe")?;
    assert!(
        sent - after_crash <= 1_500,
        "a crash lost more than the flush interval: stored {after_crash}, last sent {sent}"
    );
    d.restart()?;
    check_in(&d.url())?;
    std::thread::sleep(Duration::from_millis(50));
    let sent = now_ms();
    check_in(&d.url())?;
    // SIGTERM right away: the answered check-in is on disk when the deployer has stopped.
    let pid = d.pid().context("running")?;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    d.wait_exit(Duration::from_secs(30))?;
    let stored = stored_last_seen(&d, "probe")?;
    assert!(
        stored >= sent,
        "the last check-in before a clean shutdown was lost: stored {stored}, sent at {sent}"
    );
    Ok(())
}
