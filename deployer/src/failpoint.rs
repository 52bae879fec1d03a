//! Failpoints: named places where a test can make the deployer die as a crash would, to prove
//! that what it leaves behind is consistent. Armed only by `MUSCLE_FAILPOINTS=name,...`.

/// The variable naming the armed failpoints, comma-separated.
const ARMED: &str = "MUSCLE_FAILPOINTS";

/// Aborts the process (no unwinding, no destructors, no commit) when `name` is armed.
pub fn hit(name: &str) {
    let armed = std::env::var(ARMED).unwrap_or_default();
    if armed.split(',').any(|n| n.trim() == name) {
        say!("failpoint {name}: aborting as a crash would");
        std::process::abort();
    }
}
