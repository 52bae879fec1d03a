//! A simulated fleet at scale: thousands of agents speaking the real check-in protocol (at
//! their interval, installing what they are told and reporting it healthy after their
//! probation) against one deployer on SQLite, one on PostgreSQL and two replicas sharing it.
//! Measured from outside: sustained check-ins/s, latency, the deployers' RSS, and a rollout to
//! every simulated agent beside its floor.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use muscle_e2e::{Artifacts, Backends, Deployer, Postgres};
use muscle_protocol::{CheckinResponse, DesiredEntry};
use serde_json::json;

use super::measure::{one, rss_kib};
use super::{Row, Settings};

/// Every simulated agent checks in this often, as a real one does by default.
const INTERVAL: Duration = Duration::from_secs(5);
const MIN_HEALTHY: Duration = Duration::from_secs(1);
/// Connections per deployer replica, each carrying its share of the agents.
const CONNECTIONS: usize = 48;
const APP: &str = "hello-service";

#[derive(Clone, Copy)]
enum Setup {
    Sqlite,
    Postgres { replicas: usize },
}

impl Setup {
    fn name(self) -> String {
        match self {
            Setup::Sqlite => "SQLite, 1 deployer".into(),
            Setup::Postgres { replicas: 1 } => "PostgreSQL, 1 deployer".into(),
            Setup::Postgres { replicas } => format!("PostgreSQL, {replicas} replicas"),
        }
    }
}

pub fn rows(s: &Settings, deployer: &std::path::Path, hello: &Artifacts) -> Result<Vec<Row>> {
    let agents = if s.quick { 1_000 } else { 10_000 };
    let mut rows = Vec::new();
    for setup in [
        Setup::Sqlite,
        Setup::Postgres { replicas: 1 },
        Setup::Postgres { replicas: 2 },
    ] {
        eprintln!("bench: {agents} simulated agents, {}", setup.name());
        rows.extend(scenario(s, setup, agents, deployer, hello)?);
    }
    Ok(rows)
}

