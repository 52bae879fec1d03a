//! `muscle-init`: PID 1 of a Muscle network-boot image. It mounts the kernel's file systems,
//! loads the network drivers the image carries, brings the network up with DHCP, and runs the
//! agent with what the kernel command line says (`muscle.server=`, `muscle.enroll=`,
//! `muscle.label=`...), its state on tmpfs. It never exits: the kernel panics when PID 1 does.
//! A panic unwinds (its profile says so) to where the machine says what happened and restarts.
#![forbid(unsafe_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use muscle_init::{cmdline, dhcp, net, say, supervise, system};

/// How long the network driver gets to show its interface, and DHCP to answer per round.
const INTERFACE_WAIT: Duration = Duration::from_secs(20);
const DHCP_ROUND: Duration = Duration::from_secs(60);
/// The pause after a failed round (no socket, no answer, a refusal).
const RETRY: Duration = Duration::from_secs(5);
use system::SHOW_WHY;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("muscle-init {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if rustix::process::getpid() != rustix::process::Pid::INIT {
        eprintln!(
            "muscle-init is PID 1 of a Muscle boot image (cargo xtask image); it does nothing as an ordinary process"
        );
        std::process::exit(2);
    }
    match catch_unwind(boot) {
        Ok(never) => match never {},
        Err(panic) => {
            let why = panic_text(&*panic);
            system::reboot_after(&format!("PID 1 failed: {why}"), SHOW_WHY)
        }
    }
}

/// Everything PID 1 does, up to supervising the agent for ever: it never returns.
fn boot() -> std::convert::Infallible {
    say!("{} starting", env!("CARGO_PKG_VERSION"));
    if let Err(e) = system::mount_basics() {
        system::reboot_after(&e, SHOW_WHY);
    }
    let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut config = match cmdline::parse(&text) {
        Ok(config) => config,
        Err(e) => system::reboot_after(&e, SHOW_WHY),
    };
    for word in &config.unknown {
        say!("ignoring unknown kernel command line word {word:?}");
    }
    system::load_modules();
    if let Err(e) = net::loopback_up() {
        say!("loopback: {e}");
    }
    let wanted = match (&config.interface, config.mac) {
        (Some(name), _) => net::Wanted::Name(name),
        (None, Some(mac)) => net::Wanted::Mac(mac),
        (None, None) => net::Wanted::FirstEthernet,
    };
    let iface = match net::wait_for_interface(wanted, INTERFACE_WAIT) {
        Ok(iface) => iface,
        Err(e) => system::reboot_after(&e, SHOW_WHY),
    };
    // DHCP needs the link up before the interface has an address.
    if let Err(e) = net::Rtnl::open().and_then(|mut rtnl| rtnl.link_up(&iface)) {
        say!("{e}");
    }
    let lease = obtain_lease(&iface, None);
    say!(
        "{}: {}/{} via {} from {}",
        iface.name,
        lease.address,
        lease.prefix,
        lease.router.map_or("no router".into(), |r| r.to_string()),
        lease.server
    );
    // The machine's name in the fleet follows its network card, not the boot: state is on
    // tmpfs, and a machine that reboots must come back as the member it was.
    let by_mac = format!("muscle-{}", iface.mac_text());
    system::set_hostname(lease.hostname.as_deref().unwrap_or(&by_mac));
    config.id.get_or_insert(by_mac);
    write_resolv_conf(&lease);
    renew_in_background(iface, lease);
    supervise::run_agent(&config)
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// A lease, configured, however long it takes: a machine with no network has nothing else to
/// do. `prefer` asks the server for that address again. A round that panics (a reply the
/// parser chokes on) counts as a failed round.
fn obtain_lease(iface: &net::Interface, prefer: Option<std::net::Ipv4Addr>) -> dhcp::Lease {
    loop {
        let round = catch_unwind(AssertUnwindSafe(|| {
            let lease = dhcp::acquire(iface, DHCP_ROUND, prefer).map_err(|e| e.to_string())?;
            net::configure(iface, &lease).map_err(|e| e.to_string())?;
            Ok::<_, String>(lease)
        }));
        match round.unwrap_or_else(|panic| Err(panic_text(&*panic))) {
            Ok(lease) => return lease,
            Err(e) => {
                say!("{e}; asking again in {} s", RETRY.as_secs());
                std::thread::sleep(RETRY);
            }
        }
    }
}

/// Renews at half the lease (RFC 2131's T1) by asking for the same address; when that fails,
/// asks for any lease, preferring the same address. Each round is caught whole: a panic is a
/// failed round, tried again, never the end of renewing.
fn renew_in_background(iface: net::Interface, mut lease: dhcp::Lease) {
    std::thread::spawn(move || {
        let mut wait = lease.duration / 2;
        loop {
            std::thread::sleep(wait);
            let round = catch_unwind(AssertUnwindSafe(|| renew_once(&iface, &lease)));
            match round.unwrap_or_else(|panic| Err(panic_text(&*panic))) {
                Ok(next) => {
                    wait = next.duration / 2;
                    lease = next;
                }
                Err(e) => {
                    say!(
                        "renewing {}: {e}; trying again in {} s",
                        lease.address,
                        RETRY.as_secs()
                    );
                    wait = RETRY;
                }
            }
        }
    });
}

/// One renewal: the lease granted, configured (every time: the address is put back if
/// something took it off), the old address taken off if it changed.
fn renew_once(iface: &net::Interface, lease: &dhcp::Lease) -> Result<dhcp::Lease, String> {
    let next = match dhcp::renew(iface, lease, RETRY) {
        Ok(next) => next,
        Err(e) => {
            say!("renewing {}: {e}; asking for a new lease", lease.address);
            dhcp::acquire(iface, DHCP_ROUND, Some(lease.address)).map_err(|e| e.to_string())?
        }
    };
    net::reconfigure(iface, lease, &next).map_err(|e| e.to_string())?;
    if next.address != lease.address {
        say!("{}: the address is now {}", iface.name, next.address);
    }
    write_resolv_conf(&next);
    Ok(next)
}

fn write_resolv_conf(lease: &dhcp::Lease) {
    let text: String = lease
        .dns
        .iter()
        .map(|ip| format!("nameserver {ip}\n"))
        .collect();
    if let Err(e) =
        std::fs::create_dir_all("/etc").and_then(|()| std::fs::write("/etc/resolv.conf", text))
    {
        say!("cannot write /etc/resolv.conf: {e}");
    }
}
