//! Network boot: iPXE scripts that boot a machine into the fleet with the newest published
//! image for its architecture. `GET /boot/ipxe` is what a DHCP server hands out as the boot
//! file; it sends the machine on to its own script, naming its MAC address and architecture.
//! The kernel and initramfs are the image's blobs, served by sha256 like every blob.
//!
//! With `serve --boot-enroll` each script carries a fresh enrolment token for that machine
//! alone (its id follows its MAC address, as `muscle-init` names it): taken once, within
//! [`BOOT_TOKEN_LIFETIME_MS`], it enrols the machine again, replacing the credential of its
//! previous boot (which went with its tmpfs), unless that id enrolled with the fleet's token.
//! The fleet's enrolment token never leaves the deployer.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use muscle_protocol::image::{ImageArch, ImageManifest};

use crate::server::{internal, parse_checkin, unauthorized, ApiError, Server};

/// What `serve` says about booting machines.
#[derive(Clone, Debug, Default)]
pub struct BootSettings {
    /// The deployer's URL as booting machines reach it (`--boot-server`); by default, from the
    /// Host header of their request.
    pub server: Option<String>,
    /// Kernel command line words added to every boot (`--boot-args`), checked at start.
    pub args: String,
    /// Give each boot script a one-time enrolment token for its machine (`--boot-enroll`).
    pub enrol: bool,
}

/// How long a boot script's enrolment token may wait for its machine's agent: booting takes
/// seconds, a slow download over iPXE a few minutes.
pub const BOOT_TOKEN_LIFETIME_MS: u64 = 15 * 60 * 1000;

/// `--boot-args`: printable ASCII words, none that the deployer writes itself or that names
/// one machine, none that iPXE would expand (`$`, braces), and `KEY=VALUE` where init wants it.
pub fn check_boot_args(args: &str) -> Result<String, String> {
    if args.len() > 1024 {
        return Err("at most 1024 characters".into());
    }
    if let Some(c) = args
        .chars()
        .find(|c| !(c.is_ascii_graphic() || *c == ' ') || "${}".contains(*c))
    {
        return Err(format!(
            "{c:?}: expected printable ASCII words without $, {{ or }} (iPXE expands those)"
        ));
    }
    let ours = ["server", "enroll", "id", "iface", "mac", "image"].map(|k| format!("muscle.{k}="));
    for word in args.split_whitespace() {
        if ours.iter().any(|o| word.starts_with(o.as_str())) {
            return Err(format!(
                "{word}: the deployer writes muscle.server=, muscle.enroll=, muscle.mac= and muscle.image= itself (see --boot-server, --boot-enroll), and each machine is named after its MAC address"
            ));
        }
        let pair = ["muscle.label=", "muscle.var="]
            .iter()
            .find_map(|k| word.strip_prefix(k));
        if pair.is_some_and(|v| !v.contains('=')) {
            return Err(format!("{word}: expected KEY=VALUE after the ="));
        }
    }
    Ok(args.split_whitespace().collect::<Vec<_>>().join(" "))
}

pub fn routes() -> Router<Server> {
    Router::new()
        .route("/boot/ipxe", get(first_script))
        .route("/boot/ipxe/machine", get(machine_script))
}

/// How long a machine waits before asking again when there is nothing to boot yet, or the
/// deployer could not answer (a boot storm must not send machines to their next boot device).
const RETRY_SECS: u32 = 30;

/// An iPXE script; never cached (a machine's script may carry its one-time token).
fn script(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        format!("#!ipxe\n{body}"),
    )
        .into_response()
}

/// `netX` is the interface iPXE booted from: the machine is asked about by its MAC address.
/// Every wait happens here, in one loop: a machine script that cannot boot the machine yet
/// says why and exits, and this script asks again (a chain from a chain would nest scripts
/// until iPXE runs out of stack).
async fn first_script() -> Response {
    script(first_script_body())
}

fn first_script_body() -> String {
    format!(
        ":ask\n\
         echo Muscle: asking for the script of ${{netX/mac:hexhyp}} (${{buildarch}})\n\
         chain /boot/ipxe/machine?mac=${{netX/mac:hexhyp}}&arch=${{buildarch}} || goto wait\n\
         :wait\n\
         echo Muscle: asking again in {RETRY_SECS} s\n\
         sleep {RETRY_SECS}\n\
         goto ask\n"
    )
}

