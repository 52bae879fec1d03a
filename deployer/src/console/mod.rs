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
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use futures_util::Stream;
use serde::Deserialize;

use crate::server::{blocking, identify_token, internal, may, ApiError, Server};
use crate::store::Permission;
use crate::{now_ms, ops, views};
use fleet::FleetQuery;
use session::{check_form, session, set_cookie, PageError, Session, TOKEN_COOKIE};

/// How often a live page looks for changes.
const LIVE_EVERY: Duration = Duration::from_secs(1);

/// A live page's stream ends after this long (the browser reconnects at once): no answer is
/// endless, and a revoked token stops being served.
const LIVE_FOR: Duration = Duration::from_secs(300);

/// How long an agent has to send a log tail the console asked for.
const TAIL_DEADLINE: Duration = Duration::from_secs(15);

/// The lines a log tail asks for.
const TAIL_LINES: u32 = 200;

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
        .route("/ui/agents/{id}/logs/{app}", get(log_tail))
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
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

fn login_body(csrf: &str, problem: Option<&str>) -> String {
    let problem = problem
        .map(|p| format!("<p class=\"error\">{}</p>", html::esc(p)))
        .unwrap_or_default();
    format!(
        "{problem}<form class=\"login\" method=\"post\" action=\"/ui/login\">{}\
         <label>Token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" \
         autofocus required></label><button>Sign in</button></form>\
         <p class=\"hint\">A token made by <code>muscle-deploy token create NAME --role ROLE</code>, \
         or the deployer's admin token. It is kept in a cookie only this console's pages send.</p>",
        html::csrf_field(csrf)
    )
}

async fn login_form(headers: HeaderMap) -> Html<String> {
    let csrf = session::cookie(&headers, session::CSRF_COOKIE).unwrap_or_default();
    Html(html::page("Sign in", "", None, &login_body(&csrf, None)))
}

async fn login(
    State(s): State<Server>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, PageError> {
    check_form(&headers, &form.csrf)?;
    let token = form.token.trim().to_owned();
    let known = blocking({
        let s = s.clone();
        let token = token.clone();
        move || Ok(identify_token(&s, Some(&token)))
    })
    .await?;
    if known.is_err() || token.is_empty() {
        let body = login_body(&form.csrf, Some("This deployer knows no such token."));
        return Ok((
            StatusCode::UNAUTHORIZED,
            Html(html::page("Sign in", "", None, &body)),
        )
            .into_response());
    }
    let cookie = set_cookie(TOKEN_COOKIE, &token, s.tls, None);
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/ui/fleet")).into_response())
}

async fn logout(
    State(s): State<Server>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    check_form(&headers, &form.csrf)?;
    let cookie = set_cookie(TOKEN_COOKIE, "", s.tls, Some(0));
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/ui/login")).into_response())
}

/// The session of a page's request, checked off the async threads (it reads the store).
async fn viewer(s: &Server, headers: HeaderMap) -> Result<Session, PageError> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || session(&s, &headers))
        .await
        .map_err(|e| PageError::from(internal(e)))?
}

fn fleet_rows(s: &Server) -> Result<Vec<views::FleetRow>, ApiError> {
    let agents = s.store.agents().map_err(internal)?;
    Ok(views::fleet_rows(&agents, now_ms()))
}

async fn fleet_page(
    State(s): State<Server>,
    headers: HeaderMap,
    Query(q): Query<FleetQuery>,
) -> Result<Html<String>, PageError> {
    let session = viewer(&s, headers).await?;
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
    headers: HeaderMap,
    Query(q): Query<FleetQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, PageError> {
    let session = viewer(&s, headers).await?;
    Ok(live(s, session, move |s, _| {
        Ok(fleet::fragment(&fleet_rows(s)?, &q))
    }))
}

async fn rollouts_page(
    State(s): State<Server>,
    headers: HeaderMap,
) -> Result<Html<String>, PageError> {
    let session = viewer(&s, headers).await?;
    let all = blocking(move || s.store.rollouts().map_err(internal)).await?;
    Ok(page(
        "Rollouts",
        "/ui/rollouts",
        &session,
        &rollouts::list(&all),
    ))
}

fn rollout(s: &Server, id: i64) -> Result<crate::rollout::Rollout, ApiError> {
    s.store
        .rollout(id)
        .map_err(internal)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("there is no rollout {id}")))
}

