//! Network boot: iPXE scripts that boot a machine into the fleet with the newest published
//! image for its architecture. `GET /boot/ipxe` is what a DHCP server hands out as the boot
//! file; it sends the machine on to its own script, naming its MAC address and architecture.
//! The kernel and initramfs are the image's blobs, served by sha256 like every blob.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use muscle_protocol::image::{ImageArch, ImageManifest};

use crate::server::Server;

/// What `serve` says about booting machines.
#[derive(Clone, Debug, Default)]
pub struct BootSettings {
    /// The deployer's URL as booting machines reach it (`--boot-server`); by default, from the
    /// Host header of their request.
    pub server: Option<String>,
    /// Kernel command line words added to every boot (`--boot-args`), checked at start.
    pub args: String,
    /// The enrolment token, put on the kernel command line (`--boot-enroll`).
    pub enroll_token: Option<String>,
}

/// A kernel command line word of `--boot-args`: printable ASCII, and not one the deployer
/// writes itself.
pub fn check_boot_args(args: &str) -> Result<String, String> {
    if args.len() > 1024 {
        return Err("at most 1024 characters".into());
    }
    if let Some(c) = args.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(format!("{c:?}: expected printable ASCII words"));
    }
    if let Some(word) = args
        .split_whitespace()
        .find(|w| w.starts_with("muscle.server=") || w.starts_with("muscle.enroll="))
    {
        return Err(format!(
            "{word}: the deployer writes muscle.server= and muscle.enroll= itself (see --boot-server, --boot-enroll)"
        ));
    }
    Ok(args.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A value that goes into a boot script as one kernel command line word.
pub fn check_boot_word(word: &str) -> anyhow::Result<()> {
    if word.is_empty() || word.len() > 512 || !word.bytes().all(|b| b.is_ascii_graphic()) {
        anyhow::bail!("expected 1 to 512 printable ASCII characters without spaces");
    }
    Ok(())
}

pub fn routes() -> Router<Server> {
    Router::new()
        .route("/boot/ipxe", get(first_script))
        .route("/boot/ipxe/machine", get(machine_script))
}

/// How long a machine with nothing to boot waits before asking again.
const RETRY_SECS: u32 = 30;

fn script(body: String) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("#!ipxe\n{body}"),
    )
        .into_response()
}

async fn first_script() -> Response {
    script(
        "echo Muscle: asking for the script of ${net0/mac:hexhyp} (${buildarch})\n\
         chain /boot/ipxe/machine?mac=${net0/mac:hexhyp}&arch=${buildarch}\n"
            .into(),
    )
}

#[derive(serde::Deserialize)]
struct MachineQuery {
    mac: String,
    arch: String,
}

async fn machine_script(
    State(s): State<Server>,
    headers: HeaderMap,
    Query(q): Query<MachineQuery>,
) -> Response {
    let Some(mac) = parse_mac(&q.mac) else {
        return (
            StatusCode::BAD_REQUEST,
            format!("mac={:?}: expected six hex bytes joined by hyphens", q.mac),
        )
            .into_response();
    };
    let Some(arch) = ImageArch::from_ipxe(&q.arch) else {
        return script(format!(
            "echo Muscle: no boot images for architecture {}: images exist for x86_64 and arm64\nshell\n",
            printable(&q.arch)
        ));
    };
    let Some(server) = s.boot.server.clone().or_else(|| from_host(&headers, s.tls)) else {
        return (
            StatusCode::BAD_REQUEST,
            "no usable Host header: start the deployer with --boot-server URL".to_string(),
        )
            .into_response();
    };
    let store = s.store.clone();
    let newest =
        tokio::task::spawn_blocking(move || crate::images::newest_for(store.as_ref(), arch)).await;
    let (manifest, triple) = match newest {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => {
            return script(format!(
                "echo Muscle: no boot image for {} is published (cargo xtask image; muscle-deploy publish DIR); asking again in {RETRY_SECS} s\n\
                 sleep {RETRY_SECS}\n\
                 chain /boot/ipxe/machine?mac={mac}&arch={}\n",
                arch.as_str(),
                q.arch
            ))
        }
        Ok(Err(e)) => {
            return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
        }
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    script(boot_script(
        &manifest, &triple, arch, &mac, &server, &s.boot,
    ))
}

/// The script that boots `triple`'s image of `manifest`.
fn boot_script(
    manifest: &ImageManifest,
    triple: &str,
    arch: ImageArch,
    mac: &str,
    server: &str,
    settings: &BootSettings,
) -> String {
    let target = manifest
        .for_arch(arch)
        .map(|(_, t)| t)
        .expect("chosen for this arch");
    let console = match arch {
        ImageArch::X86_64 => "console=ttyS0",
        ImageArch::Aarch64 => "console=ttyAMA0",
    };
    let mut cmdline = format!("initrd=initramfs.gz {console} muscle.server={server}");
    if let Some(token) = &settings.enroll_token {
        cmdline.push_str(&format!(" muscle.enroll={token}"));
    }
    if !settings.args.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&settings.args);
    }
    format!(
        "echo Muscle: booting {name} {version} ({triple}) on {mac}\n\
         kernel /v1/blobs/sha256/{kernel} {cmdline}\n\
         initrd --name initramfs.gz /v1/blobs/sha256/{initrd}\n\
         boot\n",
        name = manifest.name,
        version = manifest.version,
        kernel = target.vmlinuz.sha256,
        initrd = target.initramfs.sha256,
    )
}

/// `52-54-00-12-34-56` (iPXE's `hexhyp`), lowercased; nothing else.
fn parse_mac(text: &str) -> Option<String> {
    let parts: Vec<&str> = text.split('-').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| text.to_ascii_lowercase())
}

/// `http://HOST[:PORT]` from the request's Host header, if it is a plain host and port: it goes
/// into a script and onto a kernel command line.
fn from_host(headers: &HeaderMap, tls: bool) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    let scheme = if tls { "https" } else { "http" };
    ok.then(|| format!("{scheme}://{host}"))
}

/// At most 32 characters of `text`, alphanumerics only: it is echoed in a script.
fn printable(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_query_values_are_checked() {
        assert_eq!(
            parse_mac("52-54-00-AB-cd-01").as_deref(),
            Some("52-54-00-ab-cd-01")
        );
        for bad in [
            "",
            "52:54:00:ab:cd:01",
            "52-54-00-ab-cd",
            "52-54-00-ab-cd-01-02",
            "5g-54-00-ab-cd-01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "10.0.2.2:7700".parse().unwrap());
        assert_eq!(
            from_host(&h, false).as_deref(),
            Some("http://10.0.2.2:7700")
        );
        h.insert(header::HOST, "evil\tmuscle.enroll=x".parse().unwrap());
        assert_eq!(from_host(&h, false), None);
        h.insert(header::HOST, "a b".parse().unwrap());
        assert_eq!(from_host(&h, false), None);
        assert_eq!(printable("i386;\nshell"), "i386shell");
    }

    #[test]
    fn boot_args_are_words_the_deployer_does_not_write() {
        assert_eq!(
            check_boot_args("  quiet   muscle.label=a=b ").unwrap(),
            "quiet muscle.label=a=b"
        );
        assert!(check_boot_args("muscle.server=http://x")
            .unwrap_err()
            .contains("--boot-server"));
        assert!(check_boot_args("a\nb").is_err());
        assert!(check_boot_args(&"a".repeat(1025)).is_err());
    }
}
