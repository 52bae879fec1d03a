//! What a booting machine reads from outside: DHCP replies (from anyone on its network) and the
//! kernel command line (from the boot script). The first byte picks which; neither may panic,
//! since PID 1 parses them.
#![no_main]

use muscle_init::{cmdline, dhcp};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        // Reach past the transaction and address checks: take them from the datagram itself.
        let xid = rest
            .get(4..8)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let mut mac = [0u8; 6];
        if let Some(b) = rest.get(28..34) {
            mac.copy_from_slice(b);
        }
        if let Some(reply) = dhcp::reply_to(rest, xid, &mac) {
            let _ = dhcp::parse_lease(&reply);
        }
    } else if let Ok(text) = std::str::from_utf8(rest) {
        if let Ok(config) = cmdline::parse(text) {
            let _ = config.agent_args("/s");
        }
    }
});
