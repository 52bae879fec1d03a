//! What both backends do with a check-in before it reaches their tables: the row it writes, and
//! the steady ones (the same report as the agent's last but for its times) kept in memory until
//! the next flush.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use muscle_protocol::CheckinRequest;

use super::history::report_key;
use super::Previous;

/// What every check-in writes to its agent's row, its columns as stored (the rest, written only
/// when the report changed, is serialised then).
pub struct CheckinRow {
    /// [`report_key`] of the check-in: equal to the stored one when nothing but times changed.
    pub key: String,
    pub apps: String,
    pub last_seen_ms: i64,
    pub interval_ms: i64,
    pub clock_skew_s: i64,
}

impl CheckinRow {
    pub fn of(req: &CheckinRequest, now_ms: u64) -> CheckinRow {
        CheckinRow {
            key: report_key(req),
            apps: super::json(&req.apps),
            last_seen_ms: now_ms as i64,
            interval_ms: req.interval_ms.unwrap_or(5000) as i64,
            clock_skew_s: req
                .clock_unix
                .map_or(0, |t| t as i64 - (now_ms / 1000) as i64),
        }
    }
}

/// Whether a check-in may wait for the flush when its report key is the stored one: one that
/// says it changed something or carries a problem is written at once.
pub fn may_wait(req: &CheckinRequest) -> bool {
    !req.changed && req.problem.is_none()
}

/// What the agent reported before, from the stored apps column read only when the report key
/// differed (`None` inside: the same key).
pub fn previous(before: Option<Option<String>>) -> Previous {
    match before {
        None => Previous::New,
        Some(None) => Previous::Same,
        // A report the store cannot read back is history lost, not a failed check-in.
        Some(Some(apps)) => {
            Previous::Changed(super::parse("agent apps", &apps).unwrap_or_default())
        }
    }
}

/// What a steady check-in changes in its agent's row, and the report key it was steady for.
pub struct Steady {
    pub last_seen_ms: i64,
    pub apps: String,
    pub clock_skew_s: i64,
    pub key: String,
}

/// Steady check-ins by agent, written together by `flush_checkins` instead of one write each
/// (in the agents' order).
#[derive(Default)]
pub struct SteadyCheckins(Mutex<BTreeMap<String, Steady>>);

impl SteadyCheckins {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Steady>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn keep(&self, agent_id: &str, row: CheckinRow) {
        self.lock().insert(
            agent_id.to_owned(),
            Steady {
                last_seen_ms: row.last_seen_ms,
                apps: row.apps,
                clock_skew_s: row.clock_skew_s,
                key: row.key,
            },
        );
    }

    /// Drops what was kept for an agent whose row is being written now (it is newer).
    pub fn forget(&self, agent_id: &str) {
        self.lock().remove(agent_id);
    }

    pub fn take(&self) -> BTreeMap<String, Steady> {
        std::mem::take(&mut *self.lock())
    }
}
