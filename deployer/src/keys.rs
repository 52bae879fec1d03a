//! Keys and certificates: `keygen`, `tls init`, and the release keys `publish` trusts.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cli::parse_host_name;
use crate::{certs, now_ms};

pub fn load_keys(flags: &[String], data_dir: &Path) -> Result<Vec<muscle_protocol::PublicKey>> {
    let file = data_dir.join("trusted-keys");
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let from_file = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|k| (k, file.display().to_string()));
    flags
        .iter()
        .map(|k| (k.as_str(), "--trusted-key".to_owned()))
        .chain(from_file)
        .map(|(k, source)| muscle_protocol::parse_public_key(k).with_context(|| source))
        .collect()
}

pub fn tls_init(out: &Path, names: &[String]) -> Result<()> {
    let names = if names.is_empty() {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        if let Ok(host) = parse_host_name(host.trim()) {
            names.push(host);
        }
        names
    } else {
        names.to_vec()
    };
    let from = muscle_logline::Civil::from_unix((now_ms() / 1000).saturating_sub(86_400));
    let w = certs::init(out, &names, from)?;
    // An IPv6 address goes in brackets in a URL.
    let host = if names[0].contains(':') {
        format!("[{}]", names[0])
    } else {
        names[0].clone()
    };
    println!(
        "certificates for {} written to {} (valid for 10 years; keep ca.key offline)\n\
         serve:  muscle-deploy serve --tls-cert {} --tls-key {}\n\
         agents: muscle-agent run --server https://{}:7700 --ca-file {}",
        names.join(", "),
        out.display(),
        w.cert.display(),
        w.key.display(),
        host,
        w.ca.display()
    );
    Ok(())
}

pub fn keygen(out: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .context("reading /dev/urandom")?;
    let key = muscle_protocol::SigningKey::from_seed(&seed);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
    writeln!(file, "{}", hex::encode(seed))?;
    println!("{}", muscle_protocol::public_key_hex(&key));
    eprintln!(
        "private key written to {} (mode 0600); the line above is the public key to trust",
        out.display()
    );
    Ok(())
}
