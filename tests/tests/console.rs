//! The web console in a real browser: Debian's Chromium driven through chromedriver (WebDriver)
//! against a real deployer and a mixed-arch fleet of real agents (aarch64 under qemu). The
//! fleet page lists the fleet, a rollout's progress bars move while it runs without a reload,
//! the pause button pauses it (the CLI agrees), a read-only token sees no buttons and is refused
//! when it posts anyway, a form without this browser's CSRF token is refused. Screenshots of
//! each page are saved in TARGET_DIR/console-screenshots.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use muscle_e2e::{target_dir, Deployer, Fleet};
use serde_json::{json, Value};

/// chromedriver on a free loopback port, stopped with the test.
struct Chromedriver(Child);

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A headless Chromium session, and the driver it runs under.
async fn browser(dir: &Path) -> Result<(Chromedriver, Client)> {
    let port = muscle_e2e::free_port();
    let log = std::fs::File::create(dir.join("chromedriver.log"))?;
    let driver = Chromedriver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting chromedriver (`cargo xtask setup` installs chromium-driver)")?,
    );
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(
            Instant::now() < deadline,
            "chromedriver did not listen within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let profile = dir.join("chromium-profile");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&url)
        .await
        .context("opening a Chromium session")?;
    Ok((driver, client))
}

/// Polls `check` every 200 ms until it gives a value, for at most `timeout`.
async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn screenshots() -> PathBuf {
    target_dir().join("console-screenshots")
}

async fn screenshot(c: &Client, name: &str) -> Result<()> {
    let png = c.screenshot().await?;
    ensure!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    std::fs::create_dir_all(screenshots())?;
    std::fs::write(screenshots().join(format!("{name}.png")), png)?;
    Ok(())
}

async fn path_of(c: &Client) -> Result<String> {
    Ok(c.current_url().await?.path().to_owned())
}

/// Signs in with `token`; whether the console took it.
async fn sign_in(c: &Client, base: &str, token: &str) -> Result<bool> {
    c.goto(&format!("{base}/ui/login")).await?;
    c.find(Locator::Css("input[name=token]"))
        .await?
        .send_keys(token)
        .await?;
    c.find(Locator::Css("form.login button"))
        .await?
        .click()
        .await?;
    eventually(
        "the answer to signing in",
        Duration::from_secs(10),
        async || {
            let path = path_of(c).await?;
            let refused = !c.find_all(Locator::Css("p.error")).await?.is_empty();
            Ok(match path.as_str() {
                "/ui/fleet" => Some(true),
                "/ui/login" if refused => Some(false),
                _ => None,
            })
        },
    )
    .await
}

async fn sign_out(c: &Client) -> Result<()> {
    c.find(Locator::Css("header .who button"))
        .await?
        .click()
        .await?;
    eventually("the sign-in page", Duration::from_secs(10), async || {
        Ok((path_of(c).await? == "/ui/login").then_some(()))
    })
    .await
}

/// The status and body of a POST the page's own script makes to `path`, with this page's CSRF
/// token or without one. A redirect (what a taken request answers) reads as status 0.
async fn post_from_page(c: &Client, path: &str, with_csrf: bool) -> Result<(u64, String)> {
    let script = r#"
        const [path, withCsrf, done] = arguments;
        const csrf = document.querySelector('meta[name=csrf]').content;
        const body = new URLSearchParams(withCsrf ? {csrf} : {});
        fetch(path, {method: 'POST', body, redirect: 'manual'})
            .then(async r => done([r.status, r.type === 'opaqueredirect' ? '' : await r.text()]),
                  e => done([-1, String(e)]));
    "#;
    let answer = c
        .execute_async(script, vec![json!(path), json!(with_csrf)])
        .await?;
    let status = answer[0]
        .as_u64()
        .with_context(|| format!("POST {path} from the page: {answer}"))?;
    Ok((status, answer[1].as_str().unwrap_or_default().to_owned()))
}

/// Healthy and all members of the rollout on the page, its status, and whether the page is
/// still the one `mark` was set on (not reloaded).
async fn progress(c: &Client) -> Result<(u64, u64, String, bool)> {
    let script = r#"
        let healthy = 0, all = 0;
        for (const a of document.querySelectorAll('.wave .arch')) {
            healthy += Number(a.dataset.healthy);
        }
        all = document.querySelectorAll('.member').length;
        const status = document.querySelector('[data-status]');
        return [healthy, all, status ? status.dataset.status : '', window.muscleMark === 1];
    "#;
    let v: Value = c.execute(script, vec![]).await?;
    Ok((
        v[0].as_u64().unwrap_or(0),
        v[1].as_u64().unwrap_or(0),
        v[2].as_str().unwrap_or("").to_owned(),
        v[3].as_bool().unwrap_or(false),
    ))
}

