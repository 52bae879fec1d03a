//! The agent's command line. Parsed with lexopt and written out by hand: clap was the largest
//! single item of the agent after the TLS stack (about 150 KiB), for six commands.
//!
//! Usage errors exit with status 2 and say what was wrong and what was expected; `--help` of
//! each command lists what it takes.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::prelude::*;
use muscle_protocol::Name;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/muscle-agent";

pub enum Command {
    Run(Box<RunArgs>),
    Status {
        state_dir: PathBuf,
        json: bool,
    },
    /// Hidden: a new agent binary proving itself before a self-update hands over to it.
    Probe {
        server: String,
        state_dir: PathBuf,
        ca_file: Option<PathBuf>,
    },
    Fetch {
        url: String,
        sha256: String,
        size: u64,
        out: PathBuf,
        ca_file: Option<PathBuf>,
    },
    /// Hidden: between a service and its log file.
    LogRelay {
        file: PathBuf,
        max_bytes: u64,
        keep: u32,
        version: String,
        detach: bool,
    },
    SystemdUnit {
        unit: UnitOf,
        state_dir: PathBuf,
        /// With `--self`: the arguments of its `run`.
        run_args: Vec<String>,
    },
    /// `--help` or `--version`: the text to print.
    Print(String),
}

pub enum UnitOf {
    App { app: String, user: Option<String> },
    Agent,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy)]
pub enum Supervisor {
    Builtin,
    Systemd,
}

pub struct RunArgs {
    /// One deployer, or several replicas of one (failed over in turn).
    pub servers: Vec<String>,
    pub state_dir: PathBuf,
    pub id: Option<Name>,
    pub labels: Vec<(Name, Name)>,
    pub vars: Vec<(String, String)>,
    pub interval: Duration,
    pub trusted_keys: Vec<String>,
    pub enroll_token: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub supervisor: Supervisor,
    pub unit_dir: PathBuf,
    pub unit_user: Option<String>,
    pub leave_services_running: bool,
    pub log_max_bytes: u64,
    pub log_format: LogFormat,
    pub log_keep: u32,
    pub keep_versions: usize,
    /// What says which boot image this machine runs (default: an image's /etc/muscle-image.json).
    pub image_file: PathBuf,
    /// The image the deployer's boot script chose for this boot (muscle-init passes it on).
    pub boot_image: Option<Name>,
}

/// What was wrong with the command line.
#[derive(Debug)]
pub struct UsageError {
    pub message: String,
    /// The command whose `--help` tells more.
    pub command: Option<&'static str>,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<lexopt::Error> for UsageError {
    fn from(e: lexopt::Error) -> Self {
        usage(e.to_string())
    }
}

fn usage(message: impl Into<String>) -> UsageError {
    UsageError {
        message: message.into(),
        command: None,
    }
}

type Result<T> = std::result::Result<T, UsageError>;

/// `0.1.0 (aarch64)`: the version, and the architecture this binary was built for.
pub fn version() -> String {
    format!("{} ({})", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH)
}

/// Parses the arguments after the program name.
pub fn parse(args: Vec<OsString>) -> Result<Command> {
    // Everything after a bare `--` belongs to `systemd-unit --self`'s `run`, verbatim.
    let split = args.iter().position(|a| a == "--");
    let (args, trailing) = match split {
        Some(i) => (args[..i].to_vec(), Some(args[i + 1..].to_vec())),
        None => (args, None),
    };
    let mut p = lexopt::Parser::from_args(args);
    let command = match p.next()? {
        Some(Value(name)) => name.string()?,
        Some(Long("help") | Short('h')) => return Ok(Command::Print(HELP.to_owned())),
        Some(Long("version") | Short('V')) => {
            return Ok(Command::Print(format!("muscle-agent {}\n", version())))
        }
        Some(other) => return Err(usage(other.unexpected().to_string())),
        None => {
            return Err(usage(
                "a command is required: run, status, fetch or systemd-unit",
            ))
        }
    };
    let name: &'static str = match command.as_str() {
        "run" => "run",
        "status" => "status",
        "probe" => "probe",
        "fetch" => "fetch",
        "log-relay" => "log-relay",
        "systemd-unit" => "systemd-unit",
        "help" => return Ok(Command::Print(HELP.to_owned())),
        other => {
            return Err(usage(format!(
                "unknown command {other:?}: expected run, status, fetch or systemd-unit"
            )))
        }
    };
    if trailing.is_some() && name != "systemd-unit" {
        return Err(usage(format!("{name} takes no arguments after `--`")));
    }
    let parsed = match name {
        "run" => run(&mut p),
        "status" => status(&mut p),
        "probe" => probe(&mut p),
        "fetch" => fetch(&mut p),
        "log-relay" => log_relay(&mut p),
        _ => systemd_unit(&mut p, trailing.unwrap_or_default()),
    };
    parsed.map_err(|e| UsageError {
        command: Some(name),
        ..e
    })
}

