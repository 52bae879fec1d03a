//! `muscle-deploy --server URL`: the CLI speaking the operators' API (`crate::api`) with a token
//! from `MUSCLE_TOKEN`, for operators and CI jobs that are not on the deployer's host.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use muscle_protocol::ReleaseManifest;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::Identity;
use crate::control::{Control, Which};
use crate::ops::{StartRequest, Started, UndeployRequest, Undeployed};
use crate::publish::PublishOutcome;
use crate::rollout::{Request, Rollout};
use crate::store::{AuditEntry, Permission};
use crate::views::{AgentDetail, FleetRow, ReleaseRow};

/// The largest answer read (the fleet of 10,000 agents is a few MiB).
const MAX_ANSWER: u64 = 256 << 20;

pub struct Remote {
    base: String,
    token: Option<String>,
    http: ureq::Agent,
}

impl Remote {
    pub fn new(url: &str, token: Option<String>) -> Result<Remote> {
        let base = url.trim_end_matches('/').to_owned();
        if base.starts_with("https://") {
            bail!(
                "--server {url}: the CLI speaks plain http:// to a deployer for now; reach an \
                 HTTPS deployer through a local tunnel (ssh -L) or run the command on its host"
            );
        }
        if !base.starts_with("http://") || base.len() <= "http://".len() {
            bail!("--server {url:?}: expected the deployer's URL, like http://deployer.lan:7700");
        }
        let http = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(120))
            .timeout_write(Duration::from_secs(120))
            .build();
        Ok(Remote {
            base,
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.http.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.answer(path, self.request("GET", path).call())
    }

    fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.answer(path, self.request("POST", path).send_json(body))
    }

    /// The answer's JSON, or the deployer's error (its `error` field) with the status.
    fn answer<T: DeserializeOwned>(
        &self,
        path: &str,
        sent: Result<ureq::Response, ureq::Error>,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        match sent {
            Ok(resp) => {
                let mut text = String::new();
                resp.into_reader()
                    .take(MAX_ANSWER)
                    .read_to_string(&mut text)
                    .with_context(|| format!("reading the answer of {url}"))?;
                serde_json::from_str(&text).with_context(|| {
                    format!("{url} answered JSON this muscle-deploy does not understand (another version?)")
                })
            }
            Err(ureq::Error::Status(code, resp)) => {
                let mut text = String::new();
                let _ = resp.into_reader().take(64 << 10).read_to_string(&mut text);
                let message = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or(text);
                let hint = match code {
                    401 => " (set MUSCLE_TOKEN to a token from `muscle-deploy token create`)",
                    _ => "",
                };
                bail!("the deployer answered {code}: {}{hint}", message.trim())
            }
            Err(e) => Err(e).with_context(|| format!("cannot reach the deployer at {url}")),
        }
    }
}

/// Whether the request got an answer at all: requests without a body (steering) say nothing.
#[derive(serde::Deserialize)]
struct Nothing {}

impl Control for Remote {
    fn publish(&self, release: &Path) -> Result<PublishOutcome> {
        let files = release_files(release)?;
        // A deployer refusing the upload answers before reading it and closes the connection,
        // which the sender sees as a reset: ask first.
        let me: Identity = self.get("/v1/whoami")?;
        if !me.role.grants(Permission::Publish) {
            bail!(
                "the deployer knows this token as {} ({}): publishing needs a publisher or \
                 operator token",
                me.who,
                me.role.as_str()
            );
        }
        let (reader, mut writer) = std::io::pipe().context("making a pipe")?;
        let dir = release.to_owned();
        // The tar stream is written as it is sent: no copy of the release is made.
        let packer = std::thread::spawn(move || -> Result<()> {
            let mut tar = tar::Builder::new(&mut writer);
            tar.follow_symlinks(false);
            tar.mode(tar::HeaderMode::Deterministic);
            for name in &files {
                tar.append_path_with_name(dir.join(name), name)
                    .with_context(|| format!("reading {}", dir.join(name).display()))?;
            }
            tar.finish()?;
            Ok(())
        });
        let sent = self
            .request("POST", "/v1/releases")
            .set("Content-Type", "application/x-tar")
            .send(reader);
        let packed = packer.join().expect("the tar thread does not panic");
        match packed {
            // A file that could not be read explains a cut-short upload better than the
            // deployer's answer; a broken pipe is the connection's failure, which `sent` names.
            Err(e) if !is_broken_pipe(&e) => Err(e),
            _ => self.answer("/v1/releases", sent),
        }
    }

    fn releases(&self) -> Result<Vec<ReleaseRow>> {
        self.get("/v1/releases")
    }

    fn fleet(&self) -> Result<Vec<FleetRow>> {
        self.get("/v1/fleet")
    }

    fn agent(&self, id: &str) -> Result<Option<AgentDetail>> {
        let path = format!("/v1/agents/{id}");
        match self.request("GET", &path).call() {
            Err(ureq::Error::Status(404, _)) => Ok(None),
            sent => self.answer(&path, sent).map(Some),
        }
    }

    fn rollout(&self, which: Which) -> Result<Option<Rollout>> {
        let path = match which {
            Which::Id(id) => format!("/v1/rollouts/{id}"),
            Which::Newest => "/v1/rollouts/newest".to_owned(),
        };
        match self.request("GET", &path).call() {
            Err(ureq::Error::Status(404, _)) => Ok(None),
            sent => self.answer(&path, sent).map(Some),
        }
    }

    fn start_rollout(&self, req: StartRequest) -> Result<Started> {
        self.post("/v1/rollouts", &req)
    }

    fn ask(&self, id: i64, what: Request) -> Result<()> {
        let path = format!("/v1/rollouts/{id}/{}", what.as_str());
        let sent = self.request("POST", &path).call();
        match sent {
            Ok(_) => Ok(()),
            sent => self.answer::<Nothing>(&path, sent).map(|_| ()),
        }
    }

    fn undeploy(&self, req: &UndeployRequest) -> Result<Undeployed> {
        self.post("/v1/undeploy", req)
    }

    fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        self.get(&format!("/v1/audit?limit={limit}"))
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// What a release or boot image directory sends: its manifest, the signature if there is one,
/// and the files the manifest lists (the deployer re-checks each).
fn release_files(dir: &Path) -> Result<Vec<String>> {
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read(&manifest_path).with_context(|| {
        format!(
            "cannot read {} (is {} a directory written by `cargo xtask release` or `cargo xtask image`?)",
            manifest_path.display(),
            dir.display()
        )
    })?;
    let mut files = vec!["manifest.json".to_owned()];
    if dir.join("manifest.json.sig").exists() {
        files.push("manifest.json.sig".to_owned());
    }
    if muscle_protocol::image::is_image_manifest(&text) {
        let image = muscle_protocol::image::ImageManifest::parse(&text)
            .with_context(|| format!("{}", manifest_path.display()))?;
        for (triple, target) in &image.targets {
            files.extend(target.files().map(|(file, _)| format!("{triple}/{file}")));
        }
        return Ok(files);
    }
    let manifest =
        ReleaseManifest::parse(&text).with_context(|| format!("{}", manifest_path.display()))?;
    files.extend(manifest.artifacts.iter().map(|a| a.path.clone()));
    files.extend(manifest.debug.iter().map(|d| d.path.clone()));
    Ok(files)
}
