//! Who may talk to the deployer: agents enrol once with a shared enrolment token and then check
//! in with their own credential; the admin endpoints need the admin token. All comparisons are
//! constant-time, and only the sha256 of a credential is stored.

use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

#[derive(Clone, Default)]
pub struct Auth {
    /// When set, agents must enrol with it and check in with their credential.
    pub enroll_token: Option<String>,
    /// When set, the JSON views need it.
    pub admin_token: Option<String>,
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// `presented` equals `expected`, in time independent of where they differ.
pub fn same_secret(presented: &str, expected: &str) -> bool {
    // Hashing first makes the comparison length-independent too.
    let a = muscle_protocol::sha256_hex(presented.as_bytes());
    let b = muscle_protocol::sha256_hex(expected.as_bytes());
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// `presented` hashes to `stored_sha256`, compared in constant time.
pub fn matches_hash(presented: &str, stored_sha256: &str) -> bool {
    muscle_protocol::sha256_hex(presented.as_bytes())
        .as_bytes()
        .ct_eq(stored_sha256.as_bytes())
        .into()
}

/// A new random credential (256 bits, hex).
pub fn new_credential() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(hex::encode(bytes))
}

/// A new random id for a job or a log request (128 bits).
pub fn new_id() -> std::io::Result<muscle_protocol::JobId> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(muscle_protocol::JobId::new(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_value() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("", "abc"));
        let c = new_credential().unwrap();
        assert_eq!(c.len(), 64);
        assert!(matches_hash(&c, &muscle_protocol::sha256_hex(c.as_bytes())));
        assert!(!matches_hash(
            "nope",
            &muscle_protocol::sha256_hex(c.as_bytes())
        ));
    }
}
