//! Isolation in a service spec: the user a service runs as, and the few things its sandbox
//! lets through (`[sandbox] address_families`, `system_calls`, `writable_paths`,
//! `write_execute`). Everything else is denied by default.

use serde::{Deserialize, Serialize};

/// A Unix user name a service runs as: `[a-z_][a-z0-9_-]*`, at most 31 characters (what
/// `useradd` and systemd's `User=` both accept).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserName(String);

impl UserName {
    pub fn parse(s: &str) -> Result<UserName, String> {
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok =
            chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c));
        if !(first_ok && rest_ok && s.len() <= 31) {
            return Err(format!(
                "user {s:?}: expected a Unix user name: a-z or _, then a-z, 0-9, _ or -, at most 31 characters"
            ));
        }
        if s == "root" {
            return Err("user \"root\": a service runs as root by leaving `user` out".into());
        }
        Ok(UserName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserName {
    type Error = String;
    fn try_from(s: String) -> Result<UserName, String> {
        UserName::parse(&s)
    }
}

impl From<UserName> for String {
    fn from(u: UserName) -> String {
        u.0
    }
}

impl std::fmt::Display for UserName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a service's sandbox lets through beyond the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sandbox {
    /// Socket address families (`RestrictAddressFamilies=`); default: `AF_UNIX`, `AF_INET`,
    /// `AF_INET6`. Empty: no sockets at all.
    #[serde(default = "default_families")]
    pub address_families: Vec<AddressFamily>,
    /// System calls or systemd syscall sets (`@resources`, `mbind`) allowed beyond
    /// `@system-service`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub system_calls: Vec<SyscallName>,
    /// Absolute paths the service may write besides its private `/tmp` (`ReadWritePaths=`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writable_paths: Vec<AbsolutePath>,
    /// Memory both writable and executable (JIT compilers); denied by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub write_execute: bool,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            address_families: default_families(),
            system_calls: vec![],
            writable_paths: vec![],
            write_execute: false,
        }
    }
}

impl Sandbox {
    pub fn is_default(&self) -> bool {
        *self == Sandbox::default()
    }
}

fn default_families() -> Vec<AddressFamily> {
    ["AF_UNIX", "AF_INET", "AF_INET6"]
        .into_iter()
        .map(|f| AddressFamily(f.to_owned()))
        .collect()
}

/// A socket address family as systemd names it: `AF_` and capitals or digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AddressFamily(String);

impl TryFrom<String> for AddressFamily {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let body = s.strip_prefix("AF_").unwrap_or("");
        if body.is_empty()
            || body.len() > 16
            || !body
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        {
            return Err(format!(
                "address family {s:?}: expected a name like AF_INET, AF_INET6, AF_UNIX or AF_NETLINK"
            ));
        }
        Ok(AddressFamily(s))
    }
}

impl From<AddressFamily> for String {
    fn from(f: AddressFamily) -> String {
        f.0
    }
}

impl AddressFamily {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A system call (`mbind`) or a systemd syscall set (`@resources`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SyscallName(String);

impl TryFrom<String> for SyscallName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let body = s.strip_prefix('@').unwrap_or(&s);
        if body.is_empty()
            || body.len() > 32
            || !body
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))
        {
            return Err(format!(
                "system call {s:?}: expected a syscall name like mbind or a set like @resources"
            ));
        }
        Ok(SyscallName(s))
    }
}

impl From<SyscallName> for String {
    fn from(s: SyscallName) -> String {
        s.0
    }
}

impl SyscallName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An absolute path with no whitespace, quotes, `%` or control characters: written into a
/// unit's space-separated lists as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AbsolutePath(String);

impl TryFrom<String> for AbsolutePath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = |c: char| c.is_whitespace() || c.is_control() || "\"'%\\".contains(c);
        if !s.starts_with('/') || s.len() > 4096 || s.contains(bad) {
            return Err(format!(
                "writable path {s:?}: expected an absolute path without spaces, quotes, % or \\"
            ));
        }
        if s.split('/').any(|part| part == "..") {
            return Err(format!("writable path {s:?}: `..` is not allowed"));
        }
        Ok(AbsolutePath(s))
    }
}

impl From<AbsolutePath> for String {
    fn from(p: AbsolutePath) -> String {
        p.0
    }
}

impl AbsolutePath {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_lets_through_only_validated_names() {
        let s: Sandbox = serde_json::from_str(
            r#"{"address_families": ["AF_INET", "AF_NETLINK"], "system_calls": ["@resources", "mbind"], "writable_paths": ["/var/lib/hello"]}"#,
        )
        .unwrap();
        assert_eq!(s.address_families.len(), 2);
        assert!(!s.is_default());
        assert!(serde_json::from_str::<Sandbox>("{}").unwrap().is_default());
        for (bad, named) in [
            (r#"{"address_families": ["inet"]}"#, "AF_INET"),
            (r#"{"system_calls": ["@sys service"]}"#, "@resources"),
            (r#"{"writable_paths": ["var/lib"]}"#, "absolute"),
            (r#"{"writable_paths": ["/var/lib x"]}"#, "without spaces"),
            (r#"{"writable_paths": ["/var/../etc"]}"#, "`..`"),
            (r#"{"network": true}"#, "network"),
        ] {
            let err = serde_json::from_str::<Sandbox>(bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{bad}: {err}");
        }
    }

    #[test]
    fn user_names_are_unix_names_and_never_root() {
        assert!(UserName::parse("hello-svc").is_ok());
        assert!(UserName::parse("_svc1").is_ok());
        for bad in ["", "Hello", "1svc", "a b", "root", &"x".repeat(32)] {
            assert!(UserName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
