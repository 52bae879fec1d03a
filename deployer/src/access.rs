//! `muscle-deploy token create|list|revoke` and `muscle-deploy audit`, and the audit record every
//! change made from this command line leaves.

use anyhow::{bail, Context, Result};
use muscle_protocol::Name;

use crate::cli::TokenCommand;
use crate::now_ms;
use crate::store::{AuditEntry, Change, Role, Store};
use crate::views::table;

/// Who changes the store from this host's command line: `local:<user>`.
pub fn local_who() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| {
            // /proc/self belongs to this process's user: its uid without unsafe code.
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self")
                .map(|m| format!("uid={}", m.uid()))
                .unwrap_or_else(|_| "unknown".to_owned())
        });
    format!("local:{user}")
}

/// Records `change`, made now by this command line's user.
pub fn record(store: &dyn Store, change: Change) -> Result<()> {
    store
        .record(&AuditEntry {
            at_ms: now_ms(),
            who: local_who(),
            change,
        })
        .context("the change was made, but not written to the audit log")
}

pub fn token_command(cmd: TokenCommand, store: &dyn Store) -> Result<()> {
    match cmd {
        TokenCommand::Create { name, role } => create(store, &name, role),
        TokenCommand::List { json } => list(store, json),
        TokenCommand::Revoke { name } => {
            if !store.revoke_token(name.as_str())? {
                bail!("there is no token {name}: `muscle-deploy token list` lists them");
            }
            record(
                store,
                Change::TokenRevoke {
                    name: name.to_string(),
                },
            )?;
            println!("token {name} revoked");
            Ok(())
        }
    }
}

fn create(store: &dyn Store, name: &Name, role: Role) -> Result<()> {
    let secret = crate::auth::new_credential().context("reading /dev/urandom")?;
    let hash = muscle_protocol::sha256_hex(secret.as_bytes());
    if !store.create_token(name.as_str(), role, &hash, now_ms())? {
        bail!("a token named {name} exists: revoke it first, or choose another name");
    }
    record(
        store,
        Change::TokenCreate {
            name: name.to_string(),
            role,
        },
    )?;
    println!("{secret}");
    eprintln!(
        "token {name} ({}) created; the line above is its secret, shown once: give it as \
         `Authorization: Bearer <secret>`",
        role.as_str()
    );
    Ok(())
}

fn list(store: &dyn Store, json: bool) -> Result<()> {
    let tokens = store.tokens()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&tokens)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.role.as_str().to_owned(),
                muscle_logline::utc(t.created_ms / 1000),
            ]
        })
        .collect();
    print!("{}", table(&["TOKEN", "ROLE", "CREATED"], &rows));
    Ok(())
}

/// `audit`: the newest changes, oldest first.
pub fn print_audit(entries: &[AuditEntry], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                muscle_logline::utc(e.at_ms / 1000),
                e.who.clone(),
                describe(&e.change),
            ]
        })
        .collect();
    print!("{}", table(&["WHEN", "WHO", "CHANGE"], &rows));
    Ok(())
}

fn describe(change: &Change) -> String {
    match change {
        Change::Publish { app, version } => format!("published {app} {version}"),
        Change::PublishImage { name, version } => format!("published boot image {name} {version}"),
        Change::RolloutStart {
            rollout,
            app,
            version,
        } => format!("started rollout {rollout}: {app} {version}"),
        Change::RolloutRequest { rollout, request } => {
            format!("asked rollout {rollout} to {}", request.as_str())
        }
        Change::Undeploy { app, agents } => {
            format!("undeployed {app} from {}", agents.join(", "))
        }
        Change::Exec { job, argv, agents } => {
            format!("ran job {job} on {agents} agent(s): {}", argv.join(" "))
        }
        Change::TokenCreate { name, role } => {
            format!("created token {name} ({})", role.as_str())
        }
        Change::TokenRevoke { name } => format!("revoked token {name}"),
        Change::EngineTakeover { replica } => format!("replica {replica} runs the rollout engine"),
    }
}
