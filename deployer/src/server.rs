//! `muscle-deploy serve`: the agents' API, blob downloads, JSON views, and the rollout engine.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use muscle_protocol::{
    sha256_hex, Artifact, CheckinRequest, CheckinResponse, DesiredApp, DesiredEntry, Name,
    ReleaseManifest, MAX_CHECKIN_BYTES,
};

use crate::auth;
pub use crate::auth::Auth;
use crate::listen::{self, Limits};
use crate::store::{is_blob_name, AuditEntry, BlobStore, Change, EngineLease, Store};
use crate::{engine, now_ms};
use muscle_protocol::image::ImageArch;
use tokio_rustls::TlsAcceptor;

#[derive(Clone)]
pub struct Server {
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    /// Where agents download blobs from, when not from this server (a CDN, nginx, ...).
    pub blob_base_url: Option<String>,
    pub auth: Auth,
    /// Wakes the rollout engine before its next tick: an agent reported a change.
    pub engine_wake: Arc<tokio::sync::Notify>,
    /// Wakes agents' job polls.
    pub job_wake: crate::job_api::JobWake,
    /// Where uploads are staged (DATA_DIR/uploads) and DATA_DIR/trusted-keys is read.
    pub data_dir: std::path::PathBuf,
    /// `serve --trusted-key`, beside DATA_DIR/trusted-keys.
    pub trusted_keys: Vec<String>,
    /// Release uploads staged at once.
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// Served over TLS: the console's cookies are marked Secure.
    pub tls: bool,
    /// Cancelled when the server stops: endless answers (the console's live pages) end with it.
    pub stopping: tokio_util::sync::CancellationToken,
    /// What the console's pages share: their live streams' slots, the fleet's snapshot.
    pub console: crate::console::Shared,
    /// How network-booted machines are booted (`serve --boot-*`).
    pub boot: crate::boot::BootSettings,
}

pub fn router(server: Server) -> Router {
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/checkin", post(checkin))
        .route("/v1/jobs/poll", post(crate::job_api::poll))
        .route("/v1/jobs/result", post(crate::job_api::result))
        .route("/v1/logs/batch", post(crate::job_api::log_batch))
        .route("/v1/blobs/sha256/{hex}", get(blob))
        .merge(crate::api::routes())
        .merge(crate::boot::routes())
        .merge(crate::install::routes())
        .merge(crate::console::routes(&server))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_CHECKIN_BYTES))
        .layer(axum::middleware::from_fn(request_deadline))
        .with_state(server)
}

/// The least time between two engine steps, whatever wakes it.
const MIN_ENGINE_GAP: Duration = Duration::from_millis(50);

/// Between two engine steps, at least this many times as long as the last one took: a step
/// reads every agent, and on a large fleet over the wire (PostgreSQL) back-to-back steps would
/// keep a connection and a core busy that check-ins need.
const ENGINE_REST: u32 = 3;

/// The longest such rest: a step slowed by a struggling store still leaves deadlines judged
/// within seconds.
const MAX_ENGINE_REST: Duration = Duration::from_secs(2);

/// Serves until SIGTERM or Ctrl-C (over TLS with `tls`), advancing rollouts every `tick`.
pub async fn serve(
    server: Server,
    listener: tokio::net::TcpListener,
    tick: Duration,
    tls: Option<TlsAcceptor>,
    limits: Limits,
) -> anyhow::Result<()> {
    // Named for the audit log: which host and port took the engine over.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let replica = format!("{}:{}", host.trim(), listener.local_addr()?.port());
    let engine = tokio::spawn(run_engine(
        server.store.clone(),
        server.engine_wake.clone(),
        tick,
        replica,
    ));
    let flusher = tokio::spawn(flush_checkins_every(
        server.store.clone(),
        CHECKIN_FLUSH_INTERVAL,
    ));
    let checkins = server.store.clone();
    let stopping = server.stopping.clone();
    let shutdown = async move {
        shutdown_signal().await;
        stopping.cancel();
    };
    listen::serve(listener, router(server), tls, limits, shutdown).await;
    engine.abort();
    flusher.abort();
    // Every check-in answered is written before the deployer stops.
    flush_checkins(checkins).await;
    say!("stopped");
    Ok(())
}