/// The value of `--flag`, parsed by `parse` (whose error says what was expected).
fn value<T>(
    p: &mut lexopt::Parser,
    flag: &str,
    parse: impl FnOnce(&str) -> std::result::Result<T, String>,
) -> Result<T> {
    let text = p.value()?.string()?;
    parse(&text).map_err(|e| usage(format!("invalid value for --{flag}: {e}")))
}

fn text(p: &mut lexopt::Parser) -> Result<String> {
    Ok(p.value()?.string()?)
}

fn path(p: &mut lexopt::Parser) -> Result<PathBuf> {
    Ok(p.value()?.into())
}

fn number<T: std::str::FromStr>(s: &str) -> std::result::Result<T, String> {
    s.parse()
        .map_err(|_| format!("{s:?}: expected a whole number"))
}

fn required<T>(value: Option<T>, flag: &str) -> Result<T> {
    value.ok_or_else(|| usage(format!("--{flag} is required")))
}

fn help_or_unexpected(arg: lexopt::Arg, help: &str) -> Result<Command> {
    match arg {
        Long("help") | Short('h') => Ok(Command::Print(help.to_owned())),
        other => Err(usage(other.unexpected().to_string())),
    }
}

fn run(p: &mut lexopt::Parser) -> Result<Command> {
    let mut a = RunArgs {
        servers: vec![],
        state_dir: DEFAULT_STATE_DIR.into(),
        id: None,
        labels: vec![],
        vars: vec![],
        interval: Duration::from_secs(5),
        trusted_keys: vec![],
        enroll_token: None,
        ca_file: None,
        supervisor: Supervisor::Builtin,
        unit_dir: "/etc/systemd/system".into(),
        unit_user: None,
        leave_services_running: false,
        log_max_bytes: 1024 * 1024,
        log_format: LogFormat::Text,
        log_keep: 3,
        keep_versions: 3,
        image_file: muscle_protocol::image::IDENTITY_FILE.into(),
        boot_image: None,
    };
    while let Some(arg) = p.next()? {
        match arg {
            Long("server") => a
                .servers
                .push(value(p, "server", muscle_protocol::parse_url)?),
            Long("state-dir") => a.state_dir = path(p)?,
            Long("id") => {
                a.id = Some(value(p, "id", |s| {
                    Name::parse(s).map_err(|e| e.to_string())
                })?)
            }
            Long("label") => a
                .labels
                .push(value(p, "label", muscle_protocol::parse_label)?),
            Long("var") => a
                .vars
                .push(value(p, "var", muscle_protocol::parse_key_value)?),
            Long("interval") => {
                a.interval = value(p, "interval", muscle_protocol::duration::parse)?
            }
            Long("trusted-key") => a.trusted_keys.push(text(p)?),
            Long("enroll-token") => a.enroll_token = Some(text(p)?),
            Long("ca-file") => a.ca_file = Some(path(p)?),
            Long("supervisor") => a.supervisor = value(p, "supervisor", supervisor)?,
            Long("unit-dir") => a.unit_dir = path(p)?,
            Long("unit-user") => a.unit_user = Some(text(p)?),
            Long("leave-services-running") => a.leave_services_running = true,
            Long("log-max-bytes") => {
                a.log_max_bytes = value(p, "log-max-bytes", muscle_protocol::parse_size)?
            }
            Long("log-format") => a.log_format = value(p, "log-format", log_format)?,
            Long("log-keep") => a.log_keep = value(p, "log-keep", log_keep)?,
            Long("keep-versions") => a.keep_versions = value(p, "keep-versions", number)?,
            Long("image-file") => a.image_file = path(p)?,
            Long("boot-image") => {
                a.boot_image = Some(value(p, "boot-image", |s| {
                    Name::parse(s).map_err(|e| e.to_string())
                })?)
            }
            other => return help_or_unexpected(other, RUN_HELP),
        }
    }
    if a.servers.is_empty() {
        return Err(usage("--server is required"));
    }
    if a.enroll_token.is_none() {
        a.enroll_token = std::env::var("MUSCLE_ENROLL_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
    }
    // From muscle-init, by environment: an older agent (a self-update back, say) ignores it,
    // where an unknown flag would make it refuse its command line and the machine restart.
    if a.boot_image.is_none() {
        a.boot_image = std::env::var("MUSCLE_BOOT_IMAGE")
            .ok()
            .and_then(|v| Name::parse(&v).ok());
    }
    Ok(Command::Run(Box::new(a)))
}

fn supervisor(s: &str) -> std::result::Result<Supervisor, String> {
    match s {
        "builtin" => Ok(Supervisor::Builtin),
        "systemd" => Ok(Supervisor::Systemd),
        _ => Err(format!("{s:?}: expected builtin or systemd")),
    }
}

fn log_format(s: &str) -> std::result::Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("{s:?}: expected text or json")),
    }
}

