//! `muscle-init`: PID 1 of a Muscle network-boot image. It mounts the kernel's file systems,
//! loads the network drivers the image carries, brings the network up with DHCP, and runs the
//! agent with what the kernel command line says (`muscle.server=`, `muscle.enroll=`,
//! `muscle.label=`...), its state on tmpfs. It never exits: the kernel panics when PID 1 does.
//! A panic unwinds (its profile says so) to where the machine says what happened and restarts.
#![forbid(unsafe_code)]

mod cmdline;
mod dhcp;
mod net;
mod supervise;
mod system;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

/// A line on the console. Never panics: PID 1 must outlive a console that fails.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), "muscle-init: {}", format_args!($($arg)*));
    }};
}

/// How long the network driver gets to show its interface, and DHCP to answer per round.
const INTERFACE_WAIT: Duration = Duration::from_secs(20);
const DHCP_ROUND: Duration = Duration::from_secs(60);
/// The pause after a failed round (no socket, no answer, a refusal).
const RETRY: Duration = Duration::from_secs(5);
/// How long a machine that cannot go on shows why before it restarts.
const SHOW_WHY: Duration = Duration::from_secs(30);

fn main() {
    if rustix::process::getpid() != rustix::process::Pid::INIT {
        eprintln!(
            "muscle-init is PID 1 of a Muscle boot image (cargo xtask image); it does nothing as an ordinary process"
        );
        std::process::exit(2);
    }
    if let Err(panic) = catch_unwind(boot) {
        let why = panic_text(&*panic);
        system::reboot_after(&format!("PID 1 failed: {why}"), SHOW_WHY);
    }
}

/// Everything PID 1 does, up to supervising the agent for ever.
fn boot() {
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
    let lease = obtain_lease(&iface);
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
/// do. A round that panics (a reply the parser chokes on) counts as a failed round.
fn obtain_lease(iface: &net::Interface) -> dhcp::Lease {
    loop {
        let round = catch_unwind(AssertUnwindSafe(|| {
            let lease = dhcp::acquire(iface, DHCP_ROUND).map_err(|e| e.to_string())?;
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
/// takes whatever lease the network gives and moves the interface to it.
fn renew_in_background(iface: net::Interface, mut lease: dhcp::Lease) {
    std::thread::spawn(move || loop {
        std::thread::sleep(lease.duration / 2);
        let renewed = catch_unwind(AssertUnwindSafe(|| dhcp::renew(&iface, &lease, RETRY * 2)))
            .unwrap_or_else(|panic| {
                Err(dhcp::DhcpError::Socket {
                    iface: iface.name.clone(),
                    source: std::io::Error::other(panic_text(&*panic)),
                })
            });
        let next = match renewed {
            Ok(next) => next,
            Err(e) => {
                say!("renewing {}: {e}; asking for a new lease", lease.address);
                obtain_lease(&iface)
            }
        };
        if next != lease {
            if let Err(e) = net::reconfigure(&iface, &lease, &next) {
                say!("{e}");
            }
            if next.address != lease.address {
                say!("{}: the address is now {}", iface.name, next.address);
            }
            write_resolv_conf(&next);
        }
        lease = next;
    });
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
