//! Ad hoc jobs: a thread long-polls the deployer (`POST /v1/jobs/poll`, held up to 20 s, so a
//! job starts within a fraction of a second; log requests arrive the same way, served by
//! `log_stream.rs`), checks each order (signed by a pinned key when
//! keys are pinned, not expired, never run before), runs it with its timeout and reports its
//! exit status and bounded output. The agent stays pull-only: nothing connects to it.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use muscle_protocol::{
    JobId, JobOffer, JobOffers, JobOrder, JobOutcome, JobPoll, JobReport, Name, PublicKey,
    MAX_ANSWER_BYTES, MAX_CHECKIN_BYTES, MAX_JOB_OUTPUT,
};

/// Longer than the deployer holds a poll.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const MIN_POLL_GAP: Duration = Duration::from_secs(1);
/// The most job ids remembered (each until its order expires).
const MAX_SEEN: usize = 4096;
/// The most jobs run at once, and logs sent at once: a deployer cannot make the agent start
/// threads without bound. Offers past them are not taken (the job reports them lost).
const MAX_JOBS: usize = 16;
const MAX_LOG_STREAMS: usize = 8;

/// One of a bounded number of places, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct JobRunner {
    pub server: String,
    pub state_dir: PathBuf,
    pub agent_id: Name,
    pub http: ureq::Agent,
    pub trusted_keys: Vec<PublicKey>,
    /// Polls need the credential the main loop enrols for: wait for it.
    pub needs_credential: bool,
}

/// Starts the job thread; it ends with the agent.
pub fn spawn(runner: JobRunner) {
    let runner = Arc::new(runner);
    std::thread::Builder::new()
        .name("jobs".into())
        .spawn(move || runner.poll_forever())
        .expect("a thread can be spawned");
}