/// Advances rollouts every `tick`, and at once when a check-in reported a change, while this
/// replica holds the engine lease.
async fn run_engine(
    store: Arc<dyn Store>,
    wake: Arc<tokio::sync::Notify>,
    tick: Duration,
    replica: String,
) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held = false;
    loop {
        // A reported change (a member healthy, failed, rolled back) is judged at once; the
        // tick covers deadlines and agents that stay silent.
        tokio::select! {
            _ = interval.tick() => {}
            _ = wake.notified() => {}
        }
        let (store, replica) = (store.clone(), replica.clone());
        let started = tokio::time::Instant::now();
        let step = tokio::task::spawn_blocking(move || -> crate::store::Result<_> {
            match store.engine_lease()? {
                EngineLease::Elsewhere => return Ok(None),
                EngineLease::Held { taken: true } => store.record(&AuditEntry {
                    at_ms: now_ms(),
                    who: format!("replica:{replica}"),
                    change: Change::EngineTakeover { replica },
                })?,
                EngineLease::Sole | EngineLease::Held { taken: false } => {}
            }
            engine::tick(store.as_ref(), now_ms()).map(Some)
        })
        .await;
        let now_held = match step {
            Ok(Ok(Some(log))) => {
                log.iter().for_each(|line| say!("{line}"));
                true
            }
            Ok(Ok(None)) => false,
            Ok(Err(e)) => {
                say!("rollout engine: {e}");
                held
            }
            Err(e) => {
                say!("rollout engine panicked: {e}");
                held
            }
        };
        if now_held != held {
            match now_held {
                true => say!("rollout engine: this replica runs rollouts"),
                false => say!("rollout engine: another replica runs rollouts"),
            }
            held = now_held;
        }
        // However many agents report changes, the engine runs at most this often.
        let rest = (started.elapsed() * ENGINE_REST).min(MAX_ENGINE_REST);
        tokio::time::sleep(MIN_ENGINE_GAP.max(rest)).await;
    }
}

/// How long a steady check-in (nothing changed but its times) waits in memory to be written
/// with the others: what a crash loses of agents' last-seen times and health durations.
pub const CHECKIN_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

async fn flush_checkins_every(store: Arc<dyn Store>, every: Duration) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        flush_checkins(store.clone()).await;
    }
}

async fn flush_checkins(store: Arc<dyn Store>) {
    match tokio::task::spawn_blocking(move || store.flush_checkins()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => say!("writing check-ins: {e}"),
        Err(e) => say!("writing check-ins panicked: {e}"),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// How long a request may take to arrive and be answered (the answer's body, a blob download,
/// streams on without it): a client that trickles its body cannot hold a connection.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

async fn request_deadline(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let deadline = if crate::api::is_upload(&request) {
        crate::api::UPLOAD_DEADLINE
    } else {
        REQUEST_DEADLINE
    };
    match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request was not received and answered within {deadline:?}"),
        )
        .into_response(),
    }
}

/// An error answer: a status and a JSON body naming what was wrong.
pub(crate) struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// Runs `f` with the store off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

pub(crate) fn unauthorized(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, why.into())
}

pub(crate) fn parse_checkin(body: &[u8]) -> Result<CheckinRequest, ApiError> {
    // The path names the field that was wrong: `agent_id: "../x" starts with '.'`.
    let de = &mut serde_json::Deserializer::from_slice(body);
    let req: CheckinRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid check-in body: {e}"),
        )
    })?;
    validate(&req).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    Ok(req)
}

/// `POST /v1/enroll`: an agent presents the enrolment token and its first report, and gets its
/// own credential, once.
async fn enroll(
    State(s): State<Server>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(token) = &s.auth.enroll_token else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "enrolment is not enabled on this deployer (serve --enroll-token)".into(),
        ));
    };
    let bearer = auth::bearer(&headers).unwrap_or_default().to_owned();
    if !auth::same_secret(&bearer, token) {
        return crate::boot::enrol_with_boot_token(&s, &bearer, &body).await;
    }
    let req = parse_checkin(&body)?;
    let store = s.store.clone();
    tokio::task::spawn_blocking(move || {
        let already = || {
            let why = format!(
                "agent {} is already enrolled; an agent enrols once",
                req.agent_id
            );
            ApiError(StatusCode::CONFLICT, why)
        };
        if store
            .credential_sha256(&req.agent_id)
            .map_err(internal)?
            .is_some()
        {
            return Err(already());
        }
        store.record_checkin(&req, now_ms()).map_err(internal)?;
        let credential = auth::new_credential().map_err(internal)?;
        let hash = muscle_protocol::sha256_hex(credential.as_bytes());
        if !store
            .set_credential(&req.agent_id, &hash)
            .map_err(internal)?
        {
            return Err(already());
        }
        Ok(Json(serde_json::json!({ "credential": credential })))
    })
    .await
    .map_err(internal)?
}

