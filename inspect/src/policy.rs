//! The verification policy: what a release binary must be, as a list of named checks.

use serde::{Deserialize, Serialize};

use crate::ElfFacts;

/// What a binary for one target must look like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expectation {
    /// The target's name, for messages: a triple, or `host (aarch64)`.
    pub target: String,
    /// `EM_X86_64`, `EM_AARCH64`, ...
    pub machine: String,
    /// 32 or 64.
    pub class: u8,
    /// `Some(true)`: the target links static-pie and the binary must be one. `None`: either is fine.
    pub static_pie: Option<bool>,
}

impl Expectation {
    /// What a binary must be to run on the host this code runs on. Used by the agent before
    /// installing anything, so it checks only what matters to run: machine, class, static.
    pub fn for_host() -> Option<Expectation> {
        let arch = crate::host_arch();
        Some(Expectation {
            target: format!("host ({arch})"),
            machine: crate::machine_for_arch(arch)?.to_owned(),
            class: if cfg!(target_pointer_width = "64") {
                64
            } else {
                32
            },
            static_pie: None,
        })
    }
}

/// One named check and, when it fails, the evidence (e.g. `PT_INTERP=/lib/ld-musl-aarch64.so.1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub evidence: String,
}

/// The outcome of every check on one binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub checks: Vec<Check>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.passed)
    }

    /// One line naming every failed check and its evidence, for errors and reports.
    pub fn failure_summary(&self) -> String {
        self.failures()
            .map(|c| format!("{} ({})", c.name, c.evidence))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Runs every check of the policy on `facts` against `expect`.
pub fn verify(facts: &ElfFacts, expect: &Expectation) -> Verdict {
    let mut checks = vec![
        check(
            "elf-class",
            facts.class == expect.class,
            format!("ELFCLASS{}, expected ELFCLASS{}", facts.class, expect.class),
        ),
        check(
            "elf-machine",
            facts.machine == expect.machine,
            format!(
                "e_machine={}, expected {} for {}",
                facts.machine, expect.machine, expect.target
            ),
        ),
        check(
            "no-interp",
            facts.interpreter.is_none(),
            format!("PT_INTERP={}", facts.interpreter.as_deref().unwrap_or("")),
        ),
        check(
            "no-needed",
            facts.needed.is_empty(),
            format!("DT_NEEDED={}", facts.needed.join(",")),
        ),
        check(
            "no-rpath",
            facts.rpath.is_empty(),
            format!("DT_RPATH/DT_RUNPATH={}", facts.rpath.join(":")),
        ),
        check(
            "nx-stack",
            facts.executable_stack == Some(false),
            match facts.executable_stack {
                None => "no PT_GNU_STACK header".to_owned(),
                Some(_) => "PT_GNU_STACK has PF_X (executable stack)".to_owned(),
            },
        ),
        check("relro", facts.relro, "no PT_GNU_RELRO header".to_owned()),
        check(
            "build-id",
            facts.build_id.is_some(),
            "no NT_GNU_BUILD_ID note".to_owned(),
        ),
        check(
            "stripped",
            facts.debug_sections.is_empty(),
            format!("debug sections {}", facts.debug_sections.join(",")),
        ),
    ];
    if let Some(pie) = expect.static_pie {
        checks.push(check(
            "static-pie",
            facts.static_pie == pie,
            format!(
                "e_type={} (static-pie: {}), expected static-pie: {pie} for {}",
                facts.elf_type, facts.static_pie, expect.target
            ),
        ));
    }
    Verdict { checks }
}

fn check(name: &'static str, passed: bool, evidence: String) -> Check {
    let evidence = if passed { String::new() } else { evidence };
    Check {
        name,
        passed,
        evidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> ElfFacts {
        ElfFacts {
            class: 64,
            machine: "EM_AARCH64".into(),
            elf_type: "EXEC".into(),
            interpreter: None,
            needed: vec![],
            rpath: vec![],
            executable_stack: Some(false),
            relro: true,
            build_id: Some("ab".into()),
            debug_sections: vec![],
            static_pie: false,
        }
    }

    fn aarch64() -> Expectation {
        Expectation {
            target: "aarch64-unknown-linux-musl".into(),
            machine: "EM_AARCH64".into(),
            class: 64,
            static_pie: Some(false),
        }
    }

    fn failed(facts: ElfFacts) -> Vec<(&'static str, String)> {
        verify(&facts, &aarch64())
            .failures()
            .map(|c| (c.name, c.evidence.clone()))
            .collect()
    }

    #[test]
    fn a_static_binary_passes_every_check() {
        assert!(verify(&good(), &aarch64()).passed());
    }

    #[test]
    fn each_check_names_itself_and_its_evidence() {
        type Case = (fn(&mut ElfFacts), &'static str, &'static str);
        let cases: Vec<Case> = vec![
            (|f| f.class = 32, "elf-class", "ELFCLASS32"),
            (
                |f| f.machine = "EM_X86_64".into(),
                "elf-machine",
                "e_machine=EM_X86_64",
            ),
            (
                |f| f.interpreter = Some("/lib/ld-musl-aarch64.so.1".into()),
                "no-interp",
                "PT_INTERP=/lib/ld-musl-aarch64.so.1",
            ),
            (
                |f| f.needed = vec!["libc.so.6".into()],
                "no-needed",
                "DT_NEEDED=libc.so.6",
            ),
            (|f| f.rpath = vec!["$ORIGIN".into()], "no-rpath", "$ORIGIN"),
            (|f| f.executable_stack = Some(true), "nx-stack", "PF_X"),
            (|f| f.executable_stack = None, "nx-stack", "no PT_GNU_STACK"),
            (|f| f.relro = false, "relro", "PT_GNU_RELRO"),
            (|f| f.build_id = None, "build-id", "NT_GNU_BUILD_ID"),
            (
                |f| f.debug_sections = vec![".debug_info".into()],
                "stripped",
                ".debug_info",
            ),
            (
                |f| f.static_pie = true,
                "static-pie",
                "expected static-pie: false",
            ),
        ];
        for (break_it, name, evidence) in cases {
            let mut facts = good();
            break_it(&mut facts);
            let failures = failed(facts);
            assert_eq!(failures.len(), 1, "{name}: {failures:?}");
            assert_eq!(failures[0].0, name);
            assert!(
                failures[0].1.contains(evidence),
                "{name}: {}",
                failures[0].1
            );
        }
    }

    #[test]
    fn host_expectation_ignores_pie() {
        let host = Expectation::for_host().expect("tests run on a known architecture");
        assert_eq!(host.static_pie, None);
    }
}
