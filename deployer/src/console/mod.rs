//! The web console at `/ui`: server-rendered pages of the fleet, rollouts, agents and releases,
//! kept live over server-sent events, with a little plain JavaScript and a stylesheet compiled
//! into the binary (no CDN, no build chain). It reads and steers through the same store calls
//! and `ops` as the API, with the same tokens (see `session` for how a browser holds one).

mod agents;
mod fleet;
mod html;
mod releases;
mod rollouts;
mod session;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::rollout::{Request, Rollout};
use crate::server::{blocking, identify_token, internal, may, ApiError, Server, ANONYMOUS};
use crate::store::Permission;
use crate::views::FleetRow;
use crate::{engine, now_ms, ops, views};
use fleet::FleetQuery;
use session::{
    back_to, check_form, session, set_cookie, BrowserSecret, PageError, Session, MAX_TOKEN_LEN,
    TOKEN_COOKIE,
};

/// How often a live page looks for changes.
const LIVE_EVERY: Duration = Duration::from_secs(1);

/// A live page's stream ends after this long (the browser reconnects at once): no answer is
/// endless.
const LIVE_FOR: Duration = Duration::from_secs(300);

/// Live pages open at once, at most: each holds a connection the agents also need, so no
/// more than a quarter of `serve --max-connections` either.
const LIVE_STREAMS: usize = 32;

/// How long the console waits for a log tail: its answer must beat the request's deadline.
const TAIL_DEADLINE: Duration = Duration::from_secs(20);

/// Log tails asked at once: each waits for its agent on a blocking thread.
const TAILS: usize = 4;

/// The lines a log tail asks for.
const TAIL_LINES: u32 = 200;

/// How long the fleet as read is shown to every page and stream before it is read again.
const FLEET_FRESH: Duration = Duration::from_secs(1);

/// What the console's requests share.
#[derive(Clone)]
pub struct Shared {
    streams: Arc<Semaphore>,
    tails: Arc<Semaphore>,
    fleet: Arc<Mutex<Option<FleetSnapshot>>>,
}

/// The fleet as last read, and when.
type FleetSnapshot = (Instant, Arc<Vec<FleetRow>>);

impl Shared {
    pub fn new(max_connections: usize) -> Shared {
        let streams = LIVE_STREAMS.min(max_connections / 4).max(1);
        Shared {
            streams: Arc::new(Semaphore::new(streams)),
            tails: Arc::new(Semaphore::new(TAILS)),
            fleet: Arc::default(),
        }
    }
}

pub fn routes(server: &Server) -> Router<Server> {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/fleet") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/fleet") }))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/fleet", get(fleet_page))
        .route("/ui/fleet/live", get(fleet_live))
        .route("/ui/rollouts", get(rollouts_page))
        .route("/ui/rollouts/{id}", get(rollout_page))
        .route("/ui/rollouts/{id}/live", get(rollout_live))
        .route("/ui/rollouts/{id}/{request}", post(steer))
        .route("/ui/agents/{id}", get(agent_page))
        .route("/ui/agents/{id}/logs/{app}", post(log_tail))
        .route("/ui/releases", get(releases_page))
        .route("/ui/assets/console.css", get(css))
        .route("/ui/assets/console.js", get(js))
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            session::guard,
        ))
}

fn page(title: &str, active: &str, session: &Session, body: &str) -> Html<String> {
    Html(html::page(title, active, Some(session), body))
}

async fn css() -> Response {
    let css = include_str!("assets/console.css");
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], css).into_response()
}

async fn js() -> Response {
    let js = include_str!("assets/console.js");
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        js,
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: String,
}

