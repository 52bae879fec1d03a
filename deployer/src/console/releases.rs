//! The releases page: every version with its counter, signature, and per-arch binaries with the
//! facts the ELF inspection proved of them.

use std::fmt::Write;

use muscle_protocol::{ManifestArtifact, ReleaseManifest};

use super::html::{esc, table, when};
use crate::store::ReleaseRecord;

pub fn list(releases: &[ReleaseRecord]) -> String {
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
        let signed = if r.signature.is_some() {
            "<span class=\"signed\">signed</span>"
        } else {
            "<span class=\"unsigned\">unsigned</span>"
        };
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