async fn rollout_page(
    State(s): State<Server>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Html<String>, PageError> {
    let session = viewer(&s, headers).await?;
    let r = blocking(move || rollout(&s, id)).await?;
    let title = format!("Rollout {id}");
    Ok(page(
        &title,
        "/ui/rollouts",
        &session,
        &rollouts::page(&r, &session),
    ))
}

async fn rollout_live(
    State(s): State<Server>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, PageError> {
    let session = viewer(&s, headers).await?;
    Ok(live(s, session, move |s, session| {
        Ok(rollouts::fragment(&rollout(s, id)?, session))
    }))
}

/// `POST /ui/rollouts/{id}/{pause|resume|abort|rollback}` from the rollout page's buttons.
async fn steer(
    State(s): State<Server>,
    Path((id, request)): Path<(i64, String)>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, PageError> {
    check_form(&headers, &form.csrf)?;
    let session = viewer(&s, headers).await?;
    let who = may(session.who, session.role, Permission::Steer)?;
    let what = crate::api::operator_request(&request)?;
    let store = s.store.clone();
    blocking(move || Ok(ops::ask(store.as_ref(), id, what, &who)?)).await?;
    s.engine_wake.notify_one();
    Ok(Redirect::to(&format!("/ui/rollouts/{id}")))
}

async fn agent_page(
    State(s): State<Server>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Html<String>, PageError> {
    let session = viewer(&s, headers).await?;
    let title = format!("Agent {id}");
    let (detail, all) = blocking(move || {
        let detail = crate::control::agent_detail(s.store.as_ref(), &id).map_err(internal)?;
        let detail = detail
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("there is no agent {id:?}")))?;
        Ok((detail, s.store.rollouts().map_err(internal)?))
    })
    .await?;
    Ok(page(
        &title,
        "/ui/fleet",
        &session,
        &agents::page(&detail, &all, &session),
    ))
}

/// A fresh tail of an app's log, asked of the agent over its own connection.
async fn log_tail(
    State(s): State<Server>,
    Path((id, app)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Html<String>, PageError> {
    let session = viewer(&s, headers).await?;
    may(session.who.clone(), session.role, Permission::Steer)?;
    let name = muscle_protocol::Name::parse(&app)
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, format!("{app:?}: {e}")))?;
    let agent = id.clone();
    let tail = blocking(move || {
        let known = s
            .store
            .agents()
            .map_err(internal)?
            .iter()
            .any(|a| a.id == agent);
        if !known {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("there is no agent {agent:?}"),
            ));
        }
        crate::service_logs::read_tail(s.store.as_ref(), &agent, name, TAIL_LINES, TAIL_DEADLINE)
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
    headers: HeaderMap,
) -> Result<Html<String>, PageError> {
    let session = viewer(&s, headers).await?;
    let all = blocking(move || s.store.releases().map_err(internal)).await?;
    Ok(page(
        "Releases",
        "/ui/releases",
        &session,
        &releases::list(&all),
    ))
}

/// A stream of `render`'s output, sent each time it changes, while the session's token is
/// still good, for at most [`LIVE_FOR`] and never past the server's stop.
fn live<F>(
    s: Server,
    session: Session,
    render: F,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    F: Fn(&Server, &Session) -> Result<String, ApiError> + Send + Sync + 'static,
{
    let render = Arc::new(render);
    let session = Arc::new(session);
    let until = tokio::time::Instant::now() + LIVE_FOR;
    let stream = futures_util::stream::unfold(String::new(), move |last| {
        let (s, render, session) = (s.clone(), render.clone(), session.clone());
        async move {
            loop {
                if tokio::time::Instant::now() >= until || s.stopping.is_cancelled() {
                    return None;
                }
                let html = blocking({
                    let (s, render, session) = (s.clone(), render.clone(), session.clone());
                    move || {
                        // A token revoked since the page opened stops its updates.
                        identify_token(&s, session.token.as_deref())?;
                        render(&s, &session)
                    }
                })
                .await
                .ok()?;
                if html != last {
                    let event = Event::default().retry(Duration::from_secs(2)).data(&html);
                    return Some((Ok(event), html));
                }
                tokio::select! {
                    _ = tokio::time::sleep(LIVE_EVERY) => {}
                    _ = s.stopping.cancelled() => return None,
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
