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
    MAX_ANSWER_BYTES, MAX_CHECKIN_BYTES, MAX_JOB_OUTPUT, MAX_JOB_REASON_CHARS,
};

/// Longer than the deployer holds a poll.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A deployer answering at once (its holds are taken, or it is old) is asked this often.
const MIN_POLL_GAP: Duration = Duration::from_secs(2);
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
    pub servers: crate::servers::Servers,
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

    pub(crate) fn post(
        &self,
        path: &str,
        body: &[u8],
        deadline: Duration,
    ) -> Result<Vec<u8>, crate::http::PostError> {
        let bearer = self.credential();
        self.servers.post(
            &self.http,
            path,
            bearer.as_deref(),
            body,
            deadline,
            MAX_ANSWER_BYTES,
        )
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
                let reason = clip(&reason, MAX_JOB_REASON_CHARS);
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
            // Only its id, to report the refusal under.
            #[derive(serde::Deserialize)]
            struct IdOnly {
                id: JobId,
            }
            let id = serde_json::from_str::<IdOnly>(&offer.order)
                .ok()
                .map(|o| o.id);
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
        if !order.names(&self.agent_id) {
            return Err(refuse(format!(
                "the order does not name this agent ({}): it was made for other agents",
                self.agent_id
            )));
        }
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

    /// Reports, retrying a few times while the deployer does not answer or answers 5xx.
    fn report(&self, report: JobReport) {
        let body = fitting(report.clone());
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=6 {
            match self.post("/v1/jobs/result", &body, POLL_TIMEOUT) {
                Ok(_) => return,
                Err(e) if attempt < 6 && e.is_passing() => std::thread::sleep(wait),
                Err(e) => {
                    say!(
                        "job {}: cannot report its result: {}",
                        report.job_id,
                        muscle_protocol::causes(&e)
                    );
                    return;
                }
            }
            wait *= 2;
        }
    }
}

/// The report as a body the deployer takes: output full of control characters grows sixfold
/// as JSON, so both streams are halved until it fits (the reason is clipped already).
fn fitting(mut report: JobReport) -> Vec<u8> {
    loop {
        let body = serde_json::to_vec(&report).expect("a report serialises");
        if body.len() <= MAX_CHECKIN_BYTES - 1024
            || (report.stdout.is_empty() && report.stderr.is_empty())
        {
            return body;
        }
        for text in [&mut report.stdout, &mut report.stderr] {
            let keep = floor_char_boundary(text, text.len() / 2);
            report.truncated_bytes += (text.len() - keep) as u64;
            text.truncate(keep);
        }
    }
}

fn clip(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
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
    let mut cmd = Command::new(&order.argv[0]);
    for secret in muscle_protocol::AGENT_ONLY_ENV {
        cmd.env_remove(secret);
    }
    let spawned = cmd
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
            let reason = clip(&format!("{}: {e}", order.argv[0]), MAX_JOB_REASON_CHARS);
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
    let pid = child.id();
    let ended = loop {
        match crate::process::has_exited(pid) {
            Ok(true) => break Ok(true),
            Ok(false) if Instant::now() >= deadline => break Ok(false),
            Ok(false) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(e),
        }
    };
    // Not reaped yet, so its pid still names its group: what the job left behind goes with
    // it (and lets the readers finish).
    kill_group(pid);
    let status = child.wait();
    // A process that left the group (setsid) may hold the output open: not waited for long.
    let reader_deadline = Instant::now() + READER_GRACE;
    let (out, out_extra) = stdout.finish(reader_deadline);
    let (err, err_extra) = stderr.finish(reader_deadline);
    let outcome = match (ended, status) {
        (Ok(false), _) => JobOutcome::TimedOut,
        (Err(e), _) | (Ok(true), Err(e)) => JobOutcome::FailedToStart {
            reason: format!("cannot wait for it: {e}"),
        },
        (Ok(true), Ok(s)) => match (s.code(), s.signal()) {
            (Some(code), _) => JobOutcome::Exited { code },
            (_, signal) => JobOutcome::Killed {
                signal: signal.unwrap_or(0),
            },
        },
    };
    report(outcome, out, err, out_extra + err_extra)
}

fn kill_group(pid: u32) {
    crate::process::signal_pid_group(pid, libc::SIGKILL);
}

/// How long the output of an ended job is still read.
const READER_GRACE: Duration = Duration::from_secs(2);

/// A stream read to its end on a thread: the first [`MAX_JOB_OUTPUT`] bytes as text, and how
/// many bytes came after.
struct Capture(std::thread::JoinHandle<(String, u64)>);