impl JobRunner {
    fn poll_forever(self: &Arc<Self>) {
        let seen = Arc::new(Mutex::new(Seen::load(&self.seen_file())));
        let (jobs_running, streams_running) = (Arc::default(), Arc::default());
        let mut backoff = Duration::from_secs(1);
        let mut failing = false;
        while !crate::agent::SHUTDOWN.load(Ordering::Relaxed) {
            if self.needs_credential && self.credential().is_none() {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            let asked = Instant::now();
            match self.poll() {
                Ok(offers) => {
                    failing = false;
                    backoff = Duration::from_secs(1);
                    // A deployer that answers at once with nothing is not asked in a tight loop.
                    if offers.jobs.is_empty() && offers.logs.is_empty() {
                        std::thread::sleep(MIN_POLL_GAP.saturating_sub(asked.elapsed()));
                    }
                    let mut not_taken = 0;
                    for offer in offers.jobs {
                        let Some(slot) = Slot::take(&jobs_running, MAX_JOBS) else {
                            not_taken += 1;
                            continue;
                        };
                        let (me, seen) = (self.clone(), seen.clone());
                        let _ = std::thread::Builder::new()
                            .name("job".into())
                            .spawn(move || {
                                me.take(offer, &seen);
                                drop(slot);
                            });
                    }
                    for request in offers.logs {
                        let Some(slot) = Slot::take(&streams_running, MAX_LOG_STREAMS) else {
                            not_taken += 1;
                            continue;
                        };
                        let me = self.clone();
                        let _ = std::thread::Builder::new()
                            .name("logs".into())
                            .spawn(move || {
                                crate::log_stream::serve(&me, request);
                                drop(slot);
                            });
                    }
                    if not_taken > 0 {
                        say!("{not_taken} job(s) or log request(s) not taken: at most {MAX_JOBS} jobs and {MAX_LOG_STREAMS} logs at once");
                    }
                }
                Err(e) => {
                    if !failing {
                        say!(
                            "job poll failed: {}; backing off",
                            muscle_protocol::causes(&*e)
                        );
                        failing = true;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn seen_file(&self) -> PathBuf {
        self.state_dir.join("jobs-seen")
    }

    fn credential(&self) -> Option<String> {
        std::fs::read_to_string(self.state_dir.join("credential"))
            .ok()
            .map(|c| c.trim().to_owned())
    }

    pub(crate) fn post(&self, path: &str, body: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let url = format!("{}{path}", self.server.trim_end_matches('/'));
        let mut req = self
            .http
            .post(&url)
            .timeout(timeout)
            .set("Content-Type", "application/json");
        if let Some(secret) = self.credential() {
            req = req.set("Authorization", &format!("Bearer {secret}"));
        }
        match req.send_bytes(body) {
            Ok(resp) => {
                let mut bytes = Vec::new();
                resp.into_reader()
                    .take(MAX_ANSWER_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .with_context(|| format!("reading the answer of POST {url}"))?;
                anyhow::ensure!(
                    bytes.len() as u64 <= MAX_ANSWER_BYTES,
                    "the answer of POST {url} is larger than {MAX_ANSWER_BYTES} bytes"
                );
                Ok(bytes)
            }
            Err(ureq::Error::Status(code, resp)) => {
                let body = resp.into_string().unwrap_or_default();
                anyhow::bail!("POST {url} answered {code}: {}", body.trim());
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("POST {path}"))),
        }
    }

    fn poll(&self) -> Result<JobOffers> {
        let body = serde_json::to_vec(&JobPoll {
            agent_id: self.agent_id.clone(),
        })?;
        let answer = self.post("/v1/jobs/poll", &body, POLL_TIMEOUT)?;
        serde_json::from_slice(&answer).context("the job poll's answer is not the JSON expected")
    }

    /// Checks, runs and reports one offer.
    fn take(&self, offer: JobOffer, seen: &Mutex<Seen>) {
        let report = match self.accept(&offer, seen) {
            Ok(order) => {
                say!("job {}: running {:?}", order.id, order.argv);
                run(&order, self.agent_id.clone())
            }
            Err((Some(id), reason)) => {
                say!("job {id} refused: {reason}");
                JobReport {
                    agent_id: self.agent_id.clone(),
                    job_id: id,
                    outcome: JobOutcome::Refused { reason },
                    stdout: String::new(),
                    stderr: String::new(),
                    truncated_bytes: 0,
                    duration_ms: 0,
                }
            }
            Err((None, reason)) => {
                say!("a job was refused and cannot be reported (no id): {reason}");
                return;
            }
        };
        self.report(report);
    }

    /// The order, if this agent may run it; otherwise its id (when readable) and why not.
    fn accept(
        &self,
        offer: &JobOffer,
        seen: &Mutex<Seen>,
    ) -> Result<JobOrder, (Option<JobId>, String)> {
        let order: JobOrder = serde_json::from_str(&offer.order).map_err(|e| {
            let id = serde_json::from_str::<serde_json::Value>(&offer.order)
                .ok()
                .and_then(|v| serde_json::from_value(v.get("id")?.clone()).ok());
            (id, format!("cannot read the job order: {e}"))
        })?;
        let refuse = |reason: String| (Some(order.id.clone()), reason);
        muscle_protocol::verify_signature(
            &JobOrder::signed_bytes(&offer.order),
            offer.signature.as_deref(),
            &self.trusted_keys,
        )
        .map_err(|e| {
            let why = match e {
                muscle_protocol::SignatureError::Unsigned => "the job is not signed".to_owned(),
                other => other.to_string(),
            };
            refuse(format!(
                "this agent pins keys and runs only jobs signed by one of them: {why}"
            ))
        })?;
        order.check().map_err(refuse)?;
        let now = crate::clock::now_unix();
        if order.not_after < now {
            return Err(refuse(format!(
                "the order expired at {} (this agent's clock: {})",
                muscle_logline::utc(order.not_after),
                muscle_logline::utc(now)
            )));
        }
        // Remembered before it runs: an agent that dies meanwhile does not run it twice.
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.insert(&order, now) {
            return Err(refuse("this agent ran that job already".into()));
        }
        if let Err(e) = seen.save(&self.seen_file()) {
            return Err(refuse(format!(
                "cannot remember the job before running it: {e:#}"
            )));
        }
        Ok(order)
    }

    /// Reports, retrying a few times: the deployer may be restarting.
    fn report(&self, mut report: JobReport) {
        let mut body = serde_json::to_vec(&report).expect("a report serialises");
        // Output full of control characters grows sixfold as JSON: halve it until it fits.
        while body.len() > MAX_CHECKIN_BYTES - 1024 {
            for text in [&mut report.stdout, &mut report.stderr] {
                let keep = floor_char_boundary(text, text.len() / 2);
                report.truncated_bytes += (text.len() - keep) as u64;
                text.truncate(keep);
            }
            body = serde_json::to_vec(&report).expect("a report serialises");
        }
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=6 {
            match self.post("/v1/jobs/result", &body, POLL_TIMEOUT) {
                Ok(_) => return,
                Err(e) if attempt == 6 || e.to_string().contains("answered 409") => {
                    say!("job {}: cannot report its result: {e:#}", report.job_id);
                    return;
                }
                Err(_) => std::thread::sleep(wait),
            }
            wait *= 2;
        }
    }
}

/// Runs `order` in a process group of its own, killed with everything it started at its
/// timeout; output beyond [`MAX_JOB_OUTPUT`] per stream is counted, not kept.
fn run(order: &JobOrder, agent_id: Name) -> JobReport {
    let started = Instant::now();
    let report = |outcome, stdout, stderr, truncated_bytes| JobReport {
        agent_id: agent_id.clone(),
        job_id: order.id.clone(),
        outcome,
        stdout,
        stderr,
        truncated_bytes,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let spawned = Command::new(&order.argv[0])
        .args(&order.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir("/")
        // Which member of the fleet runs it, for commands that say so.
        .env("MUSCLE_AGENT_ID", agent_id.as_str())
        .env("MUSCLE_AGENT_ARCH", muscle_inspect::host_arch())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let reason = format!("{}: {e}", order.argv[0]);
            return report(
                JobOutcome::FailedToStart { reason },
                String::new(),
                String::new(),
                0,
            );
        }
    };
    let stdout = capture(child.stdout.take());
    let stderr = capture(child.stderr.take());
    let deadline = started + order.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    // What the job left behind in its group goes with it (and lets the readers finish).
    kill_group(child.id());
    let _ = child.wait();
    let (out, out_extra) = stdout.join().unwrap_or_default();
    let (err, err_extra) = stderr.join().unwrap_or_default();
    let outcome = match status {
        None => JobOutcome::TimedOut,
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => JobOutcome::Exited { code },
            (None, Some(signal)) => JobOutcome::Killed { signal },
            (None, None) => JobOutcome::Killed { signal: 0 },
        },
    };
    report(outcome, out, err, out_extra + err_extra)
}

fn kill_group(pid: u32) {
    crate::process::signal_pid_group(pid, libc::SIGKILL);
}

/// Reads a stream to its end on a thread: the first [`MAX_JOB_OUTPUT`] bytes as text, and how
/// many bytes came after.
fn capture(stream: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<(String, u64)> {
    std::thread::spawn(move || {
        let Some(mut stream) = stream else {
            return (String::new(), 0);
        };
        let mut kept = Vec::new();
        let _ = (&mut stream)
            .take(MAX_JOB_OUTPUT as u64)
            .read_to_end(&mut kept);
        let extra = std::io::copy(&mut stream, &mut std::io::sink()).unwrap_or(0);
        let mut text = String::from_utf8_lossy(&kept).into_owned();
        // Replacement characters can make the text longer than the bytes.
        let keep = floor_char_boundary(&text, MAX_JOB_OUTPUT);
        let over = (text.len() - keep) as u64;
        text.truncate(keep);
        (text, extra + over)
    })
}

fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut i = at.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Job ids this agent has run, each kept until its order expires (after that the order is
/// refused anyway), persisted in the state dir.
struct Seen(BTreeMap<JobId, u64>);

impl Seen {
    fn load(path: &std::path::Path) -> Seen {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        Seen(
            text.lines()
                .filter_map(|l| {
                    let (id, until) = l.split_once(' ')?;
                    Some((JobId::try_from(id.to_owned()).ok()?, until.parse().ok()?))
                })
                .collect(),
        )
    }

    /// False when `order` was run already.
    fn insert(&mut self, order: &JobOrder, now: u64) -> bool {
        self.0.retain(|_, until| *until >= now);
        if self.0.contains_key(&order.id) {
            return false;
        }
        if self.0.len() >= MAX_SEEN {
            // The soonest to expire goes first.
            if let Some(first) = self
                .0
                .iter()
                .min_by_key(|(_, u)| **u)
                .map(|(k, _)| k.clone())
            {
                self.0.remove(&first);
            }
        }
        self.0.insert(order.id.clone(), order.not_after);
        true
    }

    fn save(&self, path: &std::path::Path) -> Result<()> {
        let text: String = self
            .0
            .iter()
            .map(|(id, until)| format!("{id} {until}\n"))
            .collect();
        crate::fsutil::write_atomic(path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(argv: &[&str], timeout_ms: u64) -> JobOrder {
        JobOrder {
            id: JobId::new([7; 16]),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_millis(timeout_ms),
            not_after: u64::MAX,
        }
    }

    fn agent() -> Name {
        Name::parse("a1").unwrap()
    }

    #[test]
    fn a_job_reports_exit_status_and_both_streams() {
        let r = run(
            &order(&["sh", "-c", "echo out; echo err >&2; exit 3"], 5000),
            agent(),
        );
        assert_eq!(r.outcome, JobOutcome::Exited { code: 3 });
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("out\n", "err\n"));
        let r = run(&order(&["/no/such/program"], 5000), agent());
        assert!(
            matches!(r.outcome, JobOutcome::FailedToStart { .. }),
            "{r:?}"
        );
    }

    /// The timeout kills the job and what it started (the `sleep` holding the pipe open would
    /// otherwise keep the report waiting).
    #[test]
    fn a_job_past_its_timeout_is_killed_with_its_children() {
        let started = Instant::now();
        let r = run(&order(&["sh", "-c", "sleep 30 & sleep 30"], 300), agent());
        assert_eq!(r.outcome, JobOutcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn output_past_the_limit_is_counted_not_kept() {
        let r = run(
            &order(&["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"], 5000),
            agent(),
        );
        assert_eq!(r.stdout.len(), MAX_JOB_OUTPUT);
        assert_eq!(r.truncated_bytes, 100_000 - MAX_JOB_OUTPUT as u64);
    }

    #[test]
    fn a_job_runs_once_and_its_id_is_forgotten_when_it_expires() {
        let dir = std::env::temp_dir().join(format!("muscle-seen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("jobs-seen");
        let mut seen = Seen::load(&file);
        let mut o = order(&["true"], 1000);
        o.not_after = 100;
        assert!(seen.insert(&o, 50));
        seen.save(&file).unwrap();
        let mut again = Seen::load(&file);
        assert!(!again.insert(&o, 60), "a restarted agent remembers");
        assert!(again.insert(&o, 101), "forgotten once expired");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