fn scenario(
    s: &Settings,
    setup: Setup,
    agents: usize,
    bin: &std::path::Path,
    hello: &Artifacts,
) -> Result<Vec<Row>> {
    let dir = s.dir.join(format!(
        "fleet-load-{}",
        setup.name().replace([' ', ','], "-")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (pg, replicas) = match setup {
        Setup::Sqlite => (None, 1),
        Setup::Postgres { replicas } => (Some(Postgres::start(&dir.join("postgresql"))?), replicas),
    };
    let backends = Backends {
        database: pg.as_ref().map(|pg| pg.database("muscle")).transpose()?,
        ..Default::default()
    };
    let deployers = (0..replicas)
        .map(|i| Deployer::start_on(bin, &dir.join(format!("replica-{i}")), &backends, &[]))
        .collect::<Result<Vec<_>>>()?;
    deployers[0].publish(&hello.dir)?;
    let urls: Vec<String> = deployers.iter().map(Deployer::url).collect();
    let fleet = SimFleet::start(agents, &urls);

    // Every agent joins (within about one interval); then the rollout to all of them. A rollout
    // started before some had joined would take them in as late joiners, in waves of its own.
    muscle_e2e::wait_until(
        "every simulated agent to join",
        Duration::from_secs(120),
        || {
            std::thread::sleep(Duration::from_secs(1));
            Ok((deployers[0].fleet()?.len() >= agents).then_some(()))
        },
    )?;
    let max_parallel = (agents / 5).to_string();
    let started = Instant::now();
    let out = deployers[0].ok(&[
        "rollout",
        "start",
        APP,
        "0.1.0",
        "--selector",
        "sim=1",
        "--canary-per-arch",
        "1",
        "--max-parallel",
        &max_parallel,
        "--min-healthy-time",
        "1s",
        "--service",
        &super::scenarios::service_spec(),
    ])?;
    let id: i64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.trim_end_matches(':').parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no rollout id in {out:?}"))?;
    let r = deployers[replicas - 1].wait_rollout_end(id, Duration::from_secs(600))?;
    let converged = started.elapsed().as_secs_f64();
    ensure!(
        r["status"] == "succeeded",
        "the rollout to the simulated fleet ended {}: {}",
        r["status"],
        r["message"]
    );
    let waves = r["waves"].as_array().map_or(0, Vec::len) as f64;

    // A steady window after it, as a fleet runs day to day: every agent runs the app and the
    // rollout stands (the engine keeps admitting late joiners); RSS after a rollout to all.
    let window = if s.quick {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(20)
    };
    let steady = fleet.measure(window);
    let rss_mib = deployers
        .iter()
        .filter_map(Deployer::pid)
        .map(|pid| rss_kib(pid).unwrap_or(0.0) / 1024.0)
        .fold(0.0, f64::max);
    ensure!(
        steady.errors == 0,
        "{} check-ins failed in the steady window",
        steady.errors
    );
    // The console while every agent still checks in.
    let console = super::console::rows(&urls[0], agents, &dir)?;
    fleet.stop();

    let name = setup.name();
    let offered = agents as f64 / INTERVAL.as_secs_f64();
    let mut rows = vec![
        Row::new(format!("{agents} simulated agents, {name}: check-ins/s sustained"), "req/s", one(steady.rate), format!("offered: {agents} agents every {}s", INTERVAL.as_secs()), one(offered)),
        Row::new("  check-in latency p50", "ms", one(steady.p50_ms), "goal (p99)", one(50.0)),
        Row::new("  check-in latency p99", "ms", one(steady.p99_ms), "goal", one(50.0)),
        Row::new("  deployer RSS (largest replica)", "MiB", one(rss_mib), "goal", one(64.0)),
        Row::new(format!("  rollout to all {agents}, {waves:.0} waves (canary per arch, batches of {max_parallel})"), "s", one(converged), format!("floor: waves x (interval {}s + min_healthy_time 1s)", INTERVAL.as_secs()), one(waves * (INTERVAL + MIN_HEALTHY).as_secs_f64())),
    ];
    rows.extend(console);
    Ok(rows)
}

/// What a steady window measured.
struct Steady {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

/// One simulated agent: what it runs and when it checks in next.
struct SimAgent {
    id: String,
    arch: &'static str,
    generation: u64,
    installed: Option<String>,
    installed_at: Instant,
    /// Its next check-in reports a change (an install through probation).
    changed: bool,
}

impl SimAgent {
    fn body(&self) -> Vec<u8> {
        let apps = match &self.installed {
            None => json!([]),
            Some(v) => json!([{
                "app": APP, "installed_version": v, "running_version": v, "health": "healthy",
                "healthy_for_ms": self.installed_at.elapsed().as_millis() as u64,
                "restarts": 0, "failed_version": null, "last_error": null, "log_tail": null,
            }]),
        };
        serde_json::to_vec(&json!({
            "agent_id": self.id, "arch": self.arch, "hostname": self.id,
            "labels": {"sim": "1"}, "agent_version": "0.1.0", "generation": self.generation,
            "interval_ms": INTERVAL.as_millis() as u64, "changed": self.changed, "apps": apps,
        }))
        .expect("a report serialises")
    }

    /// Takes in an answer; returns when to check in next.
    fn answer(&mut self, resp: CheckinResponse, now: Instant) -> Instant {
        self.changed = false;
        if resp.unchanged {
            return now + INTERVAL;
        }
        self.generation = resp.generation;
        let desired = resp.apps.into_iter().find_map(|e| match e {
            DesiredEntry::App(a) if a.app.as_str() == APP => Some(a.version.to_string()),
            _ => None,
        });
        if desired.is_none() || desired == self.installed {
            return now + INTERVAL;
        }
        // Installed and through probation: reported at once, as a real agent does.
        self.installed = desired;
        self.installed_at = now;
        self.changed = true;
        now + MIN_HEALTHY + Duration::from_millis(100)
    }
}

#[derive(Default)]
struct Tally {
    /// (when answered, latency in ms)
    latencies: Vec<(Instant, f32)>,
    errors: Vec<Instant>,
}

struct SimFleet {
    stop: Arc<AtomicBool>,
    tallies: Vec<Arc<Mutex<Tally>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SimFleet {
    /// `count` agents, half x86_64 and half aarch64, spread over [`CONNECTIONS`] connections per
    /// URL; their first check-ins spread over one interval.
    fn start(count: usize, urls: &[String]) -> SimFleet {
        let stop = Arc::new(AtomicBool::new(false));
        let connections = CONNECTIONS * urls.len();
        let start = Instant::now();
        let mut tallies = Vec::new();
        let mut threads = Vec::new();
        for c in 0..connections {
            let url = format!("{}/v1/checkin", urls[c % urls.len()]);
            let agents: Vec<SimAgent> = (c..count)
                .step_by(connections)
                .map(|i| {
                    let arch = if i % 2 == 0 { "x86_64" } else { "aarch64" };
                    SimAgent {
                        id: format!("sim-{arch}-{i:05}"),
                        arch,
                        generation: 0,
                        installed: None,
                        installed_at: start,
                        changed: false,
                    }
                })
                .collect();
            let tally = Arc::new(Mutex::new(Tally::default()));
            tallies.push(tally.clone());
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                connection(&url, agents, &tally, &stop)
            }));
        }
        SimFleet {
            stop,
            tallies,
            threads,
        }
    }

    /// Check-ins answered during the next `window`, and their latencies.
    fn measure(&self, window: Duration) -> Steady {
        let from = Instant::now();
        std::thread::sleep(window);
        let to = Instant::now();
        let mut latencies = Vec::new();
        let mut errors = 0;
        for t in &self.tallies {
            let t = t.lock().unwrap_or_else(|p| p.into_inner());
            latencies.extend(
                t.latencies
                    .iter()
                    .filter(|(at, _)| (from..to).contains(at))
                    .map(|&(_, ms)| ms),
            );
            errors += t
                .errors
                .iter()
                .filter(|at| (from..to).contains(*at))
                .count();
        }
        latencies.sort_by(f32::total_cmp);
        let at = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f32::NAN) as f64
        };
        Steady {
            rate: latencies.len() as f64 / (to - from).as_secs_f64(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            errors,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// One keep-alive connection carrying its agents' check-ins, each when it is due.
fn connection(url: &str, mut agents: Vec<SimAgent>, tally: &Mutex<Tally>, stop: &AtomicBool) {
    let http = ureq::AgentBuilder::new()
        .max_idle_connections_per_host(1)
        .timeout(Duration::from_secs(10))
        .build();
    // First check-ins spread over one interval, as agents started at random times.
    let mut due: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    let start = Instant::now();
    let n = agents.len().max(1);
    for i in 0..agents.len() {
        due.push(Reverse((start + INTERVAL.mul_f64(i as f64 / n as f64), i)));
    }
    while let Some(Reverse((at, i))) = due.pop() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let agent = &mut agents[i];
        let sent = Instant::now();
        let answer = http
            .post(url)
            .set("Content-Type", "application/json")
            .send_bytes(&agent.body())
            .map_err(anyhow::Error::from)
            .and_then(|r| {
                Ok(serde_json::from_reader::<_, CheckinResponse>(
                    r.into_reader(),
                )?)
            });
        let now = Instant::now();
        let next = match answer {
            Ok(resp) => {
                // From when it was due: a check-in held up behind a slow one counts its wait.
                let ms = (now - at.min(sent)).as_secs_f32() * 1000.0;
                tally
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .latencies
                    .push((now, ms));
                agent.answer(resp, now)
            }
            Err(_) => {
                tally
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .errors
                    .push(now);
                now + INTERVAL
            }
        };
        due.push(Reverse((next, i)));
    }
}