fn log_keep(s: &str) -> std::result::Result<u32, String> {
    number(s).and_then(|n| match n {
        1..=100 => Ok(n),
        _ => Err(format!("{s:?}: expected 1 to 100 files")),
    })
}

fn status(p: &mut lexopt::Parser) -> Result<Command> {
    let (mut state_dir, mut json) = (PathBuf::from(DEFAULT_STATE_DIR), false);
    while let Some(arg) = p.next()? {
        match arg {
            Long("state-dir") => state_dir = path(p)?,
            Long("json") => json = true,
            other => return help_or_unexpected(other, STATUS_HELP),
        }
    }
    Ok(Command::Status { state_dir, json })
}

fn probe(p: &mut lexopt::Parser) -> Result<Command> {
    let (mut server, mut state_dir, mut ca_file) = (None, None, None);
    while let Some(arg) = p.next()? {
        match arg {
            Long("server") => server = Some(text(p)?),
            Long("state-dir") => state_dir = Some(path(p)?),
            Long("ca-file") => ca_file = Some(path(p)?),
            other => return help_or_unexpected(other, PROBE_HELP),
        }
    }
    Ok(Command::Probe {
        server: required(server, "server")?,
        state_dir: required(state_dir, "state-dir")?,
        ca_file,
    })
}

fn fetch(p: &mut lexopt::Parser) -> Result<Command> {
    let (mut url, mut sha256, mut size, mut out, mut ca_file) = (None, None, None, None, None);
    while let Some(arg) = p.next()? {
        match arg {
            Value(v) if url.is_none() => url = Some(v.string()?),
            Long("sha256") => sha256 = Some(text(p)?),
            Long("size") => size = Some(value(p, "size", number)?),
            Long("out") => out = Some(path(p)?),
            Long("ca-file") => ca_file = Some(path(p)?),
            other => return help_or_unexpected(other, FETCH_HELP),
        }
    }
    Ok(Command::Fetch {
        url: url.ok_or_else(|| usage("the URL to fetch is required"))?,
        sha256: required(sha256, "sha256")?,
        size: required(size, "size")?,
        out: required(out, "out")?,
        ca_file,
    })
}

fn log_relay(p: &mut lexopt::Parser) -> Result<Command> {
    let (mut file, mut max_bytes, mut keep, mut version) = (None, None, None, None);
    let mut detach = false;
    while let Some(arg) = p.next()? {
        match arg {
            Long("file") => file = Some(path(p)?),
            Long("max-bytes") => max_bytes = Some(value(p, "max-bytes", number)?),
            Long("keep") => keep = Some(value(p, "keep", number)?),
            Long("version") => version = Some(text(p)?),
            Long("detach") => detach = true,
            other => return help_or_unexpected(other, LOG_RELAY_HELP),
        }
    }
    Ok(Command::LogRelay {
        file: required(file, "file")?,
        max_bytes: required(max_bytes, "max-bytes")?,
        keep: required(keep, "keep")?,
        version: required(version, "version")?,
        detach,
    })
}

