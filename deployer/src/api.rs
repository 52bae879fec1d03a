//! The operators' API: what `muscle-deploy --server URL` speaks. Views need a read-only token,
//! publishing a publisher's, changes an operator's (or the admin token); every change is made by
//! the same code as on the deployer's host (`crate::ops`, `crate::publish`) and audited as the
//! token's.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

use crate::ops::{self, OpError, StartRequest, Started, UndeployRequest, Undeployed};
use crate::publish::PublishOutcome;
use crate::rollout::{Request, Rollout};
use crate::server::{blocking, check_access, identify, internal, ApiError, Server};
use crate::store::{AuditEntry, Permission, Role};
use crate::upload::{Staging, MAX_RELEASE_UPLOAD};
use crate::views::{AgentDetail, FleetRow, ReleaseRow};
use crate::{now_ms, views};

/// How long a release upload may take to arrive and be checked.
pub const UPLOAD_DEADLINE: Duration = Duration::from_secs(600);

pub fn routes() -> Router<Server> {
    Router::new()
        .route("/v1/fleet", get(fleet))
        .route("/v1/agents/{id}", get(agent))
        .route("/v1/releases", get(releases).post(upload_release))
        .route("/v1/rollouts", get(rollouts).post(start_rollout))
        .route("/v1/rollouts/{id}", get(rollout))
        .route("/v1/rollouts/{id}/{request}", post(steer_rollout))
        .route("/v1/undeploy", post(undeploy))
        .route("/v1/audit", get(audit))
        .route("/v1/whoami", get(whoami))
}

/// Release uploads get [`UPLOAD_DEADLINE`] instead of the usual request deadline.
pub fn is_upload(request: &axum::extract::Request) -> bool {
    request.method() == Method::POST && request.uri().path() == "/v1/releases"
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        let status = match &e {
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::Conflict(_) => StatusCode::CONFLICT,
            OpError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            OpError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

async fn fleet(
    State(s): State<Server>,
    headers: HeaderMap,
) -> Result<Json<Vec<FleetRow>>, ApiError> {
    check_access(&s, &headers, Permission::Read)?;
    blocking(move || {
        let agents = s.store.agents().map_err(internal)?;
        Ok(Json(views::fleet_rows(&agents, now_ms())))
    })
    .await
}

/// `GET /v1/agents/{id}`: the agent's fleet row and its history.
async fn agent(
    State(s): State<Server>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<AgentDetail>, ApiError> {
    check_access(&s, &headers, Permission::Read)?;
    let found =
        blocking(move || crate::control::agent_detail(s.store.as_ref(), &id).map_err(internal))
            .await?;
    found
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "no such agent".into()))
}

async fn releases(
    State(s): State<Server>,
    headers: HeaderMap,
) -> Result<Json<Vec<ReleaseRow>>, ApiError> {
    check_access(&s, &headers, Permission::Read)?;
    blocking(move || {
        Ok(Json(views::release_rows(
            &s.store.releases().map_err(internal)?,
        )))
    })
    .await
}

async fn rollouts(
    State(s): State<Server>,
    headers: HeaderMap,
) -> Result<Json<Vec<Rollout>>, ApiError> {
    check_access(&s, &headers, Permission::Read)?;
    blocking(move || Ok(Json(s.store.rollouts().map_err(internal)?))).await
}

/// `GET /v1/rollouts/{id}`, or the newest with `newest`.
async fn rollout(
    State(s): State<Server>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Rollout>, ApiError> {
    check_access(&s, &headers, Permission::Read)?;
    let found = if id == "newest" {
        blocking(move || Ok(s.store.rollouts().map_err(internal)?.pop())).await?
    } else {
        let id: i64 = id.parse().map_err(|_| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("{id:?}: expected a rollout id or `newest`"),
            )
        })?;
        blocking(move || s.store.rollout(id).map_err(internal)).await?
    };
    found
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "no such rollout".into()))
}