/// With enrolment on, a check-in must carry the credential of the agent it names; nothing of a
/// refused check-in is recorded.
pub(crate) fn check_agent_credential(
    s: &Server,
    headers: &HeaderMap,
    agent_id: &str,
) -> Result<(), ApiError> {
    if s.auth.enroll_token.is_none() {
        return Ok(());
    }
    let presented = auth::bearer(headers).ok_or_else(|| {
        unauthorized("check-ins need `Authorization: Bearer <agent credential>`; enrol first")
    })?;
    match s.store.credential_sha256(agent_id).map_err(internal)? {
        Some(hash) if auth::matches_hash(presented, &hash) => Ok(()),
        _ => Err(unauthorized(format!(
            "invalid credential for agent {agent_id}"
        ))),
    }
}

/// Whether the request's bearer may do `need`, and who it is for the audit log: the admin
/// token may do anything, a stored token what its role grants. With neither an admin token nor
/// any stored token, the API stays open (a deployer on loopback, as before tokens).
/// Who is calling (from the bearer token) and what they may do: the admin token and an open
/// deployer (no admin token, no stored token) may do everything.
pub(crate) fn identify(
    s: &Server,
    headers: &HeaderMap,
) -> Result<(String, crate::store::Role), ApiError> {
    identify_token(s, auth::bearer(headers))
}

/// Who calls an open deployer (no admin token, no stored token).
pub(crate) const ANONYMOUS: &str = "anonymous";

/// [`identify`] for a token however it came (the console's comes in a cookie).
pub(crate) fn identify_token(
    s: &Server,
    token: Option<&str>,
) -> Result<(String, crate::store::Role), ApiError> {
    use crate::store::Role;
    if let (Some(t), Some(admin)) = (token, &s.auth.admin_token) {
        if auth::same_secret(t, admin) {
            return Ok(("token:admin".into(), Role::Operator));
        }
    }
    let stored = match token {
        Some(t) => s.store.token(&sha256_hex(t.as_bytes())).map_err(internal)?,
        None => None,
    };
    match stored {
        Some((name, role)) => Ok((format!("token:{name}"), role)),
        None if s.auth.admin_token.is_none() && s.store.tokens().map_err(internal)?.is_empty() => {
            Ok((ANONYMOUS.into(), Role::Operator))
        }
        None => Err(unauthorized(
            "this endpoint needs `Authorization: Bearer <token>`: the admin token or one made by \
             `muscle-deploy token create`",
        )),
    }
}

/// Who is calling, if they may do what `need` names.
pub(crate) fn check_access(
    s: &Server,
    headers: &HeaderMap,
    need: crate::store::Permission,
) -> Result<String, ApiError> {
    let (who, role) = identify(s, headers)?;
    may(who, role, need)
}

/// `who`, if `role` grants `need`.
pub(crate) fn may(
    who: String,
    role: crate::store::Role,
    need: crate::store::Permission,
) -> Result<String, ApiError> {
    if role.grants(need) {
        Ok(who)
    } else {
        Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("{who} is {}: it may not do this", role.as_str()),
        ))
    }
}

