//! One suite for every [`Store`] backend: the same cases on SQLite and on a real PostgreSQL
//! (a throwaway cluster started by the test harness), each on an empty store.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use muscle_protocol::{CheckinRequest, Health, JobId, JobReport, LogBatch, LogRequest};
use serde_json::json;

use super::*;
use crate::rollout::{Params, Request, Rollout, Status};

type Case = fn(&dyn Store);

const CASES: &[(&str, Case)] = &[
    ("releases", releases),
    ("check-ins", check_ins),
    ("credentials and probes", credentials_and_probes),
    ("assignments and tombstones", assignments_and_tombstones),
    ("rollout steps", rollout_steps),
    ("jobs", jobs),
    ("log requests", log_requests),
    ("tokens and audit", tokens_and_audit),
    ("history", history),
    ("images", images),
    ("boot tokens", boot_tokens),
];

/// Runs every case on a fresh store from `open`, naming the case that fails.
fn run(backend: &str, mut open: impl FnMut(&str) -> Box<dyn Store>) {
    for (name, case) in CASES {
        eprintln!("store suite on {backend}: {name}");
        let store = open(&name.replace(' ', "_"));
        case(store.as_ref());
    }
}

#[test]
fn the_store_suite_passes_on_sqlite() {
    let root = std::env::temp_dir().join(format!("muscle-suite-{}", std::process::id()));
    run("SQLite", |name| {
        Box::new(SqliteStore::open(&root.join(name)).expect("SQLite opens"))
    });
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_store_suite_passes_on_postgresql() {
    let dir = std::env::temp_dir().join(format!("muscle-suite-pg-{}", std::process::id()));
    let pg = muscle_e2e::Postgres::start(&dir).expect("a throwaway PostgreSQL cluster");
    run("PostgreSQL", |name| {
        let url = pg.database(name).expect("createdb");
        Box::new(PgStore::connect(&url).expect("PostgreSQL connects and migrates"))
    });
    // A second deployer on the same database finds its schema in place.
    let url = pg.url("releases");
    assert!(PgStore::connect(&url).unwrap().releases().unwrap().len() == 2);
    two_replicas_on_one_database(&pg.database("replicas").unwrap());
}

/// What replicas sharing a database rely on: one engine at a time, taken over when its holder
/// goes; a flush never overwrites a report another replica wrote; job slots shared.
fn two_replicas_on_one_database(url: &str) {
    let first = PgStore::connect(url).unwrap();
    let second = PgStore::connect(url).unwrap();
    assert_eq!(
        first.engine_lease().unwrap(),
        EngineLease::Held { taken: true }
    );
    assert_eq!(
        first.engine_lease().unwrap(),
        EngineLease::Held { taken: false }
    );
    assert_eq!(second.engine_lease().unwrap(), EngineLease::Elsewhere);

    // first keeps a steady check-in; second then writes a changed report (its clock behind).
    let mut req = checkin("a1");
    first.record_checkin(&req, 100).unwrap();
    first.record_checkin(&req, 200).unwrap();
    req.apps[0].health = Health::Unhealthy;
    second.record_checkin(&req, 150).unwrap();
    first.flush_checkins().unwrap();
    assert_eq!(first.agents().unwrap()[0].apps[0].health, Health::Unhealthy);

    let targets = [
        ("a1".to_owned(), "x86_64".to_owned()),
        ("a2".into(), "x86_64".into()),
    ];
    first.create_job(&job(JOB, 1000, 1), &targets).unwrap();
    let taken =
        first.claim_jobs("a1", 1001).unwrap().len() + second.claim_jobs("a2", 1001).unwrap().len();
    assert_eq!(taken, 1, "max_parallel holds across replicas");

    drop(first);
    let mut lease = EngineLease::Elsewhere;
    for _ in 0..50 {
        lease = second.engine_lease().unwrap();
        if lease != EngineLease::Elsewhere {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(lease, EngineLease::Held { taken: true }, "taken over");
}

fn release(version: &str, manifest: &str, published_ms: u64) -> ReleaseRecord {
    ReleaseRecord {
        app: "web".into(),
        version: version.into(),
        counter: 1,
        manifest: manifest.into(),
        signature: None,
        published_ms,
    }
}

fn releases(s: &dyn Store) {
    assert!(matches!(
        s.put_release(&release("1.0.0", "m1", 10)).unwrap(),
        PutOutcome::Inserted
    ));
    assert!(matches!(
        s.put_release(&release("1.0.0", "m1", 11)).unwrap(),
        PutOutcome::Identical
    ));
    assert!(matches!(
        s.put_release(&release("1.0.0", "other", 12)).unwrap(),
        PutOutcome::Conflict
    ));
    s.put_release(&release("0.9.0", "m0", 20)).unwrap();
    assert_eq!(s.release("web", "1.0.0").unwrap().unwrap().manifest, "m1");
    assert!(s.release("web", "2.0.0").unwrap().is_none());
    let versions: Vec<String> = s
        .releases()
        .unwrap()
        .into_iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(
        versions,
        ["1.0.0", "0.9.0"],
        "by app, then publication time"
    );
}

fn checkin(agent: &str) -> CheckinRequest {
    serde_json::from_value(json!({
        "agent_id": agent, "arch": "x86_64", "hostname": "h", "labels": {"site": "lab"},
        "agent_version": "0.1.0", "generation": 0,
        "apps": [{"app": "web", "installed_version": "1.0.0", "running_version": "1.0.0",
                  "health": "healthy", "healthy_for_ms": 1000, "failed_version": null,
                  "last_error": null, "log_tail": null}],
    }))
    .unwrap()
}

fn check_ins(s: &dyn Store) {
    let mut req = checkin("a1");
    let seen = |s: &dyn Store| s.agents().unwrap()[0].last_seen_ms;
    let healthy_for = |s: &dyn Store| s.agents().unwrap()[0].apps[0].healthy_for_ms;
    assert!(matches!(
        s.record_checkin(&req, 10).unwrap().previous,
        Previous::New
    ));
    let agent = &s.agents().unwrap()[0];
    assert_eq!(
        (agent.arch.as_str(), agent.labels["site"].as_str()),
        ("x86_64", "lab")
    );
    // The same report but for its times: kept in memory, written by the flush.
    req.apps[0].healthy_for_ms = 2000;
    assert!(matches!(
        s.record_checkin(&req, 20).unwrap().previous,
        Previous::Same
    ));
    assert_eq!((seen(s), healthy_for(s)), (10, 1000));
    assert_eq!(s.flush_checkins().unwrap(), 1);
    assert_eq!((seen(s), healthy_for(s)), (20, 2000));
    assert_eq!(s.flush_checkins().unwrap(), 0);
    // A steady check-in, then a changed one written at once: the flush keeps the newer row.
    s.record_checkin(&req, 30).unwrap();
    req.apps[0].health = Health::Unhealthy;
    let Previous::Changed(before) = s.record_checkin(&req, 40).unwrap().previous else {
        panic!("a changed report is told as changed");
    };
    assert_eq!(before[0].health, Health::Healthy);
    s.flush_checkins().unwrap();
    assert_eq!(seen(s), 40);
    assert_eq!(s.agents().unwrap()[0].apps[0].health, Health::Unhealthy);
    // A report that says it changed is written at once even when it looks the same.
    req.changed = true;
    s.record_checkin(&req, 50).unwrap();
    assert_eq!(seen(s), 50);
}

fn credentials_and_probes(s: &dyn Store) {
    s.record_checkin(&checkin("a1"), 10).unwrap();
    assert_eq!(s.credential_sha256("a1").unwrap(), None);
    assert!(s.set_credential("a1", "c1").unwrap());
    assert!(!s.set_credential("a1", "c2").unwrap(), "set once");
    assert_eq!(s.credential_sha256("a1").unwrap().as_deref(), Some("c1"));
    assert!(!s.set_credential("nobody", "c").unwrap());
    s.record_probe("a1", "n1", 10).unwrap();
    s.record_probe("a1", "n2", 20).unwrap();
    assert!(
        !s.take_probe("a1", "n1").unwrap(),
        "only the last probe counts"
    );
    assert!(s.take_probe("a1", "n2").unwrap());
    assert!(
        !s.take_probe("a1", "n2").unwrap(),
        "each answer is given once"
    );
}

fn assignment(agent: &str) -> Assignment {
    Assignment {
        agent_id: agent.into(),
        app: "web".into(),
        version: "1.0.0".into(),
        service: serde_json::from_str("{}").unwrap(),
        rollout_id: None,
    }
}

fn params() -> Params {
    Params {
        selector: BTreeMap::new(),
        canary_per_arch: 1,
        max_parallel: 1,
        min_healthy_time: Duration::from_secs(1),
        healthy_deadline: Duration::from_secs(30),
        progress_deadline: Duration::from_secs(600),
        max_failures: 0,
        auto_rollback: true,
    }
}

fn planned(s: &dyn Store) -> Rollout {
    let agents = s.agents().unwrap();
    let service = serde_json::from_str("{}").unwrap();
    Rollout::plan("web", "1.0.0", service, params(), &agents, 100).unwrap()
}

/// Commits a step that only assigns (`Some`) or takes off (`None`), outside any stored rollout.
fn assign(s: &dyn Store, agent: &str, a: Option<Assignment>) {
    let r = planned(s);
    let actions = [Action::Assign {
        agent_id: agent.into(),
        app: "web".into(),
        assignment: a,
    }];
    let step = Step {
        rollout: &r,
        from: &r,
        save_rollout: false,
        actions: &actions,
        handled: None,
    };
    assert!(s.commit_step(&step).unwrap());
}

fn generation(s: &dyn Store, agent: &str) -> u64 {
    let a = s.agents().unwrap();
    a.iter().find(|a| a.id == agent).unwrap().desired_generation
}

fn assignments_and_tombstones(s: &dyn Store) {
    s.record_checkin(&checkin("a1"), 10).unwrap();
    s.record_checkin(&checkin("a2"), 10).unwrap();
    assign(s, "a1", Some(assignment("a1")));
    let first = generation(s, "a1");
    assert!(first > 0);
    assert_eq!(s.assignments("a1").unwrap(), [assignment("a1")]);
    assert!(s.holds("a1", "web").unwrap() && !s.holds("a2", "web").unwrap());
    assert!(s.removals("a1").unwrap().is_empty());
    let none = BTreeSet::new();
    let undeploy = |ids: &[String], reporting: &BTreeSet<String>| match s
        .undeploy(&Undeploy {
            app: "web",
            agent_ids: ids,
            reporting,
            withdraw_at_ms: None,
        })
        .unwrap()
    {
        Undeployed::From { agents, .. } => agents,
        other => panic!("{other:?}"),
    };
    assert_eq!(undeploy(&["a1".into(), "a2".into()], &none), ["a1"]);
    assert!(
        generation(s, "a1") > first,
        "a removal is a new desired state"
    );
    assert_eq!(s.removals("a1").unwrap(), ["web"]);
    assert!(s.assignment("a1", "web").unwrap().is_none());
    assert!(s.holds("a1", "web").unwrap(), "a tombstone is held");
    // Nothing left to take off, unless the agent still reports running it.
    assert!(undeploy(&["a1".into()], &none).is_empty());
    let reporting = BTreeSet::from(["a2".to_owned()]);
    assert_eq!(undeploy(&["a1".into(), "a2".into()], &reporting), ["a2"]);
    assign(s, "a1", Some(assignment("a1")));
    assert!(s.removals("a1").unwrap().is_empty());
    // A rollout in progress keeps the app where it is.
    let id = s.create_rollout(&planned(s)).unwrap();
    assert!(matches!(
        s.undeploy(&Undeploy {
            app: "web",
            agent_ids: &["a1".into()],
            reporting: &none,
            withdraw_at_ms: Some(5),
        })
        .unwrap(),
        Undeployed::RolloutInProgress { id: i, status: Status::Running } if i == id
    ));
    assert!(s.assignment("a1", "web").unwrap().is_some());
}

fn rollout_steps(s: &dyn Store) {
    s.record_checkin(&checkin("a1"), 10).unwrap();
    let plan = planned(s);
    let first = s.create_rollout(&plan).unwrap();
    let second = s.create_rollout(&plan).unwrap();
    assert!(second > first);
    let stored = s.rollout(first).unwrap().unwrap();
    assert_eq!(stored.id, first);
    assert_eq!(s.rollouts().unwrap().len(), 2);
    assert!(s.rollout(second + 100).unwrap().is_none());

    s.request_rollout(first, Request::Pause).unwrap();
    assert_eq!(s.rollout_requests().unwrap(), [(first, Request::Pause)]);
    let mut paused = stored.clone();
    paused.status = Status::Paused;
    let actions = [Action::Assign {
        agent_id: "a1".into(),
        app: "web".into(),
        assignment: Some(assignment("a1")),
    }];
    // A request made while the step ran stays queued; the one handled goes.
    s.request_rollout(first, Request::Resume).unwrap();
    let step = Step {
        rollout: &paused,
        from: &stored,
        save_rollout: true,
        actions: &actions,
        handled: Some(Request::Pause),
    };
    assert!(s.commit_step(&step).unwrap());
    assert_eq!(s.rollout(first).unwrap().unwrap().status, Status::Paused);
    assert_eq!(s.rollout_requests().unwrap(), [(first, Request::Resume)]);
    assert!(s.assignment("a1", "web").unwrap().is_some());
    // A step from a state the store no longer holds commits nothing.
    let mut stale = paused.clone();
    stale.status = Status::Aborted;
    let step = Step {
        rollout: &stale,
        from: &stored,
        save_rollout: true,
        actions: &[],
        handled: Some(Request::Resume),
    };
    assert!(!s.commit_step(&step).unwrap());
    assert_eq!(s.rollout(first).unwrap().unwrap().status, Status::Paused);
    assert_eq!(s.rollout_requests().unwrap(), [(first, Request::Resume)]);
}

fn job(id: &str, created_ms: u64, max_parallel: u32) -> JobRecord {
    JobRecord {
        id: JobId::try_from(id.to_owned()).unwrap(),
        created_ms,
        order_json: format!("{{\"id\":\"{id}\"}}"),
        signature: Some("sig".into()),
        selector: vec![("site".into(), "lab".into())],
        max_parallel,
        deadline_ms: created_ms + 60_000,
        timeout_ms: 5_000,
    }
}

fn report(agent: &str, job: &str) -> JobReport {
    serde_json::from_value(json!({
        "agent_id": agent, "job_id": job, "outcome": {"kind": "exited", "code": 0},
        "stdout": "out", "stderr": "", "truncated_bytes": 0, "duration_ms": 3,
    }))
    .unwrap()
}

const JOB: &str = "0123456789abcdef0123456789abcdef";
const OLD_JOB: &str = "fedcba9876543210fedcba9876543210";

fn jobs(s: &dyn Store) {
    let targets = [
        ("a1".to_owned(), "x86_64".to_owned()),
        ("a2".into(), "aarch64".into()),
    ];
    s.create_job(&job(OLD_JOB, 1, 1), &targets[..1]).unwrap();
    // Made a month later: the old job is deleted with it.
    let now = jobs::JOBS_KEPT_MS + 10;
    s.create_job(&job(JOB, now, 1), &targets).unwrap();
    assert_eq!(s.jobs().unwrap().len(), 1);
    assert!(s.has_offers("a1").unwrap() && s.has_offers("a2").unwrap());
    let offers = s.claim_jobs("a1", now + 1).unwrap();
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].signature.as_deref(), Some("sig"));
    assert!(
        s.claim_jobs("a2", now + 2).unwrap().is_empty(),
        "max_parallel 1"
    );
    assert!(s.finish_job(&report("a1", JOB), now + 3).unwrap());
    assert!(
        !s.finish_job(&report("a1", JOB), now + 4).unwrap(),
        "reported once"
    );
    assert_eq!(
        s.claim_jobs("a2", now + 5).unwrap().len(),
        1,
        "the slot is free"
    );
    // a2 never reports: past the timeout and its slack it is lost.
    s.expire_jobs(now + 5 + 5_000 + REPORT_SLACK_MS).unwrap();
    let (record, targets) = s.job(JOB).unwrap().unwrap();
    assert_eq!(record.selector, [("site".to_owned(), "lab".to_owned())]);
    assert_eq!(
        record.order_json,
        job(JOB, now, 1).order_json,
        "the order exactly as signed"
    );
    assert!(
        matches!(&targets[0].state, TargetState::Done { report, .. } if report.stdout == "out")
    );
    assert_eq!(targets[1].state, TargetState::Lost);
    assert!(s.job(OLD_JOB).unwrap().is_none());
}

fn log_requests(s: &dyn Store) {
    let req: LogRequest =
        serde_json::from_value(json!({"id": JOB, "app": "web", "tail": 10, "follow": true}))
            .unwrap();
    s.create_log_request("a1", &req, 1000).unwrap();
    assert!(s.has_offers("a1").unwrap());
    let id = JobId::try_from(JOB.to_owned()).unwrap();
    assert_eq!(s.log_lines(&id, 0).unwrap().state, LogState::Pending);
    assert_eq!(s.claim_log_requests("a1", 1001).unwrap(), [req]);
    assert!(s.claim_log_requests("a1", 1002).unwrap().is_empty());
    let batch = |lines: &[&str], done: bool, agent: &str| -> LogBatch {
        serde_json::from_value(json!({
            "agent_id": agent, "request_id": JOB, "lines": lines, "done": done,
        }))
        .unwrap()
    };
    assert_eq!(
        s.append_log_batch(&batch(&["x"], false, "a2"), 1003)
            .unwrap(),
        None
    );
    assert_eq!(
        s.append_log_batch(&batch(&["one", "two"], false, "a1"), 1003)
            .unwrap(),
        Some(true)
    );
    s.still_wanted(&id, 5000).unwrap();
    assert_eq!(
        s.append_log_batch(&batch(&["three"], true, "a1"), 5001)
            .unwrap(),
        Some(false)
    );
    let progress = s.log_lines(&id, 1).unwrap();
    assert_eq!(progress.state, LogState::Done);
    assert_eq!(
        progress.lines,
        [(2, "two".to_owned()), (3, "three".to_owned())]
    );
    assert_eq!(progress.heard_ms, 5001);
}

fn tokens_and_audit(s: &dyn Store) {
    assert!(s.create_token("ci", Role::Publisher, "h1", 10).unwrap());
    assert!(
        !s.create_token("ci", Role::Operator, "h2", 11).unwrap(),
        "names are unique"
    );
    assert!(s.create_token("ops", Role::Operator, "h3", 12).unwrap());
    assert_eq!(
        s.token("h1").unwrap(),
        Some(("ci".to_owned(), Role::Publisher))
    );
    assert_eq!(s.token("h2").unwrap(), None);
    let names: Vec<String> = s.tokens().unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["ci", "ops"]);
    assert!(s.revoke_token("ci").unwrap() && !s.revoke_token("ci").unwrap());
    assert_eq!(s.token("h1").unwrap(), None);
    for (at_ms, id) in [(1, 7), (2, 8), (3, 9)] {
        s.record(&AuditEntry {
            at_ms,
            who: "local:root".into(),
            change: Change::RolloutRequest {
                rollout: id,
                request: Request::Pause,
            },
        })
        .unwrap();
    }
    let at: Vec<u64> = s.audit(2).unwrap().iter().map(|e| e.at_ms).collect();
    assert_eq!(at, [2, 3], "the newest, oldest first");
    assert!(matches!(
        s.audit(1).unwrap()[0].change,
        Change::RolloutRequest { rollout: 9, .. }
    ));
}

