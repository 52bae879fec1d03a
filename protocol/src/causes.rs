//! An error and its causes on one line, each said once: libraries often repeat their source's
//! text in their own message (`Connection refused (os error 111): Connection refused (os error
//! 111)`), which `{:#}` would print twice.

use std::error::Error;

/// `err: cause: cause`, skipping a cause whose text the line already holds.
pub fn causes(err: &(dyn Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(std::io::Error, bool);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            if self.1 {
                write!(f, "connect failed: {}", self.0)
            } else {
                f.write_str("connect failed")
            }
        }
    }

    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(causes(&Wrapper(refused(), true)), "connect failed: refused");
        assert_eq!(
            causes(&Wrapper(refused(), false)),
            "connect failed: refused"
        );
    }
}
