//! Where an app lives in the state directory.
//!
//! ```text
//! STATE_DIR/state.json
//! STATE_DIR/apps/<app>/versions/<version>/<binary>
//! STATE_DIR/apps/<app>/versions/<version>/receipt.json   (what it takes to run it)
//! STATE_DIR/apps/<app>/current -> versions/<version>
//! STATE_DIR/apps/<app>/downloads/<sha256>.part
//! STATE_DIR/apps/<app>/service.log (+ service.log.1)
//! ```

use std::path::{Path, PathBuf};

pub struct AppPaths {
    pub dir: PathBuf,
    pub versions: PathBuf,
    pub current: PathBuf,
    pub downloads: PathBuf,
    pub log: PathBuf,
}

impl AppPaths {
    pub fn new(state_dir: &Path, app: &str) -> AppPaths {
        let dir = state_dir.join("apps").join(app);
        AppPaths {
            versions: dir.join("versions"),
            current: dir.join("current"),
            downloads: dir.join("downloads"),
            log: dir.join("service.log"),
            dir,
        }
    }

    pub fn create(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.versions)?;
        std::fs::create_dir_all(&self.downloads)
    }

    pub fn binary(&self, version: &str, binary: &str) -> PathBuf {
        self.versions.join(version).join(binary)
    }

    /// What the agent knew when it installed `version`: enough to run and adopt it again after
    /// `state.json` is lost.
    pub fn receipt(&self, version: &str) -> PathBuf {
        self.versions.join(version).join("receipt.json")
    }

    /// The value of the process marker for this app's services.
    pub fn marker(&self) -> String {
        self.dir.display().to_string()
    }
}
