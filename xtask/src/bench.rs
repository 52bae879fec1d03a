//! `cargo xtask bench`: the figures users compare, each beside a baseline measured in the same
//! run on the same machine, as a ratio. Nothing here asserts a time: benchmarks report, tests test.

mod console;
mod fleet_load;
mod measure;
mod scenarios;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;

use crate::util;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Fewer repetitions, shorter windows and a 10-agent fleet instead of 50.
    #[arg(long)]
    pub quick: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also keep the idle agent checking in for this many minutes (default 60), its RSS sampled
    /// every minute, and report the slope: memory that grows over time shows here.
    #[arg(long, value_name = "MINUTES", num_args = 0..=1, default_missing_value = "60")]
    pub soak: Option<u64>,
    /// Only these scenarios (repeatable): release, verify, agent-size, agent-idle, checkins,
    /// transfer, convergence, fleet-load.
    #[arg(long, value_name = "SCENARIO", value_parser = [
        "release", "verify", "agent-size", "agent-idle", "checkins", "transfer", "convergence",
        "fleet-load",
    ])]
    pub only: Vec<String>,
}

/// One figure: the median of its samples and their spread.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

/// One row of the report: what Muscle does, what it is compared with, and the ratio.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub what: String,
    pub unit: &'static str,
    pub muscle: Figure,
    pub baseline_label: String,
    pub baseline: Figure,
    /// muscle / baseline.
    pub ratio: f64,
}

impl Row {
    pub fn new(
        what: impl Into<String>,
        unit: &'static str,
        muscle: Figure,
        baseline_label: impl Into<String>,
        baseline: Figure,
    ) -> Row {
        let ratio = if baseline.median > 0.0 {
            muscle.median / baseline.median
        } else {
            f64::NAN
        };
        Row {
            what: what.into(),
            unit,
            muscle,
            baseline_label: baseline_label.into(),
            baseline,
            ratio,
        }
    }
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    quick: bool,
    rows: Vec<Row>,
}

pub struct Settings {
    pub quick: bool,
    /// Minutes of the RSS soak, if asked for.
    pub soak_minutes: Option<u64>,
    pub dir: PathBuf,
    /// Repetitions per timed figure.
    pub reps: usize,
    /// `--only`: empty for every scenario.
    pub only: Vec<String>,
}

impl Settings {
    pub fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

pub fn run(args: BenchArgs) -> Result<i32> {
    if crate::setup::run(Default::default())? != 0 {
        bail!(
            "setup is incomplete (see above); the benchmarks need wrk, nginx, curl and qemu-user"
        );
    }
    let dir = muscle_e2e::target_dir().join("bench");
    let settings = Settings {
        quick: args.quick,
        soak_minutes: args.soak,
        reps: if args.quick { 3 } else { 7 },
        dir: dir.clone(),
        only: args.only,
    };
    let rows = scenarios::all(&settings)?;
    let report = Report {
        date: util::output(
            std::process::Command::new("date")
                .arg("-u")
                .arg("+%Y-%m-%d %H:%M UTC"),
        )?
        .trim()
        .to_owned(),
        machine: machine(),
        quick: args.quick,
        rows,
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} on {}{}",
            report.date,
            report.machine,
            if args.quick { " (--quick)" } else { "" }
        );
        print!("{}", render(&report.rows));
        println!(
            "(median [min-max] of each figure; written to {})",
            dir.join("report.json").display()
        );
    }
    Ok(0)
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} x {model}, {}", std::env::consts::ARCH)
}

fn show(f: &Figure, unit: &str) -> String {
    let n = |v: f64| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else if v >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        }
    };
    if f.samples > 1 {
        format!("{} {unit} [{}-{}]", n(f.median), n(f.min), n(f.max))
    } else {
        format!("{} {unit}", n(f.median))
    }
}

fn render(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.what.clone(),
                show(&r.muscle, r.unit),
                r.baseline_label.clone(),
                show(&r.baseline, r.unit),
                format!("{:.2}x", r.ratio),
            ]
        })
        .collect();
    util::table(
        &[
            "MEASUREMENT",
            "MUSCLE",
            "BASELINE",
            "BASELINE FIGURE",
            "RATIO",
        ],
        &cells,
    )
}