fn systemd_unit(p: &mut lexopt::Parser, run_args: Vec<OsString>) -> Result<Command> {
    let (mut app, mut user, mut agent) = (None, None, false);
    let mut state_dir = PathBuf::from(DEFAULT_STATE_DIR);
    while let Some(arg) = p.next()? {
        match arg {
            Value(v) if app.is_none() => app = Some(v.string()?),
            Long("self") => agent = true,
            Long("state-dir") => state_dir = path(p)?,
            Long("user") => user = Some(text(p)?),
            other => return help_or_unexpected(other, SYSTEMD_UNIT_HELP),
        }
    }
    let run_args = run_args
        .into_iter()
        .map(|a| a.string())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let unit = match (app, agent) {
        (None, true) if user.is_none() => UnitOf::Agent,
        (None, true) => return Err(usage("--user is for an app's unit, not with --self")),
        (Some(_), true) => return Err(usage("give an app or --self, not both")),
        (Some(app), false) => UnitOf::App { app, user },
        (None, false) => return Err(usage("an app is required (or --self for the agent's unit)")),
    };
    if !run_args.is_empty() && !matches!(unit, UnitOf::Agent) {
        return Err(usage("arguments after `--` are the agent's own (--self)"));
    }
    Ok(Command::SystemdUnit {
        unit,
        state_dir,
        run_args,
    })
}

const HELP: &str = "\
Pulls desired state, installs, supervises, health-checks and rolls back services

Usage: muscle-agent COMMAND [OPTIONS]

Commands:
  run           Check in with the server and keep this host's services at their desired versions
  status        Show what is installed and running, from the state directory
  fetch         Download and verify one artifact exactly as an install does, without installing it
  systemd-unit  Print the hardened systemd unit for an installed app, or with --self the agent's

Options:
  -h, --help     Print help (COMMAND --help for a command's)
  -V, --version  Print version
";

const RUN_HELP: &str = "\
Check in with the server and keep this host's services at their desired versions

Usage: muscle-agent run --server URL [OPTIONS]

Options:
  --server URL             The deployer's URL, e.g. http://127.0.0.1:7700; repeat it for
                           replicas of one deployer: the next is asked when one fails
  --state-dir DIR          [default: /var/lib/muscle-agent]
  --id NAME                This agent's id (default: remembered in the state dir, first made
                           from the hostname)
  --label KEY=VALUE        A label for rollout selectors (repeatable)
  --var NAME=VALUE         A variable for ${name} in service specs (repeatable)
  --interval DURATION      Check-in interval, jittered by +-10% [default: 5s]
  --trusted-key HEX        A trusted ed25519 public key (repeatable); also read from
                           STATE_DIR/trusted-keys
  --enroll-token TOKEN     Enrol with this token on first contact [env: MUSCLE_ENROLL_TOKEN]; the
                           credential returned is kept in STATE_DIR/credential
  --ca-file PEM            Trust this CA bundle for an https:// server (default: SSL_CERT_FILE,
                           else the host's CA bundle)
  --supervisor KIND        builtin (the agent's own) or systemd (hardened units) [default: builtin]
  --unit-dir DIR           Where --supervisor systemd writes units [default: /etc/systemd/system]
  --unit-user USER         Run systemd units as this user instead of a DynamicUser
  --leave-services-running On SIGTERM/SIGINT exit without stopping the services
  --log-max-bytes SIZE     The most a service's log file holds before rotation [default: 1M]
  --log-format FORMAT      The agent's own log: text or json [default: text]
  --log-keep N             Rotated log files kept per service, 1 to 100 [default: 3]
  --keep-versions N        Versions kept on disk per app, current and previous included [default: 3]
  --image-file FILE        Which boot image this machine runs, if it booted one
                           [default: /etc/muscle-image.json]
  --boot-image VERSION     The image the deployer's boot script chose for this boot
                           [env: MUSCLE_BOOT_IMAGE, which muscle-init sets from the kernel command
                           line]: only then does an image rollout restart the machine
  -h, --help               Print help
";

const STATUS_HELP: &str = "\
Show what is installed and running, from the state directory

Usage: muscle-agent status [--state-dir DIR] [--json]

Options:
  --state-dir DIR  [default: /var/lib/muscle-agent]
  --json           The whole state as JSON
  -h, --help       Print help
";

const PROBE_HELP: &str = "\
Check in once with the report read from stdin (how a new agent binary proves itself before a
self-update hands over to it)

