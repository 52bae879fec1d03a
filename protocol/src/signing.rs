//! ed25519 signatures over release manifests. Keys and signatures are hex text files.
//!
//! ring does the arithmetic: the agent links it for TLS anyway, and one implementation of the
//! curve (not two) is what keeps the agent small.

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// A private signing key, kept as its 32-byte seed (the key file's content).
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        // A 32-byte seed is always a valid ed25519 private key.
        Self(Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32-byte seed is a key"))
    }

    pub fn public_key(&self) -> PublicKey {
        let bytes = self.0.public_key().as_ref();
        PublicKey(bytes.try_into().expect("an ed25519 public key is 32 bytes"))
    }
}

/// A public key a signature is checked against.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The key as `keygen` prints it and `--trusted-key` takes it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("invalid {what}: expected {len} bytes as hex, got {got:?}")]
    Malformed {
        what: &'static str,
        len: usize,
        got: String,
    },
    /// The keys are named by their first hex digits: a mistyped key shows here.
    #[error(
        "the signature does not verify against any of the {n} trusted key(s) ({keys})",
        n = .0.len(),
        keys = .0.join(", ")
    )]
    Untrusted(Vec<String>),
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
    Ok(SigningKey::from_seed(&decode("private key", text)?))
}

/// Reads a public key (64 hex digits). Bytes that are no point of the curve parse, and no
/// signature verifies against them.
pub fn parse_public_key(text: &str) -> Result<PublicKey, SignatureError> {
    Ok(PublicKey(decode("public key", text)?))
}

pub fn public_key_hex(key: &SigningKey) -> String {
    hex::encode(key.public_key().0)
}

/// The hex signature of `message`.
pub fn sign(key: &SigningKey, message: &[u8]) -> String {
    hex::encode(key.0.sign(message))
}

/// Checks `signature` (hex, or `None` when the release is unsigned) over `message` against the
/// trusted keys. With no trusted keys there is nothing to check against, and it passes.
pub fn verify_signature(
    message: &[u8],
    signature: Option<&str>,
    trusted: &[PublicKey],
) -> Result<(), SignatureError> {
    if trusted.is_empty() {
        return Ok(());
    }
    let signature = signature.ok_or(SignatureError::Unsigned)?;
    let signature: [u8; 64] = decode("signature", signature)?;
    if trusted.iter().any(|k| {
        UnparsedPublicKey::new(&ED25519, k.0)
            .verify(message, &signature)
            .is_ok()
    }) {
        Ok(())
    } else {
        let named = trusted
            .iter()
            .map(|k| format!("{}…", &hex::encode(k.0)[..8]));
        Err(SignatureError::Untrusted(named.collect()))
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
            Err(SignatureError::Untrusted(keys)) if keys.len() == 1
        ));
        let err = verify_signature(b"manifesT", Some(&sig), &trusted).unwrap_err();
        assert!(
            err.to_string().contains(&public_key_hex(&key)[..8]),
            "names the key: {err}"
        );
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

    /// RFC 8032, section 7.1, test 2: the keys and signature the standard gives, so a change of
    /// the library under these functions cannot change what a signature means.
    #[test]
    fn agrees_with_rfc_8032() {
        let key =
            parse_signing_key("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
                .unwrap();
        assert_eq!(
            public_key_hex(&key),
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
        );
        let sig = sign(&key, &[0x72]);
        assert_eq!(
            sig,
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
        );
        let trusted = [key.public_key()];
        verify_signature(&[0x72], Some(&sig), &trusted).unwrap();
        // Bytes of the right length that are no point of the curve: nothing verifies.
        let bogus = [parse_public_key(&"ff".repeat(32)).unwrap()];
        assert!(verify_signature(&[0x72], Some(&sig), &bogus).is_err());
    }
}
