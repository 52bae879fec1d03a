//! `muscle-init`: PID 1 of a Muscle network-boot image. It mounts the kernel's file systems,
//! loads the network drivers the image carries, brings the first Ethernet interface up with
//! DHCP, and runs the agent with what the kernel command line says (`muscle.server=`,
//! `muscle.enroll=`, `muscle.label=`...), its state on tmpfs. It never exits: the kernel panics
//! when PID 1 does.
#![forbid(unsafe_code)]

mod cmdline;
mod dhcp;
mod net;
mod supervise;
mod system;

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

fn main() {
    if rustix::process::getpid() != rustix::process::Pid::INIT {
        eprintln!(
            "muscle-init is PID 1 of a Muscle boot image (cargo xtask image); it does nothing as an ordinary process"
        );
        std::process::exit(2);
    }
    say!("{} starting", env!("CARGO_PKG_VERSION"));
    if let Err(e) = system::mount_basics() {
        system::reboot_after(&e, Duration::from_secs(30));
    }
    let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut config = match cmdline::parse(&text) {
        Ok(config) => config,
        Err(e) => system::reboot_after(&e, Duration::from_secs(30)),
    };
    for word in &config.unknown {
        say!("ignoring unknown kernel command line word {word:?}");
    }
    system::load_modules();
    if let Err(e) = net::loopback_up() {
        say!("loopback: {e}");
    }
    let iface = match net::wait_for_interface(config.interface.as_deref(), INTERFACE_WAIT) {
        Ok(iface) => iface,
        Err(e) => system::reboot_after(&e, Duration::from_secs(30)),
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

/// A lease, however long it takes: a machine with no network has nothing else to do.
fn obtain_lease(iface: &net::Interface) -> dhcp::Lease {
    loop {
        match dhcp::acquire(iface, DHCP_ROUND).and_then(|lease| {
            net::configure(iface, &lease)
                .map(|()| lease)
                .map_err(|e| dhcp::DhcpError::Socket {
                    iface: iface.name.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
        }) {
            Ok(lease) => return lease,
            Err(e) => {
                say!("{e}; asking again in {} s", RETRY.as_secs());
                std::thread::sleep(RETRY);
            }
        }
    }
}

/// Renews at half the lease, as RFC 2131's T1; a changed address is configured as granted.
fn renew_in_background(iface: net::Interface, mut lease: dhcp::Lease) {
    std::thread::spawn(move || loop {
        std::thread::sleep(lease.duration / 2);
        let renewed = obtain_lease(&iface);
        if renewed.address != lease.address {
            say!("{}: the address is now {}", iface.name, renewed.address);
        }
        lease = renewed;
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
