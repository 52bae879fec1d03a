//! What the CLI asks of a deployer, whether its store is here (`Local`, the embedded default) or
//! behind `--server URL` (`crate::client::Remote`): the commands print the same either way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::ops::{self, StartRequest, Started, UndeployRequest, Undeployed};
use crate::publish::PublishOutcome;
use crate::rollout::{Request, Rollout};
use crate::store::{AuditEntry, Store};
use crate::views::{AgentDetail, FleetRow, ReleaseRow};
use crate::{access, keys, now_ms, publish, views};

/// Which rollout a command means.
#[derive(Debug, Clone, Copy)]
pub enum Which {
    Id(i64),
    Newest,
}

pub trait Control {
    /// Re-checks the release directory and stores it.
    fn publish(&self, release: &Path) -> Result<PublishOutcome>;
    fn releases(&self) -> Result<Vec<ReleaseRow>>;
    fn fleet(&self) -> Result<Vec<FleetRow>>;
    /// One agent and its history; `None` when the deployer does not know it.
    fn agent(&self, id: &str) -> Result<Option<AgentDetail>>;
    fn rollout(&self, which: Which) -> Result<Option<Rollout>>;
    fn start_rollout(&self, req: StartRequest) -> Result<Started>;
    fn ask(&self, id: i64, what: Request) -> Result<()>;
    fn undeploy(&self, req: &UndeployRequest) -> Result<Undeployed>;
    fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>>;
}

/// The store in this host's data dir; changes are recorded as `local:<user>`'s.
pub struct Local {
    pub store: Arc<dyn Store>,
    /// `--blob-store`; blobs are in `dir` without it.
    pub blob_store: Option<String>,
    pub dir: PathBuf,
    /// `publish --trusted-key`, beside DATA_DIR/trusted-keys.
    pub trusted_keys: Vec<String>,
}

impl Control for Local {
    fn publish(&self, release: &Path) -> Result<PublishOutcome> {
        let blobs = crate::store::open_blobs(self.blob_store.as_deref(), &self.dir)?;
        let keys = keys::load_keys(&self.trusted_keys, &self.dir)?;
        publish::publish_recorded(
            release,
            self.store.as_ref(),
            blobs.as_ref(),
            &keys,
            &access::local_who(),
        )
    }

    fn releases(&self) -> Result<Vec<ReleaseRow>> {
        Ok(views::release_rows(&self.store.releases()?))
    }

    fn fleet(&self) -> Result<Vec<FleetRow>> {
        Ok(views::fleet_rows(&self.store.agents()?, now_ms()))
    }

    fn agent(&self, id: &str) -> Result<Option<AgentDetail>> {
        Ok(agent_detail(self.store.as_ref(), id)?)
    }

    fn rollout(&self, which: Which) -> Result<Option<Rollout>> {
        Ok(match which {
            Which::Id(id) => self.store.rollout(id)?,
            Which::Newest => self.store.rollouts()?.pop(),
        })
    }

    fn start_rollout(&self, req: StartRequest) -> Result<Started> {
        Ok(ops::start(self.store.as_ref(), req, &access::local_who())?)
    }

    fn ask(&self, id: i64, what: Request) -> Result<()> {
        Ok(ops::ask(
            self.store.as_ref(),
            id,
            what,
            &access::local_who(),
        )?)
    }

    fn undeploy(&self, req: &UndeployRequest) -> Result<Undeployed> {
        Ok(ops::undeploy(
            self.store.as_ref(),
            req,
            &access::local_who(),
        )?)
    }

    fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        self.store.audit(limit).context("reading the audit log")
    }
}

/// How many of an agent's newest events `agent ID` shows.
pub const HISTORY_SHOWN: usize = 100;

/// What `agent ID` and `GET /v1/agents/{id}` show.
pub fn agent_detail(store: &dyn Store, id: &str) -> crate::store::Result<Option<AgentDetail>> {
    let Some(agent) = store.agents()?.into_iter().find(|a| a.id == id) else {
        return Ok(None);
    };
    let row = views::fleet_rows(std::slice::from_ref(&agent), now_ms()).remove(0);
    Ok(Some(AgentDetail {
        agent: row,
        history: store.events(id, HISTORY_SHOWN)?,
    }))
}
