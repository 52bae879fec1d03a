//! The pieces every console page is made of: escaping (everything an agent, a publisher or an
//! operator wrote is text, never markup) and the page frame.

use std::fmt::Write;

use super::session::Session;

/// `text` safe inside an element or a double-quoted attribute.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A path segment or query value, percent-encoded (an agent id with a `?` stays one segment).
pub fn url_part(text: &str) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
    /// RFC 3986's unreserved characters stay as they are.
    const ENCODED: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, ENCODED).to_string()
}

/// The navigation's entries: path and label.
const NAV: &[(&str, &str)] = &[
    ("/ui/fleet", "Fleet"),
    ("/ui/rollouts", "Rollouts"),
    ("/ui/releases", "Releases"),
];

/// A whole page: `body` inside the frame, with `active` marked in the navigation.
pub fn page(title: &str, active: &str, session: Option<&Session>, body: &str) -> String {
    let mut nav = String::new();
    for (path, label) in NAV {
        let current = if *path == active {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(nav, "<a href=\"{path}\"{current}>{label}</a>");
    }
    let (who, csrf) = match session {
        Some(s) => (who_box(s), esc(&s.csrf)),
        None => (String::new(), String::new()),
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"csrf\" content=\"{csrf}\">\
         <title>{title} · Muscle</title>\
         <link rel=\"stylesheet\" href=\"/ui/assets/console.css\">\
         <script src=\"/ui/assets/console.js\" defer></script></head>\
         <body><header><span class=\"brand\">Muscle</span><nav>{nav}</nav>{who}</header>\
         <main><h1>{title}</h1>\n{body}</main></body></html>\n",
        title = esc(title),
    )
}

/// Who is signed in, and the way out (a form: signing out changes state).
fn who_box(s: &Session) -> String {
    let out = if s.signed_in {
        format!(
            "<form method=\"post\" action=\"/ui/logout\">{}<button>Sign out</button></form>",
            csrf_field(&s.csrf)
        )
    } else {
        String::new()
    };
    format!(
        "<div class=\"who\"><span data-role=\"{role}\">{who} ({role})</span>{out}</div>",
        who = esc(&s.who),
        role = s.role.as_str()
    )
}

/// The hidden field every state-changing form carries.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// A time as the CLI shows it: UTC, to the second.
pub fn when(ms: u64) -> String {
    muscle_logline::utc(ms / 1000)
}

/// When an agent last checked in: a time the page's script shows as "12 s ago" (so that a live
/// fragment changes when the agent does, not every second), stale and clock skew marked.
pub fn seen(row: &crate::views::FleetRow) -> String {
    let mut out = format!(
        "<time class=\"ago\" data-ms=\"{ms}\">{}</time>",
        when(row.last_seen_ms),
        ms = row.last_seen_ms
    );
    if row.stale {
        out.push_str(" <span class=\"stale-mark\">(stale)</span>");
    }
    if row.clock_skew_s.abs() > crate::store::CLOCK_SKEW_FLAGGED_S {
        out.push_str(&format!(" (clock {:+}s off)", row.clock_skew_s));
    }
    out
}

/// `<table>` with `header` and rows of ready-made cells (already escaped).
pub fn table(class: &str, header: &[&str], rows: &[String]) -> String {
    let mut out = format!("<table class=\"{class}\"><thead><tr>");
    for h in header {
        let _ = write!(out, "<th>{h}</th>");
    }
    out.push_str("</tr></thead><tbody>");
    for r in rows {
        out.push_str(r);
    }
    out.push_str("</tbody></table>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_text_stays_text() {
        assert_eq!(
            esc("<script>alert(\"x\")</script>&'"),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(url_part("a-b c/d?e=é"), "a-b%20c%2Fd%3Fe%3D%C3%A9");
    }
}
