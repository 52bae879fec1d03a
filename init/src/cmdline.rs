//! The kernel command line: what a booting machine is told by whoever booted it (the deployer's
//! iPXE script, or a VM's `-append`). Only `muscle.*` words are ours. Each value is checked for
//! shape here (length, no control characters) and then handed to the agent, which validates it
//! as it validates its own flags: one parser per value, not two that could disagree.

use std::fmt;

/// What the command line asks of this machine.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// `muscle.server=URL[,URL...]`: the deployer, or its replicas (repeatable).
    pub servers: Vec<String>,
    /// `muscle.enroll=TOKEN`: how a machine the deployer has never seen joins.
    pub enroll_token: Option<String>,
    /// `muscle.label=KEY=VALUE` (repeatable).
    pub labels: Vec<String>,
    /// `muscle.var=KEY=VALUE`: values for `${KEY}` in service specs (repeatable).
    pub vars: Vec<String>,
    /// `muscle.key=HEX`: release keys the agent pins (repeatable).
    pub trusted_keys: Vec<String>,
    /// `muscle.id=NAME`: default, `muscle-` and the MAC address (a network-booted machine's
    /// id across reboots, which the deployer's boot tokens are bound to).
    pub id: Option<String>,
    /// `muscle.interval=DURATION`: how often the agent checks in.
    pub interval: Option<String>,
    /// `muscle.image=VERSION`: the image the deployer chose for this boot (its boot scripts say
    /// it); the agent compares it with the image it finds itself in.
    pub image: Option<String>,
    /// `muscle.enrol_within=SECONDS`: how long an agent given an enrolment token has to enrol
    /// before the machine restarts (default 600; 30 to 86400).
    pub enrol_within: Option<u64>,
    /// `muscle.iface=NAME`: the interface to configure.
    pub interface: Option<String>,
    /// `muscle.mac=52-54-00-12-34-56`: the interface to configure, by the MAC address the
    /// machine booted from (the deployer's boot scripts say it). Default: the first Ethernet
    /// interface.
    pub mac: Option<[u8; 6]>,
    /// `muscle.*` words this init does not know: said on the console, not fatal (a machine that
    /// can still join should).
    pub unknown: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum CmdlineError {
    NoServer,
    Bad {
        word: String,
        expected: &'static str,
    },
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoServer => f.write_str(
                "the kernel command line names no deployer: expected muscle.server=http://HOST:PORT",
            ),
            Self::Bad { word, expected } => {
                write!(f, "kernel command line word {word:?}: expected {expected}")
            }
        }
    }
}

impl std::error::Error for CmdlineError {}

/// Longer values are not addresses, tokens or labels: refused rather than passed on.
const MAX_VALUE: usize = 512;
/// At most this many repeated values (servers, labels, keys) are taken.
const MAX_REPEATED: usize = 32;

pub fn parse(cmdline: &str) -> Result<BootConfig, CmdlineError> {
    let mut config = BootConfig::default();
    for word in cmdline.split_ascii_whitespace() {
        let Some(setting) = word.strip_prefix("muscle.") else {
            continue;
        };
        let Some((key, value)) = setting.split_once('=') else {
            config.unknown.push(word.to_owned());
            continue;
        };
        let value = unquote(value);
        let bad = |expected| CmdlineError::Bad {
            word: shorten(word),
            expected,
        };
        if value.is_empty() || value.len() > MAX_VALUE {
            return Err(bad("a value of 1 to 512 characters"));
        }
        if value.chars().any(|c| c.is_control()) {
            return Err(bad("a value without control characters"));
        }
        let value = value.to_owned();
        match key {
            "server" => {
                for url in value.split(',').filter(|u| !u.is_empty()) {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(bad("http:// or https:// URLs, separated by commas"));
                    }
                    push(&mut config.servers, url.to_owned(), bad)?;
                }
            }
            "enroll" => config.enroll_token = Some(value),
            "label" => {
                if !value.contains('=') {
                    return Err(bad("muscle.label=KEY=VALUE"));
                }
                push(&mut config.labels, value, bad)?;
            }
            "var" => {
                if !value.contains('=') {
                    return Err(bad("muscle.var=KEY=VALUE"));
                }
                push(&mut config.vars, value, bad)?;
            }
            "key" => push(&mut config.trusted_keys, value, bad)?,
            "id" => config.id = Some(value),
            "interval" => config.interval = Some(value),
            "iface" => config.interface = Some(value),
            "image" => config.image = Some(value),
            "enrol_within" => {
                config.enrol_within = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|s| (30..=86_400).contains(s))
                        .ok_or_else(|| bad("a number of seconds from 30 to 86400"))?,
                )
            }
            "mac" => {
                config.mac = Some(
                    crate::net::parse_mac(&value)
                        .ok_or_else(|| bad("six hex bytes, 52-54-00-12-34-56"))?,
                )
            }
            _ => config.unknown.push(shorten(word)),
        }
    }
    if config.servers.is_empty() {
        return Err(CmdlineError::NoServer);
    }
    Ok(config)
}

