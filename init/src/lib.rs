//! `muscle-init`, PID 1 of a Muscle network-boot image: its parts, as a library so that the
//! parsers of outside bytes (the kernel command line, DHCP replies) can be fuzzed; the binary
//! (`main.rs`) puts them in order.
#![forbid(unsafe_code)]

pub mod cmdline;
pub mod dhcp;
pub mod net;
pub mod supervise;
pub mod system;

/// A line on the console. Never panics: PID 1 must outlive a console that fails.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), "muscle-init: {}", format_args!($($arg)*));
    }};
}
