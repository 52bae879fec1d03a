//! The releases page: every version with its counter, signature, and per-arch binaries with the
//! facts the ELF inspection proved of them.

use std::fmt::Write;

use muscle_protocol::{verify_signature, ManifestArtifact, PublicKey, ReleaseManifest};

use super::html::{esc, table, when};
use crate::store::ReleaseRecord;

/// Every release, newest first; signatures checked against the deployer's `trusted` keys.
pub fn list(releases: &[ReleaseRecord], trusted: &[PublicKey]) -> String {
    if releases.is_empty() {
        return "<p>No releases yet: <code>muscle-deploy publish DIR</code> stores one.</p>".into();
    }
    let mut out = String::new();
    for r in releases.iter().rev() {
        let _ = write!(
            out,
            "<section class=\"release\" data-release=\"{app} {version}\"><h2>{app} {version}</h2>",
            app = esc(&r.app),
            version = esc(&r.version)
        );
        let signed = signature(r, trusted);
        match ReleaseManifest::parse(r.manifest.as_bytes()) {
            Ok(m) => {
                let _ = write!(
                    out,
                    "<p>counter {} · {signed} · published {} · rustc {} · commit {}</p>",
                    r.counter,
                    when(r.published_ms),
                    esc(m.rustc.lines().next().unwrap_or_default()),
                    esc(m.git_commit.as_deref().unwrap_or("unknown")),
                );
                let rows: Vec<String> = m.artifacts.iter().map(artifact).collect();
                out += &table(
                    "artifacts",
                    &[
                        "Target",
                        "Binary",
                        "Size",
                        "SHA-256",
                        "ELF",
                        "Linking",
                        "Hardening",
                        "Build-id",
                    ],
                    &rows,
                );
            }
            Err(e) => {
                let _ = write!(
                    out,
                    "<p>counter {} · {signed}</p><p class=\"error\">manifest unreadable: {}</p>",
                    r.counter,
                    esc(&e.to_string())
                );
            }
        }
        out += "</section>";
    }
    out
}

fn artifact(a: &ManifestArtifact) -> String {
    let elf = &a.elf;
    let linking = match (&elf.interpreter, elf.needed.is_empty()) {
        (None, true) if elf.static_pie => "static-pie".to_owned(),
        (None, true) => "static".to_owned(),
        (Some(i), _) => format!("dynamic ({})", esc(i)),
        (None, false) => format!("needs {}", esc(&elf.needed.join(", "))),
    };
    let stack = match elf.executable_stack {
        Some(false) => "NX stack",
        Some(true) => "executable stack",
        None => "no stack header",
    };
    let relro = if elf.relro { ", RELRO" } else { "" };
    format!(
        "<tr data-arch=\"{arch}\"><td>{target}</td><td>{binary}</td><td>{size} KiB</td>\
         <td><code title=\"{sha}\">{short}…</code></td><td>ELF{class} {machine} {kind}</td>\
         <td>{linking}</td><td>{stack}{relro}</td><td><code>{build_id}</code></td></tr>",
        arch = esc(&a.arch),
        target = esc(&a.target),
        binary = esc(a.binary.as_str()),
        size = a.size / 1024,
        sha = esc(&a.sha256),
        short = esc(a.sha256.get(..16).unwrap_or(&a.sha256)),
        class = elf.class,
        machine = esc(&elf.machine),
        kind = esc(&elf.elf_type),
        build_id = esc(elf.build_id.as_deref().unwrap_or("none")),
    )
}

/// Whether the release is signed, and by which of the keys this deployer trusts.
fn signature(r: &ReleaseRecord, trusted: &[PublicKey]) -> String {
    let Some(sig) = r.signature.as_deref() else {
        return "<span class=\"unsigned\">unsigned</span>".into();
    };
    if trusted.is_empty() {
        return "<span class=\"signed\">signed</span> (this deployer trusts no key to check it \
                against)"
            .into();
    }
    let by = trusted.iter().find(|k| {
        verify_signature(r.manifest.as_bytes(), Some(sig), std::slice::from_ref(*k)).is_ok()
    });
    match by {
        Some(k) => {
            let key = k.to_hex();
            format!(
                "<span class=\"signed\" data-key=\"{key}\">signed by trusted key {}…</span>",
                &key[..16]
            )
        }
        None => "<span class=\"unsigned\">signed by no key this deployer trusts</span>".into(),
    }
}

#[cfg(test)]
mod tests {
    use muscle_protocol::{sign, SigningKey};

    use super::*;

    #[test]
    fn a_signature_is_named_by_the_trusted_key_that_verifies_it() {
        let key = SigningKey::from_seed(&[7; 32]);
        let other = SigningKey::from_seed(&[8; 32]);
        let manifest = "{\"app\": \"hello\"}".to_owned();
        let release = |signature: Option<String>| ReleaseRecord {
            app: "hello".into(),
            version: "1.0.0".into(),
            counter: 1,
            manifest: manifest.clone(),
            signature,
            published_ms: 0,
        };
        let signed = release(Some(sign(&key, manifest.as_bytes())));
        let shown = signature(&signed, &[other.public_key(), key.public_key()]);
        let hex = key.public_key().to_hex();
        assert!(
            shown.contains(&format!("signed by trusted key {}…", &hex[..16])),
            "{shown}"
        );
        let shown = signature(&signed, &[other.public_key()]);
        assert!(
            shown.contains("signed by no key this deployer trusts"),
            "{shown}"
        );
        assert!(signature(&signed, &[]).contains("trusts no key"));
        assert!(signature(&release(None), &[key.public_key()]).contains("unsigned"));
        let page = list(&[signed], &[key.public_key()]);
        assert!(
            page.contains("manifest unreadable"),
            "a manifest that does not parse says so"
        );
    }
}
