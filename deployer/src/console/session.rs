//! Who uses the console, and proof that a form was sent from it.
//!
//! The console signs in with the API's tokens: the token is kept in a cookie marked HttpOnly
//! (no script reads it), SameSite=Strict (no other site's request carries it) and Secure when
//! served over TLS. A form that changes anything also carries the browser's CSRF secret, a
//! random value this console set in a cookie of its own and wrote into its pages (a
//! double-submit: another site can neither read nor set it), and must not come from another
//! origin when the browser says where it came from.

use axum::extract::{Request, State};
use axum::http::header::{COOKIE, HOST, ORIGIN, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};

use crate::auth;
use crate::server::{identify_token, ApiError, Server};
use crate::store::{Permission, Role};

pub const TOKEN_COOKIE: &str = "muscle_token";
pub const CSRF_COOKIE: &str = "muscle_csrf";

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

/// The person at the browser, as this deployer knows them.
pub struct Session {
    pub who: String,
    pub role: Role,
    /// Signed in with a token, rather than an open deployer's anonymous operator.
    pub signed_in: bool,
    /// This browser's CSRF secret, written into every form.
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
            PageError::SignIn => Redirect::to("/ui/login").into_response(),
            PageError::Refused(status, why) => {
                let body = format!("<p class=\"error\">{}</p>", super::html::esc(&why));
                let title = status.canonical_reason().unwrap_or("Refused");
                (status, Html(super::html::page(title, "", None, &body))).into_response()
            }
        }
    }
}

/// The value of cookie `name`, decoded.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| percent_decode_str(v).decode_utf8().ok())
        .map(|v| v.into_owned())
}

/// Who the browser is: the token in its cookie (or an `Authorization` header), else an open
/// deployer's anonymous operator; [`PageError::SignIn`] when it must sign in first.
pub fn session(s: &Server, headers: &HeaderMap) -> Result<Session, PageError> {
    let token = cookie(headers, TOKEN_COOKIE).or_else(|| auth::bearer(headers).map(str::to_owned));
    let (who, role) = identify_token(s, token.as_deref()).map_err(|e| {
        if e.0 == StatusCode::UNAUTHORIZED {
            PageError::SignIn
        } else {
            e.into()
        }
    })?;
    Ok(Session {
        who,
        role,
        signed_in: token.is_some(),
        csrf: cookie(headers, CSRF_COOKIE).unwrap_or_default(),
        token,
    })
}

/// A state-changing form is this console's: from this origin (when the browser says) and
/// carrying this browser's CSRF secret.
pub fn check_form(headers: &HeaderMap, form_csrf: &str) -> Result<(), PageError> {
    let refused = |why: String| Err(PageError::Refused(StatusCode::FORBIDDEN, why));
    if let Some(site) = headers.get("sec-fetch-site") {
        if site != "same-origin" {
            return refused(format!(
                "the form was sent from another site ({site:?}): only this console's own pages \
                 may change anything"
            ));
        }
    }
    if let Some(origin) = headers.get(ORIGIN).and_then(|o| o.to_str().ok()) {
        let host = headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let from = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        if from != Some(host) {
            return refused(format!(
                "the form was sent from {origin}, not from this console ({host})"
            ));
        }
    }
    let expected = cookie(headers, CSRF_COOKIE).unwrap_or_default();
    if expected.is_empty() || !auth::same_secret(form_csrf, &expected) {
        return refused(
            "the form does not carry this browser's CSRF token: reload the page and try again"
                .into(),
        );
    }
    Ok(())
}

/// A `Set-Cookie` value for the console's paths.
pub fn set_cookie(name: &str, value: &str, tls: bool, max_age_s: Option<u64>) -> HeaderValue {
    let value = utf8_percent_encode(value, NON_ALPHANUMERIC);
    let mut cookie = format!("{name}={value}; Path=/ui; HttpOnly; SameSite=Strict");
    if tls {
        cookie.push_str("; Secure");
    }
    if let Some(age) = max_age_s {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    HeaderValue::from_str(&cookie).expect("percent-encoded: visible ASCII only")
}

/// Gives a browser without one its CSRF secret (seen by this request's handler already), and
/// every answer the console's security headers.
pub async fn guard(State(s): State<Server>, mut request: Request, next: Next) -> Response {
    let fresh = match cookie(request.headers(), CSRF_COOKIE) {
        Some(c) if c.len() == 64 && c.bytes().all(|b| b.is_ascii_hexdigit()) => None,
        _ => match auth::new_credential() {
            Ok(c) => Some(c),
            Err(e) => {
                return ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
            }
        },
    };
    if let Some(c) = &fresh {
        let value = HeaderValue::from_str(&format!("{CSRF_COOKIE}={c}")).expect("hex");
        request.headers_mut().append(COOKIE, value);
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if let Some(c) = fresh {
        headers.append(SET_COOKIE, set_cookie(CSRF_COOKIE, &c, s.tls, None));
    }
    for (name, value) in SECURITY_HEADERS {
        headers.insert(*name, HeaderValue::from_static(value));
    }
    response
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
        assert_eq!(cookie(&h, TOKEN_COOKIE).as_deref(), Some("x;y"));
        assert_eq!(cookie(&h, "b").as_deref(), Some("2"));
        assert_eq!(cookie(&h, "muscle"), None);
        let set = set_cookie(TOKEN_COOKIE, "x;y", true, None);
        assert_eq!(
            set.to_str().unwrap(),
            "muscle_token=x%3By; Path=/ui; HttpOnly; SameSite=Strict; Secure"
        );
    }

    #[test]
    fn a_form_needs_this_browsers_secret_and_no_foreign_origin() {
        let secret = "ab".repeat(32);
        let cookie = format!("{CSRF_COOKIE}={secret}");
        let ok = headers(&[
            ("cookie", &cookie),
            ("host", "d:8080"),
            ("origin", "http://d:8080"),
        ]);
        assert!(check_form(&ok, &secret).is_ok());
        assert!(check_form(&ok, "00").is_err(), "wrong secret");
        assert!(check_form(&ok, "").is_err(), "no secret");
        let no_cookie = headers(&[("host", "d:8080")]);
        assert!(
            check_form(&no_cookie, "").is_err(),
            "empty equals empty is no proof"
        );
        for (name, value) in [
            ("origin", "http://evil.example"),
            ("origin", "null"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-site"),
        ] {
            let h = headers(&[("cookie", &cookie), ("host", "d:8080"), (name, value)]);
            assert!(check_form(&h, &secret).is_err(), "{name}: {value}");
        }
    }
}