fn history(s: &dyn Store) {
    let removed = |i: usize| AgentEvent::Removed {
        app: format!("app{i}"),
    };
    let events: Vec<AgentEvent> = (0..history::EVENTS_KEPT_PER_AGENT as usize + 5)
        .map(removed)
        .collect();
    s.add_events("a1", 10, &events).unwrap();
    s.add_events("a2", 20, &[removed(0)]).unwrap();
    let kept = s.events("a1", 1000).unwrap();
    assert_eq!(kept.len(), history::EVENTS_KEPT_PER_AGENT as usize);
    assert_eq!(kept[0].event, removed(5), "the oldest are dropped");
    let newest = s.events("a1", 2).unwrap();
    assert_eq!(
        newest.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        [removed(events.len() - 2), removed(events.len() - 1)]
    );
    assert_eq!(s.events("a2", 10).unwrap().len(), 1);
}

fn image(version: &str, manifest: &str, published_ms: u64) -> ImageRecord {
    ImageRecord {
        name: "muscle-image".into(),
        version: version.into(),
        manifest: manifest.into(),
        signature: Some("sig".into()),
        published_ms,
    }
}

fn images(s: &dyn Store) {
    assert!(matches!(
        s.put_image(&image("2", "m2", 20)).unwrap(),
        PutOutcome::Inserted
    ));
    assert!(matches!(
        s.put_image(&image("2", "m2", 21)).unwrap(),
        PutOutcome::Identical
    ));
    assert!(matches!(
        s.put_image(&image("2", "other", 22)).unwrap(),
        PutOutcome::Conflict
    ));
    // Published later by a replica whose clock is behind: still the newer.
    s.put_image(&image("1", "m1", 5)).unwrap();
    assert_eq!(
        s.image("muscle-image", "2").unwrap(),
        Some(image("2", "m2", 20))
    );
    assert_eq!(s.image("muscle-image", "3").unwrap(), None);
    let order: Vec<String> = s.images().unwrap().into_iter().map(|i| i.version).collect();
    assert_eq!(order, ["2", "1"], "in the order they were published");
}

