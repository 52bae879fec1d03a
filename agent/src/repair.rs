//! At start-up: finish or undo what a previous run left half-done, recover apps a lost
//! `state.json` forgot, and adopt the service processes already running. Afterwards exactly the
//! committed version of each app runs, supervised.

use anyhow::Result;
use muscle_protocol::Name;

use crate::agent::Agent;
use crate::fsutil;
use crate::process::{self, Marked};
use crate::state::{self, Installed};

impl Agent {
    pub fn repair_all(&mut self) -> Result<()> {
        for app in state::recover_lost_apps(&self.cfg.state_dir, &mut self.state) {
            say!("the state file did not know {app}: recovered");
        }
        let apps: Vec<Name> = self.state.apps.keys().cloned().collect();
        for app in apps {
            self.repair(&app)?;
        }
        self.save()
    }

    fn repair(&mut self, app: &Name) -> Result<()> {
        let paths = self.paths(app);
        fsutil::remove_tmp_leftovers(&paths.dir);
        fsutil::remove_tmp_leftovers(&paths.versions);
        let marked = process::find_marked(&paths.marker());
        let st = self.state.apps.get_mut(app).expect("listed by the caller");
        let interrupted = st.pending.take();
        let current = st.current.clone();
        let adopt = match (&interrupted, &current) {
            (None, Some(current)) => {
                to_adopt(&marked, current, st.pid, st.running_version.as_ref())
            }
            _ => None,
        };
        for m in marked.iter().filter(|m| Some(m.pid) != adopt) {
            say!(
                "{app}: stopping leftover process {} ({})",
                m.pid,
                m.version.as_deref().unwrap_or("version unknown")
            );
            // By pid, even under systemd: stopping the unit would stop the adopted one too.
            process::Proc::Adopted(m.pid).stop(libc::SIGTERM, std::time::Duration::from_secs(5));
        }
        if let Some(pending) = &interrupted {
            say!(
                "{app}: install of {} was interrupted; back to the committed version",
                pending.version
            );
        }
        let Some(current) = current else {
            st.pid = None;
            st.running_version = None;
            return Ok(());
        };
        fsutil::switch_symlink(&paths.current, &paths.versions.join(&current.version))?;
        match adopt {
            Some(pid) => {
                say!("{app}: adopted running {} (pid {pid})", current.version);
                self.supervisor.adopt(self.launch(app, &current), pid);
                let st = self.state.apps.get_mut(app).expect("listed by the caller");
                st.pid = Some(pid);
                st.running_version = Some(current.version.clone());
                Ok(())
            }
            None => self.start_service(app, &current, false),
        }
    }
}

/// Which of the marked processes of an app to adopt: one that runs the committed version (by
/// its version marker; a process from an agent too old to set one only if it is the pid the
/// state file names), preferring the pid the state file names.
fn to_adopt(
    marked: &[Marked],
    current: &Installed,
    known_pid: Option<u32>,
    running_version: Option<&Name>,
) -> Option<u32> {
    let runs_current = |m: &&Marked| match &m.version {
        Some(v) => *v == *current.version,
        None => Some(m.pid) == known_pid && running_version == Some(&current.version),
    };
    marked
        .iter()
        .filter(runs_current)
        .min_by_key(|m| Some(m.pid) != known_pid)
        .map(|m| m.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installed(version: &str) -> Installed {
        Installed {
            version: Name::parse(version).unwrap(),
            binary: Name::parse("svc").unwrap(),
            sha256: "00".repeat(32),
            spec: serde_json::from_str("{}").unwrap(),
        }
    }

    fn marked(pid: u32, version: Option<&str>) -> Marked {
        Marked {
            pid,
            version: version.map(str::to_owned),
        }
    }

    #[test]
    fn adopts_the_process_of_the_committed_version_even_when_the_state_forgot_its_pid() {
        let current = installed("1.0.0");
        let found = [marked(10, Some("0.9.0")), marked(11, Some("1.0.0"))];
        assert_eq!(to_adopt(&found, &current, None, None), Some(11));
        // The pid the state names wins among several of the right version.
        let found = [marked(11, Some("1.0.0")), marked(12, Some("1.0.0"))];
        assert_eq!(to_adopt(&found, &current, Some(12), None), Some(12));
        // None of the right version: nothing is adopted (the others are stopped).
        assert_eq!(to_adopt(&found[..0], &current, Some(12), None), None);
        let v = Name::parse("1.0.0").unwrap();
        // A process without a version marker only when the state vouches for it.
        let old = [marked(13, None)];
        assert_eq!(to_adopt(&old, &current, Some(13), Some(&v)), Some(13));
        assert_eq!(to_adopt(&old, &current, None, None), None);
    }
}
