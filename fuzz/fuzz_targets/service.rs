//! Service specs, as TOML files (release, rollout) and as JSON (check-in answers, manifests), and
//! the agent's `${var}` expansion of them.
#![no_main]

use std::collections::BTreeMap;

use muscle_protocol::ServiceSpec;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let from_json = serde_json::from_slice::<ServiceSpec>(data).ok();
    let from_toml = std::str::from_utf8(data)
        .ok()
        .and_then(|text| toml::from_str::<ServiceSpec>(text).ok());
    let vars = BTreeMap::from([("port".to_owned(), "8080".to_owned())]);
    for spec in from_json.iter().chain(&from_toml) {
        let _ = spec.validate();
        let _ = spec.stop_signal_number();
        let _ = spec.expand(&vars);
    }
});
