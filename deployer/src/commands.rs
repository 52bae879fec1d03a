//! What each command does: those that work on a local store and through `--server` alike go
//! through [`Control`]; the rest need the store on this host.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::cli::Command;
use crate::control::{Control, Local};
use crate::store::Store;
use crate::{access, exec, fsck, service_logs, steer, views};

/// A command on the store in `dir`.
/// A command on the records in `store` and the blobs at `blob_store` (or in `dir`).
pub fn local(
    command: Command,
    store: Arc<dyn Store>,
    blob_store: Option<&str>,
    dir: &Path,
) -> Result<()> {
    match command {
        Command::Exec(args) => {
            if !exec::exec(args, store.as_ref())? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Jobs { id, json } => exec::jobs(id.as_deref(), json, store.as_ref()),
        Command::Logs(args) => service_logs::logs(args, store.as_ref()),
        Command::Token(cmd) => access::token_command(cmd, store.as_ref()),
        Command::Fsck { json } => {
            let blobs = crate::store::open_blobs(blob_store, dir)?;
            let report = fsck::fsck(store.as_ref(), blobs.as_ref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            if !report.problems.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Publish {
            dir: release,
            trusted_keys,
        } => {
            let local = Local {
                store,
                blob_store: blob_store.map(str::to_owned),
                dir: dir.to_owned(),
                trusted_keys,
            };
            println!("{}", local.publish(&release)?);
            Ok(())
        }
        command => {
            let local = Local {
                store,
                blob_store: blob_store.map(str::to_owned),
                dir: dir.to_owned(),
                trusted_keys: Vec::new(),
            };
            shared(command, &local)
        }
    }
}

/// A command through the deployer's API.
pub fn remote(command: Command, control: &dyn Control) -> Result<()> {
    match command {
        Command::Publish {
            dir, trusted_keys, ..
        } => {
            if !trusted_keys.is_empty() {
                bail!(
                    "--trusted-key: the deployer decides which keys it trusts (`serve \
                     --trusted-key` or its DATA_DIR/trusted-keys), not the uploader"
                );
            }
            println!("{}", control.publish(&dir)?);
            Ok(())
        }
        Command::Serve(_)
        | Command::Exec(_)
        | Command::Jobs { .. }
        | Command::Logs(_)
        | Command::Token(_)
        | Command::Fsck { .. } => bail!(
            "this command runs on the deployer's host, without --server; through --server: \
             publish, releases, fleet, agent, rollout, undeploy and audit"
        ),
        command => shared(command, control),
    }
}

/// The commands `Control` serves, printed the same on either side.
fn shared(command: Command, control: &dyn Control) -> Result<()> {
    match command {
        Command::Releases { json } => {
            let releases = control.releases()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&releases)?);
            } else {
                print!("{}", views::releases_table(releases));
            }
        }
        Command::Fleet { json } => {
            let fleet = control.fleet()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&fleet)?);
            } else {
                print!("{}", views::fleet_table(fleet));
            }
        }
        Command::Agent { id, json } => {
            let Some(detail) = control.agent(&id)? else {
                bail!("there is no agent {id:?}; `muscle-deploy fleet` lists them");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&detail)?);
            } else {
                print!("{}", views::agent_detail(detail));
            }
        }
        Command::Rollout(cmd) => steer::rollout_command(cmd, control)?,
        Command::Undeploy { app, selector } => steer::undeploy(control, app, selector)?,
        Command::Audit { limit, json } => access::print_audit(&control.audit(limit)?, json)?,
        _ => unreachable!("the other commands are dispatched by `local` and `remote`"),
    }
    Ok(())
}
