//! Both halves of a check-in: the deployer parses requests from agents, the agent parses answers
//! from the deployer.
#![no_main]

use muscle_protocol::{CheckinRequest, CheckinResponse, DesiredEntry};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<CheckinRequest>(data);
    if let Ok(answer) = serde_json::from_slice::<CheckinResponse>(data) {
        let (apps, _unreadable) = DesiredEntry::split(answer.apps);
        for app in &apps {
            let _ = muscle_protocol::ReleaseManifest::parse(app.manifest.as_bytes());
            let _ = app.service.validate();
        }
    }
});