async fn checkin(
    State(s): State<Server>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<CheckinResponse>, ApiError> {
    let req = parse_checkin(&body)?;
    check_agent_credential(&s, &headers, &req.agent_id)?;
    if let Some(problem) = &req.problem {
        let clipped: String = problem.chars().take(1024).collect();
        say!("agent {} refused its last answer: {clipped}", req.agent_id);
    }
    if let Some(nonce) = &req.probe_nonce {
        return probed(&s, &req, nonce);
    }

    // Whether the new agent this agent probed checked in (asked before it hands over to it).
    let probe_seen = match &req.confirm_probe {
        Some(nonce) => Some(
            s.store
                .take_probe(&req.agent_id, &sha256_hex(nonce.as_str().as_bytes()))
                .map_err(internal)?,
        ),
        None => None,
    };
    // The hot path, run in place: one cached SQLite statement is cheaper than a hop to the
    // blocking pool (measured by `cargo xtask bench`).
    let recorded = s.store.record_checkin(&req, now_ms()).map_err(internal)?;
    let generation = recorded.generation;
    let events = history(&req, recorded.previous);
    if !events.is_empty() {
        let (store, agent) = (s.store.clone(), req.agent_id.to_string());
        tokio::task::spawn_blocking(move || store.add_events(&agent, now_ms(), &events))
            .await
            .map_err(internal)?
            .map_err(internal)?;
    }
    if req.changed {
        // Recorded first, so the engine reads it; a busy engine keeps the permit for later.
        s.engine_wake.notify_one();
    }
    if generation == req.generation {
        return Ok(Json(CheckinResponse {
            generation,
            unchanged: true,
            apps: vec![],
            removed: vec![],
            probe_seen,
            image: None,
        }));
    }
    let store = s.store.clone();
    let blob_base = s.blob_base_url.clone();
    let (apps, removed, image) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let apps = desired_apps(
            store.as_ref(),
            &req.agent_id,
            &req.arch,
            blob_base.as_deref(),
        )?;
        let removed = store.removals(&req.agent_id)?;
        let image = match ImageArch::from_rust(&req.arch) {
            Some(arch) => crate::images::assigned(store.as_ref(), &req.agent_id, arch)?,
            None => None,
        };
        Ok((apps, removed, image))
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    Ok(Json(CheckinResponse {
        generation,
        unchanged: false,
        apps: apps
            .into_iter()
            .map(|a| DesiredEntry::App(Box::new(a)))
            .collect(),
        // Names the store took from validated assignments.
        removed: removed.iter().filter_map(|a| Name::parse(a).ok()).collect(),
        probe_seen,
        image,
    }))
}

/// A probe's check-in: a new agent binary proving, before a self-update hands over to it, that
/// it can reach and authenticate to this deployer. Recorded apart: the agent's record still
/// describes the agent that runs.
/// What this check-in adds to the agent's history.
fn history(
    req: &CheckinRequest,
    previous: crate::store::Previous,
) -> Vec<crate::store::AgentEvent> {
    use crate::store::{changes, AgentEvent, Previous};
    let mut events = match previous {
        Previous::Same => vec![],
        Previous::New => {
            let mut e = vec![AgentEvent::Joined {
                arch: req.arch.clone(),
                agent_version: req.agent_version.clone(),
            }];
            e.extend(changes(&[], &req.apps));
            e
        }
        Previous::Changed(old) => changes(&old, &req.apps),
    };
    if let Some(problem) = &req.problem {
        events.push(AgentEvent::Refused {
            reason: problem.chars().take(1024).collect(),
        });
    }
    events
}

fn probed(
    s: &Server,
    req: &CheckinRequest,
    nonce: &muscle_protocol::ProbeNonce,
) -> Result<Json<CheckinResponse>, ApiError> {
    s.store
        .record_probe(
            &req.agent_id,
            &sha256_hex(nonce.as_str().as_bytes()),
            now_ms(),
        )
        .map_err(internal)?;
    say!(
        "agent {} probed its update to agent {}",
        req.agent_id,
        req.agent_version
    );
    Ok(Json(CheckinResponse {
        generation: 0,
        unchanged: true,
        apps: vec![],
        removed: vec![],
        probe_seen: Some(true),
        image: None,
    }))
}

/// What the types do not say already (ids, labels and app names are [`Name`]s, parsed by serde).
fn validate(req: &CheckinRequest) -> Result<(), String> {
    if muscle_inspect::machine_for_arch(&req.arch).is_none() {
        return Err(format!(
            "arch {:?}: expected an architecture as `uname -m` names it (x86_64, aarch64, ...)",
            req.arch
        ));
    }
    Ok(())
}

/// The desired state of one agent: its assignments resolved to artifacts of its architecture.
fn desired_apps(
    store: &dyn Store,
    agent_id: &str,
    arch: &str,
    blob_base: Option<&str>,
) -> crate::store::Result<Vec<DesiredApp>> {
    let mut apps = Vec::new();
    for a in store.assignments(agent_id)? {
        let Some(release) = store.release(&a.app, &a.version)? else {
            continue;
        };
        let Ok(manifest) = ReleaseManifest::parse(release.manifest.as_bytes()) else {
            continue;
        };
        // A signed spec names the binary agents that pin keys will accept.
        let spec = manifest.service.as_ref().unwrap_or(&a.service);
        let binary = spec.binary_name(&a.app).to_owned();
        let Some(artifact) = manifest.artifact(&binary, arch) else {
            say!(
                "{} {} has no {binary} for {} (agent {})",
                a.app,
                a.version,
                arch,
                agent_id
            );
            continue;
        };
        let path = format!("/v1/blobs/sha256/{}", artifact.sha256);
        // Names from the validated manifest: what the store holds was parsed at publish.
        apps.push(DesiredApp {
            app: manifest.app.clone(),
            version: manifest.version.clone(),
            artifact: Artifact {
                url: blob_base.map_or(path.clone(), |base| {
                    format!("{}{path}", base.trim_end_matches('/'))
                }),
                sha256: artifact.sha256.clone(),
                size: artifact.size,
                binary: artifact.binary.clone(),
            },
            manifest: release.manifest.clone(),
            signature: release.signature.clone(),
            service: a.service.clone(),
        });
    }
    Ok(apps)
}

async fn blob(State(s): State<Server>, Path(hex): Path<String>, headers: HeaderMap) -> Response {
    if !is_blob_name(&hex) {
        return ApiError(
            StatusCode::BAD_REQUEST,
            format!("{hex:?} is not a sha256: expected 64 lowercase hex digits"),
        )
        .into_response();
    }
    let etag = format!("\"{hex}\"");
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let blobs = s.blobs.clone();
    let key = hex.clone();
    let blob = match tokio::task::spawn_blocking(move || blobs.open(&key)).await {
        Ok(Ok(Some(blob))) => blob,
        Ok(Ok(None)) => {
            return ApiError(StatusCode::NOT_FOUND, format!("no blob sha256:{hex}")).into_response()
        }
        Ok(Err(e)) => {
            say!("{e}");
            return ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
        }
        Err(e) => return internal(e).into_response(),
    };
    let mut response_headers = HeaderMap::new();
    response_headers.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex is a valid header"),
    );
    // Content-addressed: the bytes behind this URL can never change.
    response_headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let len = blob.len;
    let (status, start, count) = match headers
        .get(header::RANGE)
        .map(|r| parse_range(r.to_str().unwrap_or(""), len))
    {
        None => (StatusCode::OK, 0, len),
        Some(Some((start, end))) => {
            let range = format!("bytes {start}-{end}/{len}");
            response_headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&range).expect("digits"),
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Some(None) => {
            response_headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("digits"),
            );
            return (StatusCode::RANGE_NOT_SATISFIABLE, response_headers).into_response();
        }
    };
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    match stream_file(blob.file, start, count).await {
        Ok(body) => (status, response_headers, body).into_response(),
        Err(e) => internal(e).into_response(),
    }
}

/// `count` bytes of `file` from `start`, read as the client takes them: memory stays at one
/// buffer per download, however large the blob and however slow the reader.
async fn stream_file(mut file: std::fs::File, start: u64, count: u64) -> std::io::Result<Body> {
    use tokio::io::AsyncReadExt;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(start))?;
    let reader = tokio::fs::File::from_std(file).take(count);
    Ok(Body::from_stream(
        tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024),
    ))
}

/// `bytes=START-[END]` or `bytes=-SUFFIX` within a blob of `len` bytes, as inclusive bounds.
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            (len.checked_sub(n.min(len))?, len.checked_sub(1)?)
        }
        (s, "") => (s.parse().ok()?, len.checked_sub(1)?),
        (s, e) => (
            s.parse().ok()?,
            e.parse::<u64>().ok()?.min(len.checked_sub(1)?),
        ),
    };
    (start <= end && start < len).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some((0, 9)));
        assert_eq!(parse_range("bytes=4-5", 10), Some((4, 5)));
        assert_eq!(parse_range("bytes=4-100", 10), Some((4, 9)));
        assert_eq!(parse_range("bytes=-3", 10), Some((7, 9)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=5-4", 10), None);
        assert_eq!(parse_range("items=0-1", 10), None);
    }
}
