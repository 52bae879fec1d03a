//! The release manifest, as publish and the agent parse it, the boot image manifest, as
//! publish parses it, and the image identity, as the agent reads it; each parsed value must
//! serialize and parse back to itself.
#![no_main]

use muscle_protocol::image::{ImageIdentity, ImageManifest};
use muscle_protocol::ReleaseManifest;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ReleaseManifest::parse(data) {
        let _ = m.check_expiry(0);
        let again = serde_json::to_vec(&m).expect("a parsed manifest serializes");
        assert_eq!(ReleaseManifest::parse(&again).expect("round trip"), m);
    }
    if let Ok(m) = ImageManifest::parse(data) {
        let again = serde_json::to_vec(&m).expect("a parsed image manifest serializes");
        assert_eq!(ImageManifest::parse(&again).expect("round trip"), m);
    }
    if let Ok(id) = ImageIdentity::parse(data) {
        let again = serde_json::to_vec(&id).expect("a parsed identity serializes");
        assert_eq!(ImageIdentity::parse(&again).expect("round trip"), id);
    }
});
