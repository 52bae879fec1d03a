//! One validated name type for everything a peer names and a path or a command line may later
//! hold: app names, versions, binary names, agent ids, label keys and values.
//!
//! A [`Name`] can only be made by parsing, and serde parses too, so an invalid name from a
//! manifest, a check-in, a CLI flag or the agent's state file is refused where it enters, with
//! what was wrong, and never reaches a path.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest name: well under a file name's 255 bytes once it is combined with suffixes such as
/// `.tmp` or `.part`, and as long as a DNS label or a Kubernetes label value.
pub const MAX_NAME_LEN: usize = 64;

/// A non-empty ASCII name of at most [`MAX_NAME_LEN`] characters from `A-Z a-z 0-9 . _ - +`, not
/// starting with `.` or `-` (no hidden files, `..`, or anything a program could read as an
/// option).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("{name:?} is {len} characters long, more than {MAX_NAME_LEN}")]
    TooLong { name: String, len: usize },
    #[error("{name:?} has {found:?} at position {at}: expected only A-Z a-z 0-9 . _ - +")]
    BadChar {
        name: String,
        found: char,
        at: usize,
    },
    #[error("{name:?} starts with {found:?}: a name may not start with '.' or '-'")]
    BadStart { name: String, found: char },
}

impl Name {
    pub fn parse(s: &str) -> Result<Name, NameError> {
        let first = s.chars().next().ok_or(NameError::Empty)?;
        let len = s.chars().count();
        if len > MAX_NAME_LEN {
            return Err(NameError::TooLong {
                name: s.chars().take(MAX_NAME_LEN).collect::<String>() + "...",
                len,
            });
        }
        if first == '.' || first == '-' {
            return Err(NameError::BadStart {
                name: s.to_owned(),
                found: first,
            });
        }
        if let Some((at, found)) = s
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || "._-+".contains(*c)))
        {
            return Err(NameError::BadChar {
                name: s.to_owned(),
                found,
                at,
            });
        }
        Ok(Name(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Name, NameError> {
        Name::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Name, NameError> {
        Name::parse(s)
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for Name {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        *self == other.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_versions_and_ids() {
        for ok in [
            "hello-service",
            "0.2.0",
            "1.0.0-rc.1+build.5",
            "x86_64-1",
            "a",
            "site",
        ] {
            assert_eq!(Name::parse(ok).unwrap().as_str(), ok);
        }
        assert!(Name::parse(&"a".repeat(MAX_NAME_LEN)).is_ok());
    }

    #[test]
    fn refuses_paths_options_and_overlong_names_saying_why() {
        let err = |s: &str| Name::parse(s).unwrap_err().to_string();
        assert_eq!(err(""), "the name is empty");
        assert!(
            err("../../x").contains("starts with '.'"),
            "{}",
            err("../../x")
        );
        assert!(err("..").contains("starts with '.'"));
        assert!(err("a/b").contains("'/' at position 1"), "{}", err("a/b"));
        assert!(err("/etc").contains("'/' at position 0"));
        assert!(err("-rf").contains("starts with '-'"));
        assert!(err("a b").contains("' ' at position 1"));
        assert!(err("é").contains("'é'"));
        assert!(err("x\0").contains("'\\0'"));
        let long = "v".repeat(300);
        assert!(
            err(&long).contains("300 characters long, more than 64"),
            "{}",
            err(&long)
        );
    }

    #[test]
    fn serde_refuses_what_parse_refuses() {
        let ok: Name = serde_json::from_str("\"hello\"").unwrap();
        assert_eq!(ok, "hello");
        let bad = serde_json::from_str::<Name>("\"../x\"").unwrap_err();
        assert!(bad.to_string().contains("starts with '.'"), "{bad}");
        assert_eq!(serde_json::to_string(&ok).unwrap(), "\"hello\"");
    }
}
