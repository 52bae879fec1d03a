//! Ad hoc jobs (`muscle-deploy exec`): one command run on matching agents, each result reported.
//!
//! The operator's [`JobOrder`] travels as the exact JSON bytes it was signed as, so that an
//! agent pinning keys checks what the operator signed, not what a deployer re-serialised. The
//! signature covers [`JOB_SIGNING_CONTEXT`] followed by those bytes: a release signature can
//! never pass for a job's.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::serde_dur;
use crate::Name;

/// Prefixed to an order's bytes before signing.
pub const JOB_SIGNING_CONTEXT: &[u8] = b"muscle-job-order-v1\n";

/// The most of each of stdout and stderr an agent reports; the rest is counted, not sent.
pub const MAX_JOB_OUTPUT: usize = 64 * 1024;

/// The longest a job may run.
pub const MAX_JOB_TIMEOUT: Duration = Duration::from_secs(3600);

/// The most bytes of a job's command line (all arguments together).
pub const MAX_JOB_ARGV_BYTES: usize = 16 * 1024;

/// The most characters of a refusal's or start failure's reason an agent reports.
pub const MAX_JOB_REASON_CHARS: usize = 1024;

/// What the operator asks agents to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobOrder {
    /// Unique per job (random): an agent runs an order once.
    pub id: JobId,
    pub argv: Vec<String>,
    #[serde(with = "serde_dur")]
    pub timeout: Duration,
    /// Unix seconds after which agents refuse the order: a captured order cannot be replayed
    /// later.
    pub not_after: u64,
    /// The agents the operator chose: an agent not named refuses the order, so a signed job
    /// cannot be sent to agents it was not made for.
    pub agents: Vec<Name>,
}

impl JobOrder {
    /// An order an agent can run: a program, no control characters, a timeout within
    /// [`MAX_JOB_TIMEOUT`].
    pub fn check(&self) -> Result<(), String> {
        if self.argv.first().is_none_or(|p| p.is_empty()) {
            return Err("the job has no command".into());
        }
        let bytes: usize = self.argv.iter().map(String::len).sum();
        if bytes > MAX_JOB_ARGV_BYTES {
            return Err(format!(
                "the job's command line is {bytes} bytes; at most {MAX_JOB_ARGV_BYTES}"
            ));
        }
        if let Some(i) = self.argv.iter().position(|a| a.contains('\0')) {
            return Err(format!("job argument {i} holds a NUL byte"));
        }
        if self.timeout.is_zero() || self.timeout > MAX_JOB_TIMEOUT {
            return Err(format!(
                "job timeout {:?}: expected more than 0 and at most {MAX_JOB_TIMEOUT:?}",
                self.timeout
            ));
        }
        Ok(())
    }

    /// The bytes an operator key signs for `order_json`.
    pub fn names(&self, agent: &Name) -> bool {
        self.agents.contains(agent)
    }

    pub fn signed_bytes(order_json: &str) -> Vec<u8> {
        [JOB_SIGNING_CONTEXT, order_json.as_bytes()].concat()
    }
}

/// A job's id: 32 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    pub fn new(random: [u8; 16]) -> JobId {
        JobId(hex::encode(random))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = String;
    fn try_from(s: String) -> Result<JobId, String> {
        if s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(JobId(s))
        } else {
            Err(format!("job id {s:?}: expected 32 lowercase hex digits"))
        }
    }
}

impl From<JobId> for String {
    fn from(j: JobId) -> String {
        j.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An agent asks for its jobs (`POST /v1/jobs/poll`); the deployer holds the request until one
/// is there or about 20 s have passed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobPoll {
    pub agent_id: Name,
}

/// The jobs and log requests handed to an agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobOffers {
    pub jobs: Vec<JobOffer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogRequest>,
}

/// `muscle-deploy logs AGENT APP`: the agent sends the last `tail` lines of the app's log (those
/// since `since_unix`, when given), then, with `follow`, new lines as they are written, in
/// [`LogBatch`]es over its own outbound connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRequest {
    pub id: JobId,
    pub app: Name,
    pub tail: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix: Option<u64>,
    #[serde(default)]
    pub follow: bool,
}

/// The most lines a tail may ask for.
pub const MAX_LOG_TAIL: u32 = 10_000;

/// The most bytes of lines in one [`LogBatch`].
pub const MAX_LOG_BATCH: usize = 128 * 1024;

/// Lines of a log an agent sends (`POST /v1/logs/batch`); answered with [`LogAck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    pub agent_id: Name,
    pub request_id: JobId,
    pub lines: Vec<String>,
    /// The last batch: the tail is sent (without follow), or following ended.
    #[serde(default)]
    pub done: bool,
    /// Why the log cannot be sent (no such app here, no log file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether the one who asked still wants more lines: when not, the agent stops following.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogAck {
    pub more: bool,
}

/// One order as signed (its JSON text), with the operator's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOffer {
    pub order: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// How a job ended on one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobOutcome {
    Exited {
        code: i32,
    },
    Killed {
        signal: i32,
    },
    TimedOut,
    /// The agent would not run it (unsigned or badly signed for a key-pinning agent, expired,
    /// seen before, unreadable).
    Refused {
        reason: String,
    },
    /// The command could not be started (no such program, ...).
    FailedToStart {
        reason: String,
    },
}

impl JobOutcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, JobOutcome::Exited { code: 0 })
    }
}

impl std::fmt::Display for JobOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobOutcome::Exited { code } => write!(f, "exit {code}"),
            JobOutcome::Killed { signal } => write!(f, "killed by signal {signal}"),
            JobOutcome::TimedOut => f.write_str("timed out"),
            JobOutcome::Refused { reason } => write!(f, "refused: {reason}"),
            JobOutcome::FailedToStart { reason } => write!(f, "failed to start: {reason}"),
        }
    }
}

/// What an agent reports of one job (`POST /v1/jobs/result`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    pub agent_id: Name,
    pub job_id: JobId,
    pub outcome: JobOutcome,
    /// At most [`MAX_JOB_OUTPUT`] bytes of each, lossily decoded.
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
    /// Bytes of output past what is reported.
    #[serde(default)]
    pub truncated_bytes: u64,
    #[serde(default)]
    pub duration_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_checked_and_ids_are_hex() {
        let order: JobOrder = serde_json::from_str(
            r#"{"id": "0123456789abcdef0123456789abcdef", "argv": ["uname", "-m"], "timeout": "30s", "not_after": 1, "agents": ["a1"]}"#,
        )
        .unwrap();
        assert!(order.check().is_ok());
        let empty = JobOrder {
            argv: vec![],
            ..order.clone()
        };
        assert!(empty.check().unwrap_err().contains("no command"));
        let long = JobOrder {
            timeout: Duration::from_secs(7200),
            ..order
        };
        assert!(long.check().unwrap_err().contains("at most"));
        assert!(long.names(&Name::parse("a1").unwrap()));
        assert!(!long.names(&Name::parse("a2").unwrap()));
        let huge = JobOrder {
            argv: vec!["x".repeat(MAX_JOB_ARGV_BYTES + 1)],
            ..long
        };
        assert!(huge.check().unwrap_err().contains("bytes"));
        assert!(serde_json::from_str::<JobId>(r#""../x""#).is_err());
        let signed = JobOrder::signed_bytes("{}");
        assert!(signed.starts_with(JOB_SIGNING_CONTEXT));
    }
}
