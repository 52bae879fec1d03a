//! Who uses the console, and proof that a form was sent from it.
//!
//! The console signs in with the API's tokens: the token is kept in a cookie marked HttpOnly
//! (no script reads it), SameSite=Strict (no other site's request carries it) and Secure when
//! served over TLS. A form that changes anything carries a CSRF token derived from the signed-in
//! token and a random per-browser secret (a cookie of its own): whoever can plant cookies on
//! this host (a service on another port, a sibling domain) still cannot make one without the
//! token. The form must also not come from another origin or site when the browser says.

use axum::extract::{Request, State};
use axum::http::header::{COOKIE, HOST, LOCATION, ORIGIN, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};

use super::html;
use crate::auth;
use crate::server::{identify_token, ApiError, Server};
use crate::store::{Permission, Role};

pub const TOKEN_COOKIE: &str = "muscle_token";
pub const SECRET_COOKIE: &str = "muscle_browser";

/// The longest token the sign-in form takes (the API's are 64 characters).
pub const MAX_TOKEN_LEN: usize = 1024;

/// What every console answer says to the browser: run only this console's own script and
/// style, in no frame, and keep no copy.
const SECURITY_HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
    ("cache-control", "no-store"),
];

/// This browser's random secret (from its cookie, or made for it by [`guard`]).
#[derive(Clone)]
pub struct BrowserSecret(pub String);

impl BrowserSecret {
    /// The CSRF token of forms shown to whoever holds `token` (none: the sign-in form, or an
    /// open deployer).
    pub fn csrf(&self, token: Option<&str>) -> String {
        let bound = format!("muscle console csrf\n{}\n{}", self.0, token.unwrap_or(""));
        muscle_protocol::sha256_hex(bound.as_bytes())
    }
}

/// The person at the browser, as this deployer knows them.
pub struct Session {
    pub who: String,
    pub role: Role,
    /// Signed in with a token this deployer knows (not an open deployer's anonymous operator).
    pub signed_in: bool,
    /// The CSRF token of this session's forms.
    pub csrf: String,
    /// The token the session stands on, to check again on a long-lived answer.
    pub token: Option<String>,
}

impl Session {
    pub fn may(&self, need: Permission) -> bool {
        self.role.grants(need)
    }
}

/// Why a console request got no page.
pub enum PageError {
    /// Nobody is signed in, and this deployer is not open.
    SignIn,
    Refused(StatusCode, String),
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> PageError {
        PageError::Refused(e.0, e.1)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            // `guard` says where to come back to.
            PageError::SignIn => Redirect::to("/ui/login").into_response(),
            PageError::Refused(status, why) => {
                let body = format!("<p class=\"error\">{}</p>", html::esc(&why));
                let title = status.canonical_reason().unwrap_or("Refused");
                (status, Html(html::page(title, "", None, &body))).into_response()
            }
        }
    }
}

/// The values of cookie `name`, decoded, in the order the browser sent them.
fn cookies<'h>(headers: &'h HeaderMap, name: &'h str) -> impl Iterator<Item = String> + 'h {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .filter_map(|(_, v)| percent_decode_str(v).decode_utf8().ok())
        .map(|v| v.into_owned())
}

/// Who the browser is: the token in its cookie (or an `Authorization` header), else an open
/// deployer's anonymous operator; [`PageError::SignIn`] when it must sign in first.
pub fn session(
    s: &Server,
    headers: &HeaderMap,
    secret: &BrowserSecret,
) -> Result<Session, PageError> {
    // Every token cookie in turn: one planted under a narrower path, sent first, cannot shut
    // the browser out.
    let candidates: Vec<String> = cookies(headers, TOKEN_COOKIE)
        .chain(auth::bearer(headers).map(str::to_owned))
        .collect();
    let mut found = None;
    for token in &candidates {
        match identify_token(s, Some(token)) {
            Ok(who) => {
                found = Some((who, Some(token.clone())));
                break;
            }
            Err(e) if e.0 == StatusCode::UNAUTHORIZED => {}
            Err(e) => return Err(e.into()),
        }
    }
    let ((who, role), token) = match found {
        Some(found) => found,
        None => match identify_token(s, None) {
            Ok(who) => (who, None),
            Err(e) if e.0 == StatusCode::UNAUTHORIZED => return Err(PageError::SignIn),
            Err(e) => return Err(e.into()),
        },
    };
    let signed_in = token.is_some() && who != crate::server::ANONYMOUS;
    let token = token.filter(|_| signed_in);
    Ok(Session {
        csrf: secret.csrf(token.as_deref()),
        who,
        role,
        signed_in,
        token,
    })
}

