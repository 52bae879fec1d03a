//! The console's fleet page at scale: its first screen (the first 100 of every agent) as the
//! deployer serves it, and as Chromium loads it, beside Chromium loading an empty page.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::measure::{figure, one, time_runs};
use super::Row;
use crate::util;

/// Loads of each page measured.
const LOADS: usize = 5;

pub fn rows(url: &str, agents: usize, dir: &Path) -> Result<Vec<Row>> {
    let page = format!("{url}/ui/fleet");
    let counted = format!("data-agents=\"{agents}\"");
    let mut served = Vec::new();
    for _ in 0..LOADS {
        // Past the console's one-second snapshot: each load reads the whole fleet.
        std::thread::sleep(Duration::from_millis(1100));
        let start = Instant::now();
        let body = ureq::get(&page).call()?.into_string()?;
        served.push(start.elapsed().as_secs_f64() * 1000.0);
        ensure!(
            body.contains(&counted),
            "the fleet page does not count {agents} agents"
        );
    }
    let mut rows = vec![Row::new(
        format!("  console fleet page, first screen of {agents} agents, served (fleet read)"),
        "ms",
        figure(served),
        "goal (first screen, in a browser)",
        one(1000.0),
    )];
    if !util::have("chromium") {
        eprintln!("bench: no chromium (`cargo xtask setup` installs it): the console's browser row is skipped");
        return Ok(rows);
    }
    let profile = dir.join("chromium-profile");
    let chromium = |target: &str| {
        let mut c = Command::new("chromium");
        c.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", target]);
        c
    };
    let dom = util::output(&mut chromium(&page)).context("loading the fleet page in Chromium")?;
    ensure!(
        dom.contains(&counted),
        "Chromium did not get the fleet page: {dom:.200}"
    );
    let blank = time_runs(LOADS, || Ok(()), || chromium("about:blank"))?;
    let fleet = time_runs(LOADS, || Ok(()), || chromium(&page))?;
    // Chromium's own start and exit are in both: what the page adds is the difference.
    let page_ms = (fleet.median - blank.median) * 1000.0;
    rows.push(Row::new(
        "  the same page in headless Chromium, beyond loading about:blank",
        "ms",
        one(page_ms),
        "goal (first screen, in a browser)",
        one(1000.0),
    ));
    Ok(rows)
}
