//! `cargo xtask verify`: the release verification policy, standalone.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use muscle_inspect::{ElfFacts, Expectation, Verdict};

use crate::targets::{self, TargetSpec};
use crate::util::{self, EXIT_FAILED, EXIT_UNUSABLE};

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The target the binaries must be built for (default: any target in targets/, reported).
    #[arg(long)]
    pub target: Option<String>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Binaries to verify.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(serde::Serialize)]
pub(crate) struct FileResult {
    file: PathBuf,
    target: Option<String>,
    error: Option<String>,
    facts: Option<ElfFacts>,
    verdict: Option<Verdict>,
}

pub fn run(args: VerifyArgs) -> Result<i32> {
    let all = targets::load_all(&util::muscle_root().join("targets"))?;
    let forced = match &args.target {
        Some(t) => Some(targets::select(&all, std::slice::from_ref(t))?.remove(0)),
        None => None,
    };
    let results: Vec<FileResult> = args
        .files
        .iter()
        .map(|f| verify_file(f, forced.as_ref(), &all))
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", render(&results));
    }
    Ok(exit_code(&results))
}

pub(crate) fn verify_file(
    file: &Path,
    forced: Option<&TargetSpec>,
    all: &[TargetSpec],
) -> FileResult {
    let facts = match muscle_inspect::inspect_file(file) {
        Ok(f) => f,
        Err(e) => {
            return FileResult {
                file: file.to_owned(),
                target: None,
                error: Some(e.in_file(file)),
                facts: None,
                verdict: None,
            }
        }
    };
    let expectation = match forced {
        Some(t) => t.expectation(),
        // A default target first: an aarch64 binary is reported as musl, not as opt-in gnu.
        None => match all
            .iter()
            .filter(|t| t.elf_machine == facts.machine && t.elf_class == facts.class)
            .min_by_key(|t| !t.default)
        {
            Some(t) => t.expectation(),
            None => Expectation {
                target: format!(
                    "any known target ({})",
                    all.iter()
                        .map(|t| t.triple.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                machine: all
                    .iter()
                    .map(|t| t.elf_machine.as_str())
                    .collect::<Vec<_>>()
                    .join("|"),
                class: facts.class,
                static_pie: None,
            },
        },
    };
    let verdict = muscle_inspect::verify(&facts, &expectation);
    FileResult {
        file: file.to_owned(),
        target: Some(expectation.target),
        error: None,
        facts: Some(facts),
        verdict: Some(verdict),
    }
}

fn render(results: &[FileResult]) -> String {
    let mut rows = Vec::new();
    let mut details = String::new();
    for r in results {
        let file = r.file.display().to_string();
        let verdict = match (&r.error, &r.verdict) {
            (Some(e), _) => {
                details += &format!("error: {e}\n");
                "UNUSABLE".to_owned()
            }
            (None, Some(v)) if v.passed() => "ok".to_owned(),
            (None, Some(v)) => {
                for c in v.failures() {
                    details += &format!("{file}: check {} failed: {}\n", c.name, c.evidence);
                }
                format!(
                    "FAIL ({})",
                    v.failures().map(|c| c.name).collect::<Vec<_>>().join(", ")
                )
            }
            (None, None) => unreachable!("a file has either an error or a verdict"),
        };
        let facts = r.facts.as_ref();
        rows.push(vec![
            file,
            r.target.clone().unwrap_or_default(),
            facts
                .map(|f| format!("{} ELF{}", f.machine, f.class))
                .unwrap_or_default(),
            facts.map(|f| f.elf_type.clone()).unwrap_or_default(),
            verdict,
        ]);
    }
    util::table(&["FILE", "TARGET", "MACHINE", "TYPE", "VERDICT"], &rows) + &details
}

/// 2 when any file was unusable, 1 when any check failed, 0 otherwise.
fn exit_code(results: &[FileResult]) -> i32 {
    if results.iter().any(|r| r.error.is_some()) {
        EXIT_UNUSABLE
    } else if results
        .iter()
        .any(|r| r.verdict.as_ref().is_some_and(|v| !v.passed()))
    {
        EXIT_FAILED
    } else {
        0
    }
}