impl Capture {
    /// What was read, waiting for the end of the stream until `deadline`; past it, what the
    /// job printed is lost (said in the output) but the report goes.
    fn finish(self, deadline: Instant) -> (String, u64) {
        while !self.0.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !self.0.is_finished() {
            let lost =
                "(output not read: a process that left the job's process group holds it open)\n";
            return (lost.to_owned(), 0);
        }
        self.0.join().unwrap_or_default()
    }
}

fn capture(stream: Option<impl Read + Send + 'static>) -> Capture {
    Capture(std::thread::spawn(move || {
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
    }))
}

/// The largest char boundary of `s` at or before `at`.
pub(crate) fn floor_char_boundary(s: &str, at: usize) -> usize {
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
            agents: vec![agent()],
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

    /// A process that leaves the job's group keeps the output open: the report goes anyway.
    #[test]
    fn a_process_escaping_the_group_does_not_hold_the_report() {
        let started = Instant::now();
        let r = run(
            &order(&["sh", "-c", "setsid sleep 5 & echo bye"], 5000),
            agent(),
        );
        assert_eq!(r.outcome, JobOutcome::Exited { code: 0 });
        assert!(started.elapsed() < Duration::from_secs(4), "{r:?}");
    }

    /// Whatever the reason and output hold, a report ends up small enough to send.
    #[test]
    fn every_report_fits_a_request() {
        let r = JobReport {
            agent_id: agent(),
            job_id: JobId::new([1; 16]),
            outcome: JobOutcome::Refused {
                reason: clip(&"\u{1}".repeat(100_000), MAX_JOB_REASON_CHARS),
            },
            stdout: "\u{1}".repeat(MAX_JOB_OUTPUT),
            stderr: "\u{2}".repeat(MAX_JOB_OUTPUT),
            truncated_bytes: 0,
            duration_ms: 1,
        };
        assert!(fitting(r).len() <= MAX_CHECKIN_BYTES - 1024);
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

    /// What a key-pinning agent refuses: unsigned, signed by another key, signed for other
    /// agents, expired, seen before. A signed order naming it is taken once.
    #[test]
    fn a_key_pinning_agent_takes_only_signed_orders_made_for_it_once() {
        let dir = std::env::temp_dir().join(format!("muscle-accept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = muscle_protocol::SigningKey::from_seed(&[3; 32]);
        let stranger = muscle_protocol::SigningKey::from_seed(&[4; 32]);
        let runner = JobRunner {
            servers: crate::servers::Servers::new(vec!["http://127.0.0.1:9".into()]),
            state_dir: dir.clone(),
            agent_id: agent(),
            http: ureq::agent(),
            trusted_keys: vec![muscle_protocol::parse_public_key(
                &muscle_protocol::public_key_hex(&key),
            )
            .unwrap()],
            needs_credential: false,
        };
        let seen = Mutex::new(Seen::load(&dir.join("jobs-seen")));
        let offer = |o: &JobOrder, k: Option<&muscle_protocol::SigningKey>| {
            let text = serde_json::to_string(o).unwrap();
            let signature = k.map(|k| muscle_protocol::sign(k, &JobOrder::signed_bytes(&text)));
            JobOffer {
                order: text,
                signature,
            }
        };
        let refusal = |o: &JobOffer| runner.accept(o, &seen).unwrap_err().1;
        let mine = order(&["true"], 1000);
        assert!(refusal(&offer(&mine, None)).contains("the job is not signed"));
        assert!(refusal(&offer(&mine, Some(&stranger))).contains("does not verify"));
        // The release signature's bytes are not a job's.
        let text = serde_json::to_string(&mine).unwrap();
        let bare = JobOffer {
            signature: Some(muscle_protocol::sign(&key, text.as_bytes())),
            order: text,
        };
        assert!(refusal(&bare).contains("does not verify"));
        let others = JobOrder {
            agents: vec![Name::parse("b2").unwrap()],
            ..mine.clone()
        };
        assert!(refusal(&offer(&others, Some(&key))).contains("does not name this agent"));
        let old = JobOrder {
            not_after: 1,
            ..mine.clone()
        };
        assert!(refusal(&offer(&old, Some(&key))).contains("expired"));
        assert!(runner.accept(&offer(&mine, Some(&key)), &seen).is_ok());
        assert!(refusal(&offer(&mine, Some(&key))).contains("ran that job already"));
        std::fs::remove_dir_all(&dir).unwrap();
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