async fn start_rollout(
    State(s): State<Server>,
    headers: HeaderMap,
    Json(req): Json<StartRequest>,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    let who = check_access(&s, &headers, Permission::Steer)?;
    let store = s.store.clone();
    let started = blocking(move || Ok(ops::start(store.as_ref(), req, &who)?)).await?;
    s.engine_wake.notify_one();
    Ok((StatusCode::CREATED, Json(started)))
}

/// `POST /v1/rollouts/{id}/{pause|resume|abort|rollback}`.
async fn steer_rollout(
    State(s): State<Server>,
    Path((id, request)): Path<(i64, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let who = check_access(&s, &headers, Permission::Steer)?;
    let what = operator_request(&request)?;
    let store = s.store.clone();
    blocking(move || Ok(ops::ask(store.as_ref(), id, what, &who)?)).await?;
    s.engine_wake.notify_one();
    Ok(StatusCode::ACCEPTED)
}

/// A request an operator may make of a rollout (superseding is the engine's own).
pub(crate) fn operator_request(text: &str) -> Result<Request, ApiError> {
    match text.parse() {
        Ok(Request::Supersede) | Err(_) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{text:?}: expected pause, resume, abort or rollback"),
        )),
        Ok(what) => Ok(what),
    }
}

async fn undeploy(
    State(s): State<Server>,
    headers: HeaderMap,
    Json(req): Json<UndeployRequest>,
) -> Result<Json<Undeployed>, ApiError> {
    let who = check_access(&s, &headers, Permission::Steer)?;
    let store = s.store.clone();
    blocking(move || Ok(Json(ops::undeploy(store.as_ref(), &req, &who)?))).await
}

/// Who the caller is to this deployer, and the role that decides what they may do.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub who: String,
    pub role: Role,
}

/// `GET /v1/whoami`: lets a client find out before a long upload that it may not make it.
async fn whoami(State(s): State<Server>, headers: HeaderMap) -> Result<Json<Identity>, ApiError> {
    let (who, role) = identify(&s, &headers)?;
    Ok(Json(Identity { who, role }))
}

#[derive(serde::Deserialize)]
struct AuditQuery {
    #[serde(default = "default_audit_limit")]
    limit: usize,
}

fn default_audit_limit() -> usize {
    100
}

async fn audit(
    State(s): State<Server>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    check_access(&s, &headers, Permission::Read)?;
    let limit = q.limit.min(100_000);
    blocking(move || Ok(Json(s.store.audit(limit).map_err(internal)?))).await
}

/// `POST /v1/releases`: a tar stream of the release directory, staged on disk as it arrives
/// (at most [`MAX_RELEASE_UPLOAD`] bytes), then checked and stored as `publish` does.
async fn upload_release(
    State(s): State<Server>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<PublishOutcome>), ApiError> {
    let who = check_access(&s, &headers, Permission::Publish)?;
    let _slot = s.uploads.clone().try_acquire_owned().map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "other releases are being uploaded: try again shortly".into(),
        )
    })?;
    let staging = Staging::new(&s.data_dir).map_err(internal)?;
    receive(body, &staging.tar).await?;
    let outcome = blocking(move || {
        let unprocessable = |e: anyhow::Error| {
            let message = muscle_protocol::causes(&*e);
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                staging.in_uploaders_terms(&message),
            )
        };
        staging.unpack().map_err(unprocessable)?;
        let keys = crate::keys::load_keys(&s.trusted_keys, &s.data_dir).map_err(internal)?;
        let blobs = s.blobs.as_ref();
        crate::publish::publish_recorded(&staging.dir, s.store.as_ref(), blobs, &keys, &who)
            .map_err(unprocessable)
    })
    .await?;
    say!("{outcome} (uploaded)");
    let status = if outcome.new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(outcome)))
}

/// Writes the request body to `path` as it arrives, refusing one past the cap.
async fn receive(mut body: Body, path: &std::path::Path) -> Result<(), ApiError> {
    let mut file = tokio::fs::File::create_new(path).await.map_err(internal)?;
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("the upload broke off: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total > MAX_RELEASE_UPLOAD {
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a release upload is at most {MAX_RELEASE_UPLOAD} bytes"),
            ));
        }
        file.write_all(&data).await.map_err(internal)?;
    }
    file.flush().await.map_err(internal)
}