#[derive(Deserialize)]
struct NextQuery {
    #[serde(default)]
    next: String,
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

fn login_page(csrf: &str, next: &str, problem: Option<&str>) -> String {
    let problem = problem
        .map(|p| format!("<p class=\"error\">{}</p>", html::esc(p)))
        .unwrap_or_default();
    let body = format!(
        "{problem}<form class=\"login\" method=\"post\" action=\"/ui/login\">{}\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <label>Token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" \
         autofocus required></label><button>Sign in</button></form>\
         <p class=\"hint\">A token made by <code>muscle-deploy token create NAME --role ROLE</code>, \
         or the deployer's admin token. It is kept in a cookie only this console's pages send.</p>",
        html::csrf_field(csrf),
        html::esc(back_to(next)),
    );
    html::page("Sign in", "", None, &body)
}

async fn login_form(
    Extension(secret): Extension<BrowserSecret>,
    Query(q): Query<NextQuery>,
) -> Html<String> {
    Html(login_page(&secret.csrf(None), &q.next, None))
}

async fn login(
    State(s): State<Server>,
    Extension(secret): Extension<BrowserSecret>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, PageError> {
    check_form(&headers, &secret.csrf(None), &form.csrf)?;
    let token = form.token.trim().to_owned();
    let who = if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        None
    } else {
        let s = s.clone();
        let token = token.clone();
        blocking(move || Ok(identify_token(&s, Some(&token)).ok())).await?
    };
    let next = back_to(&form.next);
    match who {
        None => {
            let page = login_page(&form.csrf, next, Some("This deployer knows no such token."));
            Ok((StatusCode::UNAUTHORIZED, Html(page)).into_response())
        }
        // An open deployer takes anyone: there is nothing to sign in with.
        Some((who, _)) if who == ANONYMOUS => Ok(Redirect::to(next).into_response()),
        Some(_) => {
            let cookie = set_cookie(TOKEN_COOKIE, &token, "Strict", s.tls, None);
            Ok(([(header::SET_COOKIE, cookie)], Redirect::to(next)).into_response())
        }
    }
}

async fn logout(
    State(s): State<Server>,
    Extension(secret): Extension<BrowserSecret>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    let session = viewer(&s, &headers, &secret).await?;
    check_form(&headers, &session.csrf, &form.csrf)?;
    let cookie = set_cookie(TOKEN_COOKIE, "", "Strict", s.tls, Some(0));
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/ui/login")).into_response())
}

/// The session of a page's request, checked off the async threads (it reads the store).
async fn viewer(
    s: &Server,
    headers: &HeaderMap,
    secret: &BrowserSecret,
) -> Result<Session, PageError> {
    let (s, headers, secret) = (s.clone(), headers.clone(), secret.clone());
    tokio::task::spawn_blocking(move || session(&s, &headers, &secret))
        .await
        .map_err(|e| PageError::from(internal(e)))?
}

/// The fleet, read at most once a second for every page and stream together.
fn fleet_rows(s: &Server) -> Result<Arc<Vec<FleetRow>>, ApiError> {
    let mut cached = s.console.fleet.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, rows)) = &*cached {
        if at.elapsed() < FLEET_FRESH {
            return Ok(rows.clone());
        }
    }
    let agents = s.store.agents().map_err(internal)?;
    let rows = Arc::new(views::fleet_rows(&agents, now_ms()));
    *cached = Some((Instant::now(), rows.clone()));
    Ok(rows)
}

async fn fleet_page(
    State(s): State<Server>,
    Extension(secret): Extension<BrowserSecret>,
    headers: HeaderMap,
    Query(q): Query<FleetQuery>,
) -> Result<Html<String>, PageError> {
    let session = viewer(&s, &headers, &secret).await?;
    let rows = blocking(move || fleet_rows(&s)).await?;
    Ok(page(
        "Fleet",
        "/ui/fleet",
        &session,
        &fleet::page(&rows, &q),
    ))
}

async fn fleet_live(
    State(s): State<Server>,
    Extension(secret): Extension<BrowserSecret>,
    headers: HeaderMap,
    Query(q): Query<FleetQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, PageError> {
    let session = viewer(&s, &headers, &secret).await?;
    live(s, session, move |s, _| {
        Ok(fleet::fragment(&fleet_rows(s)?, &q))
    })
    .await
}

async fn rollouts_page(
    State(s): State<Server>,
    Extension(secret): Extension<BrowserSecret>,
    headers: HeaderMap,
) -> Result<Html<String>, PageError> {
    let session = viewer(&s, &headers, &secret).await?;
    let all = blocking(move || s.store.rollouts().map_err(internal)).await?;
    Ok(page(
        "Rollouts",
        "/ui/rollouts",
        &session,
        &rollouts::list(&all),
    ))
}

/// Rollout `id`, and (for those who may steer) the newer rollout of its app that forbids
/// rolling it back, if any.
fn rollout(s: &Server, id: i64, session: &Session) -> Result<(Rollout, Option<i64>), ApiError> {
    let r = s
        .store
        .rollout(id)
        .map_err(internal)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("there is no rollout {id}")))?;
    // Only asked when a rollback is otherwise possible: it reads every rollout.
    let newer = match r.check_request(Request::Rollback) {
        Ok(()) if session.may(Permission::Steer) => {
            engine::newer_rollout(s.store.as_ref(), &r).map_err(internal)?
        }
        _ => None,
    };
    Ok((r, newer))
}