Usage: muscle-agent probe --server URL --state-dir DIR [--ca-file PEM]
";

const FETCH_HELP: &str = "\
Download and verify one artifact exactly as an install does (resume, sha256, size bound, static
ELF for this host), without installing it: for pre-seeding and benchmarks

Usage: muscle-agent fetch URL --sha256 HEX --size BYTES --out FILE [--ca-file PEM]

Options:
  --out FILE     Where the verified file goes (mode 0755)
  --ca-file PEM  Trust this CA bundle for an https:// URL
  -h, --help     Print help
";

const LOG_RELAY_HELP: &str = "\
Between a service and its log file: stamps each line read from stdin with the time and
--version, and rotates the file before it passes --max-bytes

Usage: muscle-agent log-relay --file FILE --max-bytes N --keep N --version V [--detach]
";

const SYSTEMD_UNIT_HELP: &str = "\
Print the hardened systemd unit for an installed app's committed version, or with --self the
unit that supervises the agent itself

Usage: muscle-agent systemd-unit APP [--state-dir DIR] [--user USER]
       muscle-agent systemd-unit --self [--state-dir DIR] [-- RUN ARGS...]

Options:
  --self           The unit for this agent: restarted when it dies, its services left running
                   across restarts
  --state-dir DIR  [default: /var/lib/muscle-agent]
  --user USER      Run the app as this user instead of a DynamicUser
  -h, --help       Print help
";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_line(line: &str) -> Result<Command> {
        parse(line.split_whitespace().map(OsString::from).collect())
    }

    #[test]
    fn run_takes_every_flag_in_both_spellings() {
        let Command::Run(a) = parse_line(
            "run --server=http://d:7700 --label arch=x86_64 --label=site=a --var port=1 \
             --interval 2s --log-max-bytes 64K --log-format json --log-keep 5 \
             --supervisor systemd --leave-services-running --id edge-1",
        )
        .unwrap() else {
            panic!("not run")
        };
        assert_eq!(a.servers, ["http://d:7700"]);
        assert_eq!(a.labels.len(), 2);
        assert_eq!(a.interval, Duration::from_secs(2));
        assert_eq!(a.log_max_bytes, 64 * 1024);
        assert!(a.log_format == LogFormat::Json && a.log_keep == 5 && a.leave_services_running);
        assert!(matches!(a.supervisor, Supervisor::Systemd));
        assert_eq!(a.id.unwrap().as_str(), "edge-1");
        assert_eq!(a.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    }

    #[test]
    fn bad_input_says_which_flag_and_what_was_expected() {
        let err = |line| parse_line(line).err().unwrap().to_string();
        assert!(err("run").contains("--server is required"));
        assert!(err("run --server 127.0.0.1:7700").contains("like http://127.0.0.1:7700"));
        assert!(err("run --server http://d --log-keep 0").contains("--log-keep"));
        assert!(err("run --server http://d --supervisor runit").contains("builtin or systemd"));
        assert!(err("run --server http://d --bogus").contains("--bogus"));
        assert!(err("frobnicate").contains("unknown command"));
        assert!(err("status -- x").contains("after `--`"));
        assert!(err("systemd-unit").contains("an app is required"));
        assert!(err("systemd-unit app --self").contains("not both"));
        let e = parse_line("run --interval 5x").err().unwrap();
        assert_eq!(e.command, Some("run"));
    }

    #[test]
    fn systemd_unit_self_keeps_what_follows_the_double_dash_verbatim() {
        let Command::SystemdUnit { unit, run_args, .. } =
            parse_line("systemd-unit --self -- --server http://d --label a=b").unwrap()
        else {
            panic!("not systemd-unit")
        };
        assert!(matches!(unit, UnitOf::Agent));
        assert_eq!(run_args, ["--server", "http://d", "--label", "a=b"]);
    }

    #[test]
    fn help_and_version_print() {
        for line in [
            "--help",
            "run --help",
            "fetch -h",
            "systemd-unit --help",
            "-V",
        ] {
            assert!(matches!(parse_line(line), Ok(Command::Print(_))), "{line}");
        }
    }
}