/// A machine script that says why the machine cannot boot yet and returns to the first
/// script's loop, which asks again.
fn not_yet(why: &str) -> Response {
    script(format!("echo Muscle: {why}\nexit 1\n"))
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
            format!(
                "mac={:?}: expected six hex bytes joined by hyphens",
                printable(&q.mac)
            ),
        )
            .into_response();
    };
    let Some(arch) = ImageArch::from_ipxe(&q.arch) else {
        // Said every 30 s: a machine of another architecture has nothing to boot here.
        return not_yet(&format!(
            "no boot images for architecture {}: they exist for x86_64 and arm64",
            printable(&q.arch)
        ));
    };
    let Some(server) = public_url(&s, &headers) else {
        return (
            StatusCode::BAD_REQUEST,
            "no usable Host header: start the deployer with --boot-server URL".to_string(),
        )
            .into_response();
    };
    if server.starts_with("https://") {
        // The initramfs holds no CA bundle: the agent could not trust the deployer.
        return not_yet(
            "boot images trust no TLS certificate yet: give the deployer --boot-server http://...",
        );
    }
    let store = s.store.clone();
    let id = machine_id(&mac);
    let chosen =
        tokio::task::spawn_blocking(move || crate::images::for_machine(store.as_ref(), &id, arch))
            .await;
    let (manifest, triple) = match chosen {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => {
            let why = format!(
                "no boot image for {} is published (cargo xtask image; muscle-deploy publish DIR)",
                arch.as_str()
            );
            return not_yet(&why);
        }
        Ok(Err(e)) => return store_failed(&mac, &e),
        Err(e) => return store_failed(&mac, &e),
    };
    let token = if s.boot.enrol {
        match issue_token(&s, &mac).await {
            Ok(token) => Some(token),
            Err(e) => return store_failed(&mac, &e.1),
        }
    } else {
        None
    };
    script(boot_script(
        &manifest,
        &triple,
        arch,
        &mac,
        &server,
        token.as_deref(),
        &s.boot.args,
    ))
}

/// The store failed: said in the deployer's log, not to the machine, which asks again.
fn store_failed(mac: &str, e: &dyn std::fmt::Display) -> Response {
    say!("boot script for {mac}: {e}");
    not_yet("the deployer could not answer")
}

/// The fleet id `muscle-init` gives a machine: `muscle-` and its MAC address in iPXE's hexhyp.
fn machine_id(mac: &str) -> String {
    format!("muscle-{mac}")
}