fn cli_status(d: &Deployer, id: i64) -> Result<String> {
    Ok(d.rollout(Some(id))?["status"]
        .as_str()
        .unwrap_or("")
        .to_owned())
}

#[test]
fn the_console_shows_the_fleet_and_a_live_rollout_and_steers_it_in_a_real_browser() -> Result<()> {
    let b = common::builds();
    let dir = common::scratch("console");
    let deployer = Deployer::start(&b.deployer, &dir.join("data"))?;
    deployer.publish(&b.v1.dir)?;
    deployer.publish(&b.v2.dir)?;
    let fleet = Fleet::start(deployer, &b.both_arches(), 2, &dir)?;
    let d = &fleet.deployer;
    let token = |name: &str, role: &str| -> Result<String> {
        Ok(d.ok(&["token", "create", name, "--role", role])?
            .trim()
            .to_owned())
    };
    let (ops, viewer) = (token("ops", "operator")?, token("viewer", "read-only")?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (_driver, c) = browser(&dir).await?;
        let outcome = walk_through(&c, &fleet, &ops, &viewer).await;
        let _ = c.close().await;
        outcome
    })
}

async fn walk_through(c: &Client, fleet: &Fleet, ops: &str, viewer: &str) -> Result<()> {
    let d = &fleet.deployer;
    let base = d.url();

    // Tokens exist: the console asks for one first.
    c.goto(&format!("{base}/ui/fleet")).await?;
    ensure!(
        path_of(c).await? == "/ui/login",
        "an unknown browser is sent to sign in"
    );
    ensure!(
        !sign_in(c, &base, "not-a-token").await?,
        "a wrong token is refused"
    );
    ensure!(sign_in(c, &base, ops).await?);
    let mut arches = vec![];
    for row in c.find_all(Locator::Css("tr[data-agent]")).await? {
        arches.push(row.attr("data-arch").await?.unwrap_or_default());
    }
    arches.sort();
    ensure!(
        arches == ["aarch64", "aarch64", "x86_64", "x86_64"],
        "the fleet page lists the mixed-arch fleet: {arches:?}"
    );
    screenshot(c, "fleet").await?;

    let spec = common::service_spec();
    let id = fleet.start_rollout(&[
        "hello-service",
        "0.2.0",
        "--service",
        &spec,
        "--min-healthy-time",
        "6s",
        "--max-parallel",
        "1",
    ])?;
    c.goto(&format!("{base}/ui/rollouts/{id}")).await?;
    c.execute("window.muscleMark = 1;", vec![]).await?;
    let (first, members, _, _) = progress(c).await?;
    ensure!(members == 4, "all four agents are members: {members}");
    // The bars move while the page stays: live updates, not reloads.
    eventually(
        "the progress bars to move mid-rollout",
        Duration::from_secs(120),
        async || {
            let (healthy, all, _, same_page) = progress(c).await?;
            ensure!(same_page, "the page was reloaded");
            Ok((healthy > first && healthy < all).then_some(()))
        },
    )
    .await?;
    screenshot(c, "rollout").await?;

    let steer = format!("/ui/rollouts/{id}/pause");
    let (status, body) = post_from_page(c, &steer, false).await?;
    ensure!(
        status == 403 && body.contains("CSRF"),
        "a form without the CSRF token is refused: {status} {body}"
    );
    ensure!(cli_status(d, id)? == "running");
    // The button lives in what live updates replace: find it again if it was replaced.
    eventually(
        "a click on the pause button",
        Duration::from_secs(10),
        async || {
            let clicked = match c.find(Locator::Css("button.request-pause")).await {
                Ok(button) => button.click().await.is_ok(),
                Err(_) => false,
            };
            Ok(clicked.then_some(()))
        },
    )
    .await?;
    eventually(
        "the CLI to see the rollout paused",
        Duration::from_secs(30),
        async || Ok((cli_status(d, id)? == "paused").then_some(())),
    )
    .await?;
    eventually(
        "the page to show it paused",
        Duration::from_secs(30),
        async || Ok((progress(c).await?.2 == "paused").then_some(())),
    )
    .await?;
    ensure!(
        c.find_all(Locator::Css("button.request-resume"))
            .await?
            .len()
            == 1
            && c.find_all(Locator::Css("button.request-pause"))
                .await?
                .is_empty(),
        "a paused rollout offers resume, not pause"
    );

    // A read-only token sees no buttons, and is refused for its role when it posts anyway.
    sign_out(c).await?;
    ensure!(sign_in(c, &base, viewer).await?);
    c.goto(&format!("{base}/ui/rollouts/{id}")).await?;
    c.find(Locator::Css("#rollout [data-status]")).await?;
    ensure!(
        c.find_all(Locator::Css(".buttons form")).await?.is_empty(),
        "no steering buttons for a read-only token"
    );
    for request in ["pause", "resume", "abort"] {
        let (status, body) =
            post_from_page(c, &format!("/ui/rollouts/{id}/{request}"), true).await?;
        ensure!(
            status == 403 && body.contains("read-only"),
            "a read-only token may not {request}: {status} {body}"
        );
    }
    ensure!(
        cli_status(d, id)? == "paused",
        "and the rollout stays paused"
    );
    c.goto(&format!("{base}/ui/agents/aarch64-1")).await?;
    c.find(Locator::Css("table.history")).await?;
    ensure!(
        c.find_all(Locator::Css("form[action*='/logs/']"))
            .await?
            .is_empty(),
        "no log tails for a read-only token"
    );
    let (status, body) = post_from_page(c, "/ui/agents/x86_64-1/logs/hello-service", true).await?;
    ensure!(
        status == 403 && body.contains("read-only"),
        "no log tails for a read-only token: {status} {body}"
    );

    // The same request from the operator's page is taken: the refusals above were the role's.
    sign_out(c).await?;
    ensure!(sign_in(c, &base, ops).await?);
    c.goto(&format!("{base}/ui/rollouts/{id}")).await?;
    c.execute("window.muscleMark = 1;", vec![]).await?;
    let (status, body) = post_from_page(c, &format!("/ui/rollouts/{id}/resume"), true).await?;
    ensure!(
        status == 0,
        "the operator's resume is taken: {status} {body}"
    );
    eventually(
        "the page to show the rollout succeeded",
        Duration::from_secs(180),
        async || {
            let (healthy, all, status, same_page) = progress(c).await?;
            ensure!(same_page, "the page was reloaded");
            Ok((status == "succeeded" && healthy == all).then_some(()))
        },
    )
    .await?;
    ensure!(cli_status(d, id)? == "succeeded");
    screenshot(c, "rollout-succeeded").await?;

    // A link to the rollout followed from another site (a chat, a ticket) lands on it, though
    // the browser does not send the Strict cookie with such a navigation.
    let elsewhere = format!("data:text/html,<a id=go href='{base}/ui/rollouts/{id}'>rollout</a>");
    c.goto(&elsewhere).await?;
    c.find(Locator::Id("go")).await?.click().await?;
    eventually(
        "the linked rollout page",
        Duration::from_secs(10),
        async || {
            let shown = !c
                .find_all(Locator::Css("#rollout [data-status]"))
                .await?
                .is_empty();
            let asked_to_sign_in = !c.find_all(Locator::Css("form.login")).await?.is_empty();
            ensure!(
                !asked_to_sign_in,
                "a signed-in browser was asked to sign in again"
            );
            Ok(shown.then_some(()))
        },
    )
    .await?;
    ensure!(path_of(c).await? == format!("/ui/rollouts/{id}"));

    // An agent's page: its history, and for operators a fresh tail of its service's log.
    c.goto(&format!("{base}/ui/agents/aarch64-1")).await?;
    let history = c.find(Locator::Css("table.history")).await?.text().await?;
    ensure!(
        history.contains("hello-service 0.2.0 installed"),
        "{history}"
    );
    screenshot(c, "agent").await?;
    c.find(Locator::Css("form[action*='/logs/hello-service'] button"))
        .await?
        .click()
        .await?;
    let log = c.find(Locator::Css("pre.log")).await?.text().await?;
    ensure!(
        log.contains("hello-service 0.2.0 (aarch64) listening on"),
        "the tail of the aarch64 agent's service log: {log}"
    );

    c.goto(&format!("{base}/ui/releases")).await?;
    let release = c
        .find(Locator::Css("section[data-release='hello-service 0.2.0']"))
        .await?
        .text()
        .await?;
    for fact in [
        "counter ",
        "rustc 1.",
        "aarch64-unknown-linux-musl",
        "x86_64-unknown-linux-musl",
        "static",
    ] {
        ensure!(
            release.contains(fact),
            "{fact:?} missing from the release: {release}"
        );
    }
    screenshot(c, "releases").await?;
    Ok(())
}
