//! How the agent runs and judges a service.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::serde_dur;
use crate::{Limits, Name, Sandbox, UserName};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// The binary of the release to run; default: the app's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<Name>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub health: HealthCheck,
    /// How long the service must stay healthy before a new version is committed.
    #[serde(with = "serde_dur", default = "defaults::min_healthy_time")]
    pub min_healthy_time: Duration,
    /// How long a new version has to become healthy for `min_healthy_time`.
    #[serde(with = "serde_dur", default = "defaults::healthy_deadline")]
    pub healthy_deadline: Duration,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default = "defaults::stop_signal")]
    pub stop_signal: String,
    #[serde(with = "serde_dur", default = "defaults::stop_grace")]
    pub stop_grace: Duration,
    /// Memory, CPU and process limits (cgroups under the built-in supervisor, `MemoryMax=`,
    /// `CPUQuota=`, `TasksMax=` under systemd).
    #[serde(default, skip_serializing_if = "Limits::is_none")]
    pub limits: Limits,
    /// The unprivileged user the service runs as, created if missing (like systemd's
    /// `DynamicUser=`); default: a dynamic user under systemd, the agent's own user otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserName>,
    /// What the service's sandbox lets through beyond the defaults.
    #[serde(default, skip_serializing_if = "Sandbox::is_default")]
    pub sandbox: Sandbox,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum HealthCheck {
    /// Healthy while the process runs.
    #[default]
    None,
    /// `GET url` answers `expect_status`.
    Http {
        url: String,
        #[serde(default = "defaults::status")]
        expect_status: u16,
    },
    /// A TCP connection to `addr` succeeds.
    Tcp { addr: String },
    /// `argv` exits 0.
    Command { argv: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    #[serde(with = "serde_dur", default = "defaults::initial_backoff")]
    pub initial_backoff: Duration,
    #[serde(with = "serde_dur", default = "defaults::max_backoff")]
    pub max_backoff: Duration,
    /// This many restarts within `crash_loop_window` is a crash loop, reported to the server.
    #[serde(default = "defaults::crash_loop_restarts")]
    pub crash_loop_restarts: u32,
    #[serde(with = "serde_dur", default = "defaults::crash_loop_window")]
    pub crash_loop_window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial_backoff: defaults::initial_backoff(),
            max_backoff: defaults::max_backoff(),
            crash_loop_restarts: defaults::crash_loop_restarts(),
            crash_loop_window: defaults::crash_loop_window(),
        }
    }
}

impl Default for ServiceSpec {
    fn default() -> Self {
        ServiceSpec {
            binary: None,
            args: vec![],
            env: BTreeMap::new(),
            working_dir: None,
            health: HealthCheck::None,
            min_healthy_time: defaults::min_healthy_time(),
            healthy_deadline: defaults::healthy_deadline(),
            restart: RestartPolicy::default(),
            stop_signal: defaults::stop_signal(),
            stop_grace: defaults::stop_grace(),
            limits: Limits::default(),
            user: None,
            sandbox: Sandbox::default(),
        }
    }
}

mod defaults {
    use std::time::Duration;
    pub fn min_healthy_time() -> Duration {
        Duration::from_secs(2)
    }
    pub fn healthy_deadline() -> Duration {
        Duration::from_secs(30)
    }
    pub fn stop_signal() -> String {
        "SIGTERM".into()
    }
    pub fn stop_grace() -> Duration {
        Duration::from_secs(5)
    }
    pub fn status() -> u16 {
        200
    }
    pub fn initial_backoff() -> Duration {
        Duration::from_millis(200)
    }
    pub fn max_backoff() -> Duration {
        Duration::from_secs(10)
    }
    pub fn crash_loop_restarts() -> u32 {
        5
    }
    pub fn crash_loop_window() -> Duration {
        Duration::from_secs(60)
    }
}

/// The longest duration a spec may give (timings, backoffs): a day. Longer is a mistake, and
/// would overflow the supervisor's clock arithmetic at the extreme.
pub const MAX_SPEC_DURATION: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("service spec: {field} uses ${{{name}}}, but the agent has no --var {name}=...")]
    UnknownVar { field: String, name: String },
    #[error("service spec: {field}: unterminated ${{ in {value:?}")]
    Unterminated { field: String, value: String },
    #[error("service spec: stop_signal {0:?} is not one of SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGKILL")]
    Signal(String),
    #[error("service spec: {field} is {value:?}, longer than the most a spec may say ({MAX_SPEC_DURATION:?})")]
    TooLong {
        field: &'static str,
        value: Duration,
    },
    #[error("service spec: {0}")]
    Limits(String),
    #[error("service spec: {field} holds a control character ({value:?}): a command line or a unit file would take it as a separator")]
    ControlChar { field: String, value: String },
}

/// Why a service spec file could not be read.
#[cfg(feature = "toml")]
#[derive(Debug, thiserror::Error)]
pub enum SpecFileError {
    #[error("cannot read service spec {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid service spec: {message}")]
    Invalid {
        path: std::path::PathBuf,
        message: String,
    },
}