/// A fresh one-time enrolment token for the machine with `mac`; the store keeps its sha256.
async fn issue_token(s: &Server, mac: &str) -> Result<String, ApiError> {
    let token = crate::auth::new_credential().map_err(internal)?;
    let sha = muscle_protocol::sha256_hex(token.as_bytes());
    let (store, id) = (s.store.clone(), machine_id(mac));
    let now = crate::now_ms();
    tokio::task::spawn_blocking(move || {
        store.issue_boot_token(&id, &sha, now, now + BOOT_TOKEN_LIFETIME_MS)
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    Ok(token)
}

/// `POST /v1/enroll` with a bearer that is not the fleet's enrolment token: a boot script's
/// one-time token, good for the machine it was issued to, if that machine is new or enrolled
/// this way before (never one enrolled with the fleet's token). Store failures are logged and
/// answered 503 without their text: the caller is not authenticated yet.
pub async fn enrol_with_boot_token(
    s: &Server,
    bearer: &str,
    body: &[u8],
) -> Result<Json<serde_json::Value>, ApiError> {
    let refused = || {
        unauthorized("enrolment needs `Authorization: Bearer <enrolment token>` (the fleet's, or the one-time token of this machine's boot script)")
    };
    if !s.boot.enrol || bearer.is_empty() {
        return Err(refused());
    }
    let req = parse_checkin(body)?;
    let store = s.store.clone();
    let sha = muscle_protocol::sha256_hex(bearer.as_bytes());
    let unavailable = |e: &dyn std::fmt::Display| {
        say!("enrolment with a boot token: {e}");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the deployer cannot enrol agents right now; try again".into(),
        )
    };
    let outcome = tokio::task::spawn_blocking(move || {
        let now = crate::now_ms();
        let id = &req.agent_id;
        if !store.boot_token_valid(id, &sha, now)? {
            return Ok(None);
        }
        store.record_checkin(&req, now)?;
        let credential = crate::auth::new_credential().map_err(|e| {
            crate::store::StoreError::Corrupt(format!("no randomness for a credential: {e}"))
        })?;
        let hash = muscle_protocol::sha256_hex(credential.as_bytes());
        if !store.enrol_machine(id, &sha, &hash, now)? {
            return Ok(None);
        }
        say!("{id} enrolled with its boot script's token");
        Ok(Some(credential))
    })
    .await
    .map_err(|e| unavailable(&e))?
    .map_err(|e: crate::store::StoreError| unavailable(&e))?;
    match outcome {
        Some(credential) => Ok(Json(serde_json::json!({ "credential": credential }))),
        None => Err(refused()),
    }
}

/// The script that boots `triple`'s image of `manifest`.
fn boot_script(
    manifest: &ImageManifest,
    triple: &str,
    arch: ImageArch,
    mac: &str,
    server: &str,
    enrol_token: Option<&str>,
    extra_args: &str,
) -> String {
    let target = manifest
        .for_arch(arch)
        .map(|(_, t)| t)
        .expect("chosen for this arch");
    let console = match arch {
        ImageArch::X86_64 => "console=ttyS0",
        ImageArch::Aarch64 => "console=ttyAMA0",
    };
    // muscle.image: what this script chose, so that the agent knows a restart can change it.
    let mut cmdline = format!(
        "initrd=initramfs.gz {console} muscle.server={server} muscle.mac={mac} muscle.image={}",
        manifest.version
    );
    if let Some(token) = enrol_token {
        cmdline.push_str(&format!(" muscle.enroll={token}"));
    }
    if !extra_args.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra_args);
    }
    // A download cut short is tried again, not left to the firmware's next boot device.
    format!(
        ":load\n\
         echo Muscle: booting {name} {version} ({triple}) on {mac}\n\
         kernel /v1/blobs/sha256/{kernel} {cmdline} || goto failed\n\
         initrd --name initramfs.gz /v1/blobs/sha256/{initrd} || goto failed\n\
         boot || goto failed\n\
         :failed\n\
         echo Muscle: loading the image failed; trying again in 10 s\n\
         imgfree\n\
         sleep 10\n\
         goto load\n",
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

/// The deployer's URL as machines reach it: `--boot-server`, else from the request's Host.
pub(crate) fn public_url(s: &Server, headers: &HeaderMap) -> Option<String> {
    s.boot.server.clone().or_else(|| from_host(headers, s.tls))
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

    fn manifest() -> ImageManifest {
        let file = |c: char| serde_json::json!({"sha256": c.to_string().repeat(64), "size": 10});
        let target = serde_json::json!({
            "arch": "x86_64",
            "kernel": {"package": "linux-image-x", "version": "1", "deb_sha256": "c".repeat(64)},
            "vmlinuz": file('a'), "initramfs": file('b'), "binaries": {}, "modules": []
        });
        let m = serde_json::json!({
            "schema": 1, "kind": "image", "name": "muscle-image", "version": "0.2.0",
            "source_date_epoch": 1, "git_commit": null, "rustc": "r",
            "targets": {"x86_64-unknown-linux-musl": target}
        });
        ImageManifest::parse(m.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_boot_script_loads_the_image_by_sha256_and_says_who_the_machine_is() {
        let s = boot_script(
            &manifest(),
            "x86_64-unknown-linux-musl",
            ImageArch::X86_64,
            "52-54-00-00-00-01",
            "http://10.0.2.2:7700",
            Some("t0ken"),
            "quiet muscle.label=a=b",
        );
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        assert_eq!(
            kernel,
            format!(
                "kernel /v1/blobs/sha256/{} initrd=initramfs.gz console=ttyS0 muscle.server=http://10.0.2.2:7700 muscle.mac=52-54-00-00-00-01 muscle.image=0.2.0 muscle.enroll=t0ken quiet muscle.label=a=b || goto failed",
                "a".repeat(64)
            )
        );
        assert!(s.contains(&format!(
            "initrd --name initramfs.gz /v1/blobs/sha256/{} || goto failed",
            "b".repeat(64)
        )));
        assert!(
            s.contains("goto load"),
            "a failed download is tried again: {s}"
        );
        let without = boot_script(
            &manifest(),
            "x86_64-unknown-linux-musl",
            ImageArch::X86_64,
            "52-54-00-00-00-01",
            "http://d",
            None,
            "",
        );
        assert!(!without.contains("muscle.enroll="), "{without}");
    }

    /// Every `goto X` has its `:X`.
    fn labels_match(script: &str) {
        let labels: Vec<&str> = script.lines().filter_map(|l| l.strip_prefix(':')).collect();
        for target in script.split("goto ").skip(1) {
            let label = target.split_whitespace().next().unwrap();
            assert!(
                labels.contains(&label),
                "goto {label} has no :{label} in\n{script}"
            );
        }
    }

    #[test]
    fn scripts_jump_to_labels_they_have() {
        labels_match(&first_script_body());
        assert!(first_script_body().contains("${netX/mac:hexhyp}"));
        let s = boot_script(
            &manifest(),
            "x86_64-unknown-linux-musl",
            ImageArch::X86_64,
            "52-54-00-00-00-01",
            "http://d",
            None,
            "",
        );
        labels_match(&s);
    }

    #[test]
    fn boot_args_are_words_the_deployer_does_not_write() {
        for bad in [
            "muscle.id=x",
            "muscle.iface=eth1",
            "muscle.mac=52-54-00-00-00-01",
            "muscle.image=0.1.0",
            "muscle.label=x",
            "a${x}",
            "muscle.var=a}",
        ] {
            assert!(check_boot_args(bad).is_err(), "{bad}");
        }
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
