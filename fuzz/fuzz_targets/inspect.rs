//! ELF inspection, as publish and the agent run it on bytes from elsewhere: it must return (an
//! error is fine) for any input, quickly.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(facts) = muscle_inspect::inspect_bytes(data) {
        if let Some(expect) = muscle_inspect::Expectation::for_host() {
            let _ = muscle_inspect::verify(&facts, &expect);
        }
    }
    let _ = muscle_inspect::build_id_of(data);
});