fn boot_tokens(s: &dyn Store) {
    let (a, b) = ("muscle-52-54-00-00-00-01", "muscle-52-54-00-00-00-02");
    s.issue_boot_token(a, "old", 0, 1_000).unwrap();
    s.issue_boot_token(a, "new", 0, 1_000).unwrap();
    assert!(
        !s.boot_token_valid(a, "old", 10).unwrap(),
        "replaced by the next boot's"
    );
    assert!(
        !s.boot_token_valid(b, "new", 10).unwrap(),
        "another machine's"
    );
    assert!(!s.boot_token_valid(a, "new", 1_000).unwrap(), "expired");
    assert!(s.boot_token_valid(a, "new", 999).unwrap());
    // Enrolment needs the agent recorded (its check-in comes first).
    assert!(!s.enrol_machine(a, "new", "c1", 999).unwrap());
    s.issue_boot_token(a, "new", 0, 1_000).unwrap();
    s.record_checkin(&checkin(a), 5).unwrap();
    assert!(s.enrol_machine(a, "new", "c1", 999).unwrap());
    assert!(!s.enrol_machine(a, "new", "c2", 999).unwrap(), "taken once");
    assert_eq!(s.credential_sha256(a).unwrap().as_deref(), Some("c1"));
    // The next boot replaces its credential.
    s.issue_boot_token(a, "next", 2_000, 3_000).unwrap();
    assert!(s.enrol_machine(a, "next", "c2", 2_500).unwrap());
    assert_eq!(s.credential_sha256(a).unwrap().as_deref(), Some("c2"));
    // An agent enrolled with the fleet's token is never taken over by a boot token.
    s.record_checkin(&checkin(b), 5).unwrap();
    assert!(s.set_credential(b, "fleet").unwrap());
    s.issue_boot_token(b, "grab", 2_000, 3_000).unwrap();
    assert!(!s.boot_token_valid(b, "grab", 2_500).unwrap());
    assert!(!s.enrol_machine(b, "grab", "mine", 2_500).unwrap());
    assert_eq!(s.credential_sha256(b).unwrap().as_deref(), Some("fleet"));
}