async fn rollout_page(
    State(s): State<Server>,
    Extension(secret): Extension<BrowserSecret>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Html<String>, PageError> {
    let session = Arc::new(viewer(&s, &headers, &secret).await?);
    let (r, newer) = {
        let session = session.clone();
        blocking(move || rollout(&s, id, &session)).await?
    };
    let title = format!("Rollout {id}");
    let body = rollouts::page(&r, newer, &session);
    Ok(page(&title, "/ui/rollouts", &session, &body))
}

async fn rollout_live(
    State(s): State<Server>,
    Extension(secret): Extension<BrowserSecret>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, PageError> {
    let session = viewer(&s, &headers, &secret).await?;
    live(s, session, move |s, session| {
        let (r, newer) = rollout(s, id, session)?;
        Ok(rollouts::fragment(&r, newer, session))
    })
    .await
}

/// `POST /ui/rollouts/{id}/{pause|resume|abort|rollback}` from the rollout page's buttons.
async fn steer(
    State(s): State<Server>,
    Extension(secret): Extension<BrowserSecret>,
    Path((id, request)): Path<(i64, String)>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, PageError> {
    let session = viewer(&s, &headers, &secret).await?;
    check_form(&headers, &session.csrf, &form.csrf)?;
    let who = may(session.who, session.role, Permission::Steer)?;
    let what = crate::api::operator_request(&request)?;
    let store = s.store.clone();
    blocking(move || Ok(ops::ask(store.as_ref(), id, what, &who)?)).await?;
    s.engine_wake.notify_one();
    Ok(Redirect::to(&format!("/ui/rollouts/{id}")))
}

async fn agent_page(
    State(s): State<Server>,
    Extension(secret): Extension<BrowserSecret>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Html<String>, PageError> {
    let session = viewer(&s, &headers, &secret).await?;
    let title = format!("Agent {id}");
    let (detail, all) = blocking(move || {
        let detail = crate::control::agent_detail(s.store.as_ref(), &id).map_err(internal)?;
        let detail = detail
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("there is no agent {id:?}")))?;
        Ok((detail, s.store.rollouts().map_err(internal)?))
    })
    .await?;
    let body = agents::page(&detail, &all, &session);
    Ok(page(&title, "/ui/fleet", &session, &body))
}

/// `POST /ui/agents/{id}/logs/{app}`: a fresh tail of an app's log, asked of the agent over its
/// own connection.
async fn log_tail(
    State(s): State<Server>,
    Extension(secret): Extension<BrowserSecret>,
    Path((id, app)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Html<String>, PageError> {
    let session = viewer(&s, &headers, &secret).await?;
    check_form(&headers, &session.csrf, &form.csrf)?;
    may(session.who.clone(), session.role, Permission::Steer)?;
    // Held by the blocking thread that waits: a closed tab does not free it early.
    let slot = s.console.tails.clone().try_acquire_owned().map_err(|_| {
        let why = "other log tails are being read: try again in a few seconds";
        ApiError(StatusCode::SERVICE_UNAVAILABLE, why.into())
    })?;
    let name = muscle_protocol::Name::parse(&app)
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, format!("{app:?}: {e}")))?;
    let asked = {
        let (s, agent) = (s.clone(), id.clone());
        blocking(move || {
            let rows = fleet_rows(&s)?;
            let row = rows.iter().find(|a| a.id == agent).ok_or_else(|| {
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("there is no agent {agent:?}"),
                )
            })?;
            if row.stale {
                let why = format!(
                    "agent {agent} is offline: it last checked in {}",
                    row.seen()
                );
                return Err(ApiError(StatusCode::CONFLICT, why));
            }
            crate::service_logs::ask_tail(s.store.as_ref(), &agent, name, TAIL_LINES)
                .map_err(internal)
        })
        .await?
    };
    // The agent's held job poll learns of it now, not when the poll ends.
    s.job_wake.bump();
    let (store, agent) = (s.store.clone(), id.clone());
    let tail = blocking(move || {
        let _slot = slot;
        crate::service_logs::await_tail(store.as_ref(), &agent, &asked, TAIL_DEADLINE)
            .map_err(internal)
    })
    .await?;
    let title = format!("{app} on {id}");
    Ok(page(
        &title,
        "/ui/fleet",
        &session,
        &agents::log_page(&id, &app, &tail),
    ))
}

async fn releases_page(
    State(s): State<Server>,
    Extension(secret): Extension<BrowserSecret>,
    headers: HeaderMap,
) -> Result<Html<String>, PageError> {
    let session = viewer(&s, &headers, &secret).await?;
    let (all, trusted) = blocking(move || {
        let trusted = crate::keys::load_keys(&s.trusted_keys, &s.data_dir).map_err(internal)?;
        Ok((s.store.releases().map_err(internal)?, trusted))
    })
    .await?;
    let body = releases::list(&all, &trusted);
    Ok(page("Releases", "/ui/releases", &session, &body))
}

/// Where a live stream is.
struct Streaming {
    /// Rendered when the stream was asked for, not sent yet.
    first: Option<String>,
    last: String,
    /// Told the page its session is gone: the next step ends the stream.
    ended: bool,
    _slot: OwnedSemaphorePermit,
}

/// A stream of `render`'s output, sent each time it changes, while the session's token is
/// still good (checked at every step; a page whose token was revoked is told `gone`), for at
/// most [`LIVE_FOR`] and never past the server's stop. At most [`LIVE_STREAMS`] at once.
#[allow(clippy::type_complexity)]
async fn live<F>(
    s: Server,
    session: Session,
    render: F,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, PageError>
where
    F: Fn(&Server, &Session) -> Result<String, ApiError> + Send + Sync + 'static,
{
    let slot = s.console.streams.clone().try_acquire_owned().map_err(|_| {
        let why = "too many live pages are open on this deployer: reload this one later";
        PageError::Refused(StatusCode::SERVICE_UNAVAILABLE, why.into())
    })?;
    let render = Arc::new(render);
    let session = Arc::new(session);
    // A page of nothing (no such rollout) gets no stream. What it renders now is sent first:
    // the page may have been rendered before a change this render already shows.
    let first = {
        let (s, render, session) = (s.clone(), render.clone(), session.clone());
        blocking(move || render(&s, &session)).await?
    };
    let until = tokio::time::Instant::now() + LIVE_FOR;
    let start = Streaming {
        first: Some(first),
        last: String::new(),
        ended: false,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(start, move |mut state| {
        let (s, render, session) = (s.clone(), render.clone(), session.clone());
        async move {
            if let Some(html) = state.first.take() {
                let event = Event::default().retry(Duration::from_secs(2)).data(&html);
                state.last = html;
                return Some((Ok(event), state));
            }
            while !state.ended && !s.stopping.is_cancelled() && tokio::time::Instant::now() < until
            {
                let step = {
                    let (s, render, session) = (s.clone(), render.clone(), session.clone());
                    blocking(move || {
                        match identify_token(&s, session.token.as_deref()) {
                            Err(e) if e.0 == StatusCode::UNAUTHORIZED => return Ok(None),
                            Err(e) => return Err(e),
                            Ok(_) => {}
                        }
                        render(&s, &session).map(Some)
                    })
                    .await
                };
                match step {
                    Ok(Some(html)) if html != state.last => {
                        let event = Event::default().retry(Duration::from_secs(2)).data(&html);
                        state.last = html;
                        return Some((Ok(event), state));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        state.ended = true;
                        let gone = Event::default().event("gone").data("signed out");
                        return Some((Ok(gone), state));
                    }
                    // The browser reconnects and tries again.
                    Err(e) => {
                        say!("console: a live page's update failed: {}", e.1);
                        return None;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(LIVE_EVERY) => {}
                    _ = s.stopping.cancelled() => return None,
                }
            }
            None
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
