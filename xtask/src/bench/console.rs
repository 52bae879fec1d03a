//! The console's fleet page at scale: its first screen (the first 100 of every agent) as the
//! deployer serves it, and as Chromium loads it, beside Chromium loading an empty page.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use super::measure::{figure, one, scale, time_runs};
use super::Row;
use crate::util;

/// Loads of each page measured.
const LOADS: usize = 5;

pub fn rows(url: &str, agents: usize, dir: &Path) -> Result<Vec<Row>> {
    let page = format!("{url}/ui/fleet");
    let counted = format!("data-agents=\"{agents}\"");
    let mut served = Vec::new();
    for _ in 0..LOADS {
        let start = Instant::now();
        let body = ureq::get(&page).call()?.into_string()?;
        served.push(start.elapsed().as_secs_f64() * 1000.0);
        ensure!(
            body.contains(&counted),
            "the fleet page does not count {agents} agents"
        );
    }
    let mut rows = vec![Row::new(
        format!("  console fleet page, first screen of {agents} agents, served"),
        "ms",
        figure(served),
        "goal (rendered in a browser)",
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
    rows.push(Row::new(
        "  the same page in Chromium, started to DOM loaded",
        "ms",
        scale(fleet, 1000.0),
        "Chromium on about:blank",
        scale(blank, 1000.0),
    ));
    Ok(rows)
}
