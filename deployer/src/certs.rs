//! `muscle-deploy tls init`: a private CA and a server certificate it signs, so that agents can
//! trust exactly this deployer with `--ca-file ca.pem` (a self-signed server certificate cannot
//! serve as its own CA for rustls: `CaUsedAsEndEntity`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use muscle_logline::Civil;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("making the certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("cannot create {path} (it must not exist yet; remove it to make new certificates): {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The files `tls init` wrote.
pub struct Written {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How long the certificates are valid.
const VALID_YEARS: i32 = 10;

/// Writes `ca.pem`, `ca.key`, `server.pem` and `server.key` to `dir`, the server certificate
/// naming `names` (host names or IP addresses), valid from `from` (a day before now, for
/// clocks a little behind) for ten years.
pub fn init(dir: &Path, names: &[String], from: Civil) -> Result<Written, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Create {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "muscle-deploy private CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca, from);
    let ca_cert = ca.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    // Names that parse as IP addresses become IP SANs, the others DNS names.
    let mut server = CertificateParams::new(names.to_vec())?;
    server.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("muscle-deploy", String::as_str),
    );
    server.is_ca = IsCa::ExplicitNoCa;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    validity(&mut server, from);
    let cert = server.signed_by(&key, &ca_cert, &ca_key)?;

    let written = Written {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    write_new(&written.ca, ca_cert.pem(), 0o644)?;
    write_new(&dir.join("ca.key"), ca_key.serialize_pem(), 0o600)?;
    write_new(&written.cert, cert.pem(), 0o644)?;
    write_new(&written.key, key.serialize_pem(), 0o600)?;
    Ok(written)
}

fn validity(params: &mut CertificateParams, from: Civil) {
    let (year, month, day) = (from.year as i32, from.month as u8, from.day as u8);
    params.not_before = rcgen::date_time_ymd(year, month, day);
    // 1 March rather than 29 February ten years on.
    let day = if (month, day) == (2, 29) { 28 } else { day };
    params.not_after = rcgen::date_time_ymd(year + VALID_YEARS, month, day);
}

/// Creates `path` (never overwriting) with `mode`.
fn write_new(path: &Path, text: String, mode: u32) -> Result<(), CertError> {
    let fail = |source| CertError::Create {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_certificate_chains_to_the_ca_and_nothing_is_overwritten() {
        let dir = std::env::temp_dir().join(format!("muscle-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let from = Civil::from_unix(1_795_800_600);
        let written = init(&dir, &names, from).unwrap();
        let ca = std::fs::read_to_string(&written.ca).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
        let key_mode = std::fs::metadata(&written.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
            0o600
        );
        // The listener loads them as it would at `serve`.
        crate::listen::tls_acceptor(&written.cert, &written.key).unwrap();
        let err = init(&dir, &names, from).err().unwrap().to_string();
        assert!(err.contains("must not exist yet"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
