//! ed25519 signatures over release manifests. Keys and signatures are hex text files.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("invalid {what}: expected {len} bytes as hex, got {got:?}")]
    Malformed {
        what: &'static str,
        len: usize,
        got: String,
    },
    #[error("the signature does not verify against any of the {0} trusted key(s)")]
    Untrusted(usize),
    #[error("the release is not signed, and trusted keys are configured")]
    Unsigned,
}

fn decode<const N: usize>(what: &'static str, text: &str) -> Result<[u8; N], SignatureError> {
    let text = text.trim();
    let malformed = || SignatureError::Malformed {
        what,
        len: N,
        got: text.chars().take(20).collect(),
    };
    let bytes = hex::decode(text).map_err(|_| malformed())?;
    bytes.try_into().map_err(|_| malformed())
}

/// Reads a private key file's text (64 hex digits).
pub fn parse_signing_key(text: &str) -> Result<SigningKey, SignatureError> {
    Ok(SigningKey::from_bytes(&decode("private key", text)?))
}

/// Reads a public key (64 hex digits).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, SignatureError> {
    VerifyingKey::from_bytes(&decode("public key", text)?).map_err(|_| SignatureError::Malformed {
        what: "public key",
        len: 32,
        got: text.trim().chars().take(20).collect(),
    })
}

pub fn public_key_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

/// The hex signature of `message`.
pub fn sign(key: &SigningKey, message: &[u8]) -> String {
    hex::encode(key.sign(message).to_bytes())
}

/// Checks `signature` (hex, or `None` when the release is unsigned) over `message` against the
/// trusted keys. With no trusted keys there is nothing to check against, and it passes.
pub fn verify_signature(
    message: &[u8],
    signature: Option<&str>,
    trusted: &[VerifyingKey],
) -> Result<(), SignatureError> {
    if trusted.is_empty() {
        return Ok(());
    }
    let signature = signature.ok_or(SignatureError::Unsigned)?;
    let signature = Signature::from_bytes(&decode("signature", signature)?);
    if trusted
        .iter()
        .any(|k| k.verify(message, &signature).is_ok())
    {
        Ok(())
    } else {
        Err(SignatureError::Untrusted(trusted.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_and_refuses_tampering_and_strangers() {
        let key = parse_signing_key(&"11".repeat(32)).unwrap();
        let stranger = parse_signing_key(&"22".repeat(32)).unwrap();
        let trusted = [parse_public_key(&public_key_hex(&key)).unwrap()];
        let sig = sign(&key, b"manifest");
        verify_signature(b"manifest", Some(&sig), &trusted).unwrap();
        assert!(matches!(
            verify_signature(b"manifesT", Some(&sig), &trusted),
            Err(SignatureError::Untrusted(1))
        ));
        let other = sign(&stranger, b"manifest");
        assert!(verify_signature(b"manifest", Some(&other), &trusted).is_err());
        assert!(matches!(
            verify_signature(b"manifest", None, &trusted),
            Err(SignatureError::Unsigned)
        ));
        assert!(verify_signature(b"manifest", None, &[]).is_ok());
        let err = verify_signature(b"m", Some("zz"), &trusted).unwrap_err();
        assert!(err.to_string().contains("expected 64 bytes"), "{err}");
    }
}