/// A state-changing form is this console's: not from another origin or site (when the browser
/// says) and carrying the CSRF token `expected`.
pub fn check_form(headers: &HeaderMap, expected: &str, form_csrf: &str) -> Result<(), PageError> {
    let refused = |why: String| Err(PageError::Refused(StatusCode::FORBIDDEN, why));
    // `none`: the person at the browser did it (a reload, a bookmark), never another site.
    if let Some(site) = headers.get("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return refused(format!(
                "the form was sent from another site ({site:?}): only this console's own pages \
                 may change anything"
            ));
        }
    }
    if let Some(origin) = headers.get(ORIGIN) {
        let host = headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let origin = String::from_utf8_lossy(origin.as_bytes());
        let from = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        if from != Some(host) {
            return refused(format!(
                "the form was sent from {origin}, not from this console ({host}); behind a \
                 proxy, keep the Host header"
            ));
        }
    }
    if !auth::same_secret(form_csrf, expected) {
        return refused(
            "the form does not carry this session's CSRF token: reload the page and try again"
                .into(),
        );
    }
    Ok(())
}

/// A `Set-Cookie` value for the console's paths.
pub fn set_cookie(
    name: &str,
    value: &str,
    same_site: &str,
    tls: bool,
    max_age_s: Option<u64>,
) -> HeaderValue {
    let value = utf8_percent_encode(value, NON_ALPHANUMERIC);
    let mut cookie = format!("{name}={value}; Path=/ui; HttpOnly; SameSite={same_site}");
    if tls {
        cookie.push_str("; Secure");
    }
    if let Some(age) = max_age_s {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    HeaderValue::from_str(&cookie).expect("percent-encoded: visible ASCII only")
}

fn is_secret(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Around every console request: hands the handler this browser's secret (making one for a
/// browser without), sends a page asked for without a session back to sign in with the way
/// back, and gives every answer the console's security headers.
pub async fn guard(State(s): State<Server>, mut request: Request, next: Next) -> Response {
    let found = cookies(request.headers(), SECRET_COOKIE).find(|c| is_secret(c));
    let (secret, fresh) = match found {
        Some(c) => (c, false),
        None => match auth::new_credential() {
            Ok(c) => (c, true),
            Err(e) => {
                return ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
            }
        },
    };
    request
        .extensions_mut()
        .insert(BrowserSecret(secret.clone()));
    let wanted = (request.method() == Method::GET)
        .then(|| {
            request
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
        })
        .flatten();
    let cross_site = request
        .headers()
        .get("sec-fetch-site")
        .is_some_and(|v| v == "cross-site");
    let mut response = next.run(request).await;
    let to_sign_in = response.status() == StatusCode::SEE_OTHER
        && response
            .headers()
            .get(LOCATION)
            .is_some_and(|l| l == "/ui/login");
    if let (true, Some(wanted)) = (to_sign_in, wanted) {
        response = sign_in_first(&wanted, cross_site);
    }
    let headers = response.headers_mut();
    if fresh {
        // Lax: a link from elsewhere keeps it, and other tabs' forms stay good.
        headers.append(
            SET_COOKIE,
            set_cookie(SECRET_COOKIE, &secret, "Lax", s.tls, None),
        );
    }
    for (name, value) in SECURITY_HEADERS {
        headers.insert(*name, HeaderValue::from_static(value));
    }
    response
}

/// The answer to a page asked for without a session. A link followed from another site comes
/// without the Strict cookie even when this browser is signed in: a same-origin step, which
/// carries it, is tried first.
fn sign_in_first(wanted: &str, cross_site: bool) -> Response {
    if cross_site {
        let url = html::esc(wanted);
        let body = format!(
            "<!doctype html><meta http-equiv=\"refresh\" content=\"0;url={url}\">\
             <a href=\"{url}\">Continue to the console</a>"
        );
        return Html(body).into_response();
    }
    let next = html::url_part(wanted);
    Redirect::to(&format!("/ui/login?next={next}")).into_response()
}

/// Where to go after signing in: a console page, never anywhere else.
pub fn back_to(next: &str) -> &str {
    let path = next.split('?').next().unwrap_or_default();
    let ours = next.starts_with("/ui/")
        && !next.starts_with("/ui/login")
        && next.bytes().all(|b| b.is_ascii_graphic() && b != b'\\')
        && !path.contains("//")
        && !path
            .split('/')
            .any(|segment| segment == "." || segment == "..");
    if ours {
        next
    } else {
        "/ui/fleet"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn cookies_are_found_across_headers_and_decoded() {
        let h = headers(&[("cookie", "a=1; muscle_token=x%3By"), ("cookie", "b=2")]);
        assert_eq!(cookies(&h, TOKEN_COOKIE).next().as_deref(), Some("x;y"));
        assert_eq!(cookies(&h, "b").next().as_deref(), Some("2"));
        assert_eq!(cookies(&h, "muscle").next(), None);
        let set = set_cookie(TOKEN_COOKIE, "x;y", "Strict", true, None);
        assert_eq!(
            set.to_str().unwrap(),
            "muscle_token=x%3By; Path=/ui; HttpOnly; SameSite=Strict; Secure"
        );
    }

    #[test]
    fn a_forms_token_is_bound_to_the_browser_and_the_signed_in_token() {
        let browser = BrowserSecret("ab".repeat(32));
        let mine = browser.csrf(Some("operator-token"));
        assert_ne!(mine, browser.csrf(Some("other-token")));
        assert_ne!(mine, browser.csrf(None));
        assert_ne!(
            mine,
            BrowserSecret("cd".repeat(32)).csrf(Some("operator-token"))
        );
        // A secret planted by whoever can set cookies here gives them nothing without the token.
        let planted = BrowserSecret("00".repeat(32));
        assert_ne!(planted.csrf(None), planted.csrf(Some("operator-token")));
    }

    #[test]
    fn a_form_needs_its_token_and_no_foreign_origin() {
        let ok = headers(&[("host", "d:8080"), ("origin", "http://d:8080")]);
        assert!(check_form(&ok, "t", "t").is_ok());
        assert!(check_form(&ok, "t", "u").is_err(), "wrong token");
        assert!(check_form(&ok, "t", "").is_err(), "no token");
        for (name, value) in [
            ("origin", "http://evil.example"),
            ("origin", "null"),
            ("origin", "http://d:8080.evil.example"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-site"),
        ] {
            let h = headers(&[("host", "d:8080"), (name, value)]);
            assert!(check_form(&h, "t", "t").is_err(), "{name}: {value}");
        }
        let mut odd = headers(&[("host", "d:8080")]);
        odd.insert(
            ORIGIN,
            HeaderValue::from_bytes(b"http://d:8080\xff").unwrap(),
        );
        assert!(
            check_form(&odd, "t", "t").is_err(),
            "an origin that is not UTF-8"
        );
    }

    #[test]
    fn sign_in_only_leads_back_into_the_console() {
        assert_eq!(back_to("/ui/rollouts/5"), "/ui/rollouts/5");
        assert_eq!(
            back_to("/ui/fleet?arch=x86_64&page=2"),
            "/ui/fleet?arch=x86_64&page=2"
        );
        for elsewhere in [
            "https://evil",
            "//evil",
            "/ui//evil",
            "/ui/\\evil",
            "/v1/fleet",
            "/ui/login",
            "/ui/../v1/fleet",
            "/ui/./x",
            "/ui/\u{1}",
            "/ui/a b",
        ] {
            assert_eq!(back_to(elsewhere), "/ui/fleet", "{elsewhere}");
        }
    }
}