impl ServiceSpec {
    /// Reads a spec file: JSON when it ends in `.json`, TOML otherwise.
    #[cfg(feature = "toml")]
    pub fn read_file(path: &std::path::Path) -> Result<ServiceSpec, SpecFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        } else {
            toml::from_str(&text).map_err(|e| e.to_string())
        };
        let spec: ServiceSpec = parsed.map_err(|message| SpecFileError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        spec.validate().map_err(|e| SpecFileError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(spec)
    }

    /// The binary to run for `app`.
    pub fn binary_name<'a>(&'a self, app: &'a str) -> &'a str {
        self.binary.as_deref().unwrap_or(app)
    }

    /// The signal number of `stop_signal`.
    pub fn stop_signal_number(&self) -> Result<i32, SpecError> {
        Ok(match self.stop_signal.trim_start_matches("SIG") {
            "TERM" => 15,
            "INT" => 2,
            "QUIT" => 3,
            "HUP" => 1,
            "USR1" => 10,
            "USR2" => 12,
            "KILL" => 9,
            _ => return Err(SpecError::Signal(self.stop_signal.clone())),
        })
    }

    /// Checks what can be checked without an agent (names are valid by type): the signal,
    /// durations within [`MAX_SPEC_DURATION`], and no control characters in any string that
    /// reaches a command line, an environment or a systemd unit.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.stop_signal_number()?;
        self.limits.check().map_err(SpecError::Limits)?;
        let durations = [
            ("min_healthy_time", self.min_healthy_time),
            ("healthy_deadline", self.healthy_deadline),
            ("stop_grace", self.stop_grace),
            ("restart.initial_backoff", self.restart.initial_backoff),
            ("restart.max_backoff", self.restart.max_backoff),
            ("restart.crash_loop_window", self.restart.crash_loop_window),
        ];
        for (field, value) in durations {
            if value > MAX_SPEC_DURATION {
                return Err(SpecError::TooLong { field, value });
            }
        }
        for (field, value) in self.strings() {
            if value.chars().any(char::is_control) {
                return Err(SpecError::ControlChar {
                    field,
                    value: value.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Every free-text field, named as in the spec.
    fn strings(&self) -> Vec<(String, &str)> {
        let mut all: Vec<(String, &str)> = Vec::new();
        all.extend(
            self.args
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("args[{i}]"), a.as_str())),
        );
        for (k, v) in &self.env {
            all.push((format!("env key {k:?}"), k.as_str()));
            all.push((format!("env.{k}"), v.as_str()));
        }
        all.extend(
            self.working_dir
                .iter()
                .map(|d| ("working_dir".to_owned(), d.as_str())),
        );
        all.push(("stop_signal".to_owned(), self.stop_signal.as_str()));
        match &self.health {
            HealthCheck::None => {}
            HealthCheck::Http { url, .. } => all.push(("health.url".to_owned(), url.as_str())),
            HealthCheck::Tcp { addr } => all.push(("health.addr".to_owned(), addr.as_str())),
            HealthCheck::Command { argv } => all.extend(
                argv.iter()
                    .enumerate()
                    .map(|(i, a)| (format!("health.argv[{i}]"), a.as_str())),
            ),
        }
        all
    }

    /// This spec with every `${name}` replaced by the agent's variables.
    pub fn expand(&self, vars: &BTreeMap<String, String>) -> Result<ServiceSpec, SpecError> {
        let x = |field: &str, v: &str| expand_str(field, v, vars);
        let mut out = self.clone();
        for (i, a) in out.args.iter_mut().enumerate() {
            *a = x(&format!("args[{i}]"), a)?;
        }
        for (k, v) in out.env.iter_mut() {
            *v = x(&format!("env.{k}"), v)?;
        }
        if let Some(dir) = &mut out.working_dir {
            *dir = x("working_dir", dir)?;
        }
        match &mut out.health {
            HealthCheck::None => {}
            HealthCheck::Http { url, .. } => *url = x("health.url", url)?,
            HealthCheck::Tcp { addr } => *addr = x("health.addr", addr)?,
            HealthCheck::Command { argv } => {
                for (i, a) in argv.iter_mut().enumerate() {
                    *a = x(&format!("health.argv[{i}]"), a)?;
                }
            }
        }
        Ok(out)
    }
}

fn expand_str(
    field: &str,
    value: &str,
    vars: &BTreeMap<String, String>,
) -> Result<String, SpecError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| SpecError::Unterminated {
            field: field.to_owned(),
            value: value.to_owned(),
        })?;
        let name = &after[..end];
        let var = vars.get(name).ok_or_else(|| SpecError::UnknownVar {
            field: field.to_owned(),
            name: name.to_owned(),
        })?;
        out.push_str(var);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_everywhere_and_names_unknown_ones() {
        let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "args": ["--listen", "127.0.0.1:${port}"],
            "health": {"kind": "http", "url": "http://127.0.0.1:${port}/healthz"},
            "min_healthy_time": "1s",
        }))
        .unwrap();
        let vars = BTreeMap::from([("port".to_owned(), "18081".to_owned())]);
        let out = spec.expand(&vars).unwrap();
        assert_eq!(out.args[1], "127.0.0.1:18081");
        assert_eq!(
            out.health,
            HealthCheck::Http {
                url: "http://127.0.0.1:18081/healthz".into(),
                expect_status: 200
            }
        );
        assert_eq!(out.min_healthy_time, Duration::from_secs(1));
        let err = spec.expand(&BTreeMap::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service spec: args[1] uses ${port}, but the agent has no --var port=..."
        );
    }

    #[test]
    fn unknown_fields_and_signals_are_refused() {
        let err =
            serde_json::from_value::<ServiceSpec>(serde_json::json!({"argz": []})).unwrap_err();
        assert!(err.to_string().contains("argz"), "{err}");
        let spec = ServiceSpec {
            stop_signal: "SIGFOO".into(),
            ..Default::default()
        };
        assert!(spec.validate().unwrap_err().to_string().contains("SIGFOO"));
    }
}