fn push(
    list: &mut Vec<String>,
    value: String,
    bad: impl Fn(&'static str) -> CmdlineError,
) -> Result<(), CmdlineError> {
    if list.len() >= MAX_REPEATED {
        return Err(bad("at most 32 of these"));
    }
    list.push(value);
    Ok(())
}

/// The kernel keeps the quotes of `key="a value"` in /proc/cmdline (without spaces here, since
/// words are split on them).
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// A word as it may be quoted in an error: at most 80 characters of it.
fn shorten(word: &str) -> String {
    word.chars().take(80).collect()
}

impl BootConfig {
    /// The agent's `run` arguments (the enrolment token goes by environment, not argv: every
    /// process on the machine can read another's command line).
    pub fn agent_args(&self, state_dir: &str) -> Vec<String> {
        let mut args = vec!["run".to_owned(), "--state-dir".into(), state_dir.into()];
        let mut flag = |name: &str, value: &str| {
            args.push(format!("--{name}"));
            args.push(value.to_owned());
        };
        for server in &self.servers {
            flag("server", server);
        }
        for label in &self.labels {
            flag("label", label);
        }
        for var in &self.vars {
            flag("var", var);
        }
        for key in &self.trusted_keys {
            flag("trusted-key", key);
        }
        if let Some(id) = &self.id {
            flag("id", id);
        }
        if let Some(interval) = &self.interval {
            flag("interval", interval);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_our_words_and_leaves_the_kernels() {
        let c = parse(
            "console=ttyS0 quiet muscle.server=http://10.0.2.2:8080,http://10.0.2.2:8081 \
             muscle.enroll=abc muscle.label=site=lab muscle.label=\"rack=3\" muscle.key=00ff muscle.var=port=80 \
             muscle.iface=eth1 muscle.interval=2s muscle.colour=blue muscle.flag muscle.mac=52-54-00-00-00-0A \
             muscle.image=0.2.0 muscle.enrol_within=45",
        )
        .unwrap();
        assert_eq!(c.servers, ["http://10.0.2.2:8080", "http://10.0.2.2:8081"]);
        assert_eq!(c.enroll_token.as_deref(), Some("abc"));
        assert_eq!(c.labels, ["site=lab", "rack=3"]);
        assert_eq!(c.trusted_keys, ["00ff"]);
        assert_eq!(c.interface.as_deref(), Some("eth1"));
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0, 0, 0x0a]));
        assert_eq!(c.unknown, ["muscle.colour=blue", "muscle.flag"]);
        assert_eq!(
            c.agent_args("/s"),
            [
                "run",
                "--state-dir",
                "/s",
                "--server",
                "http://10.0.2.2:8080",
                "--server",
                "http://10.0.2.2:8081",
                "--label",
                "site=lab",
                "--label",
                "rack=3",
                "--var",
                "port=80",
                "--trusted-key",
                "00ff",
                "--interval",
                "2s"
            ]
        );
        assert_eq!(c.enrol_within, Some(45));
        assert_eq!(c.image.as_deref(), Some("0.2.0"));
    }

    #[test]
    fn refuses_what_it_cannot_pass_on() {
        assert_eq!(parse("console=ttyS0"), Err(CmdlineError::NoServer));
        let err = |line: &str| parse(line).unwrap_err().to_string();
        assert!(err("muscle.server=ftp://x").contains("http:// or https://"));
        assert!(err("muscle.server=").contains("1 to 512"));
        assert!(err(&format!("muscle.server=http://{}", "a".repeat(600))).contains("1 to 512"));
        assert!(err("muscle.server=http://x muscle.label=nolabel").contains("KEY=VALUE"));
        assert!(err("muscle.server=http://x muscle.enroll=a\u{7}b").contains("control"));
        assert!(err("muscle.server=http://x muscle.mac=52-54").contains("six hex bytes"));
        assert!(err("muscle.server=http://x muscle.enrol_within=5").contains("30 to 86400"));
        assert!(err("muscle.server=http://x muscle.enrol_within=1e3").contains("30 to 86400"));
        let many = "muscle.label=a=b ".repeat(40);
        assert!(err(&format!("muscle.server=http://x {many}")).contains("at most 32"));
        // An error quotes at most 80 characters of the word.
        assert!(err(&format!("muscle.server=ftp://{}", "b".repeat(400))).len() < 200);
    }
}
