//! `cargo xtask demo`: the whole story on one machine. Release this workspace's agent and three
//! versions of hello-service for x86_64, aarch64, armv7 and riscv64, start a deployer and a mixed
//! fleet (the foreign agents under qemu-user), roll v1 out, then v2 in health-gated waves, then a v3 whose health
//! fails: it halts in the canary wave and is rolled back.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use muscle_e2e::{host_deployer, release_agents, release_hello, Deployer, Fleet, HelloVersion};

use crate::util;

mod vm;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Leave the deployer and the fleet running at the end and print how to look at them.
    #[arg(long)]
    pub keep: bool,
    /// Agents per architecture.
    #[arg(long, default_value_t = 2)]
    pub agents_per_arch: usize,
    /// Bare machines instead: VMs that boot the boot image (x86_64 from the network through
    /// iPXE), join the fleet and run hello-service.
    #[arg(long)]
    pub vm: bool,
}

pub(crate) fn step(text: &str) {
    eprintln!("\n==> {text}");
}

pub fn run(args: DemoArgs) -> Result<i32> {
    step("setup: rustup targets, cross C compiler, qemu-user");
    if crate::setup::run(Default::default())? != 0 {
        bail!("setup is incomplete (see above); the demo needs every target and qemu-user");
    }
    muscle_e2e::require_emulation()?;
    if args.vm {
        return vm::run(args.keep);
    }
    let root = muscle_e2e::target_dir().join("demo");
    let _ = std::fs::remove_dir_all(&root);
    let dist = root.join("dist");

    step("build: muscle-deploy for this host; muscle-agent and hello-service 0.1.0, 0.2.0, 0.3.0 (unhealthy) for x86_64, aarch64, armv7 and riscv64");
    let deployer_bin = host_deployer(false)?;
    let agents = release_agents(&dist)?;
    let releases = [
        release_hello(
            HelloVersion {
                version: "0.1.0",
                unhealthy: false,
            },
            &dist,
        )?,
        release_hello(
            HelloVersion {
                version: "0.2.0",
                unhealthy: false,
            },
            &dist,
        )?,
        release_hello(
            HelloVersion {
                version: "0.3.0",
                unhealthy: true,
            },
            &dist,
        )?,
    ];
    util::run(
        util::cargo().args(["xtask", "verify"]).args(
            releases
                .iter()
                .flat_map(|r| muscle_e2e::ALL_TARGETS.map(|(t, _)| r.binary(t, "hello-service"))),
        ),
    )?;

    step("deployer: muscle-deploy serve on loopback, publish the three releases");
    let deployer = Deployer::start(&deployer_bin, &root.join("data"))?;
    eprintln!("serving on {}", deployer.url());
    for r in &releases {
        eprint!("{}", deployer.publish(&r.dir)?);
    }

    step(&format!("fleet: {n} x86_64 agents (native) and {n} each of aarch64, armv7 and riscv64 (their binaries under qemu-user)", n = args.agents_per_arch));
    let binaries =
        muscle_e2e::ALL_TARGETS.map(|(triple, arch)| (agents.binary(triple, "muscle-agent"), arch));
    let fleet = Fleet::start(deployer, &binaries, args.agents_per_arch, &root)?;
    eprint!("{}", fleet.deployer.ok(&["fleet"])?);

    let spec = util::muscle_root().join("examples/hello-service/service.toml");
    let spec = spec.to_str().context("non-UTF-8 path")?;
    for version in ["0.1.0", "0.2.0"] {
        step(&format!(
            "rollout: hello-service {version}, canary wave (one agent per arch), then batches of 2"
        ));
        let id = fleet.start_rollout(&[
            "hello-service",
            version,
            "--service",
            spec,
            "--max-parallel",
            "2",
            "--auto-rollback",
        ])?;
        watch_rollout(&fleet.deployer, id)?;
        let r = fleet.deployer.rollout(Some(id))?;
        ensure!(
            r["status"] == "succeeded",
            "rollout {id} of {version} ended {}: {}",
            r["status"],
            r["message"]
        );
        for agent in &fleet.agents {
            ensure!(
                agent.service_version()? == version,
                "{} does not serve {version}",
                agent.opts.id
            );
        }
    }

    step("rollout: hello-service 0.3.0, whose health check fails: it must halt in the canary wave and roll back (so the watch ends in an error, as it should)");
    let id = fleet.start_rollout(&[
        "hello-service",
        "0.3.0",
        "--service",
        spec,
        "--healthy-deadline",
        "10s",
        "--auto-rollback",
    ])?;
    let _ = watch_rollout(&fleet.deployer, id);
    let r = fleet.deployer.rollout(Some(id))?;
    ensure!(
        r["status"] == "rolled_back",
        "rollout {id} of 0.3.0 ended {}, expected rolled_back: {}",
        r["status"],
        r["message"]
    );
    for agent in &fleet.agents {
        muscle_e2e::wait_until(
            &format!("{} to serve 0.2.0 again", agent.opts.id),
            Duration::from_secs(60),
            || Ok((agent.service_version()? == "0.2.0").then_some(())),
        )?;
    }
    eprintln!("0.3.0 halted in the canary wave and was rolled back; every agent serves 0.2.0");

    step("fleet: each service answers from its own architecture");
    for agent in &fleet.agents {
        let url = format!("http://127.0.0.1:{}/", agent.port);
        let hello = ureq::get(&url).call()?.into_string()?;
        eprintln!("{:<10} GET {url} -> {}", agent.opts.id, hello.trim());
        ensure!(
            hello.contains(&agent.opts.arch),
            "{} runs a service of another architecture: {hello}",
            agent.opts.id
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    print!("{}", fleet.deployer.ok(&["fleet"])?);

    if args.keep {
        print_keep(&fleet);
        // Leave every process running: the handles would kill them on drop.
        std::mem::forget(fleet);
    } else {
        step("stopping the fleet and the deployer");
    }
    eprintln!("\ndemo finished: every step did what it should");
    Ok(0)
}

/// Follows a rollout with `muscle-deploy rollout status --watch` (progress bars on a terminal).
fn watch_rollout(deployer: &Deployer, id: i64) -> Result<()> {
    let status = Command::new(&deployer.bin)
        .arg("--data-dir")
        .arg(&deployer.data_dir)
        .args(["rollout", "status", "--watch", &id.to_string()])
        .status()?;
    ensure!(status.success(), "rollout {id} did not succeed");
    Ok(())
}

fn print_keep(fleet: &Fleet) {
    let d = &fleet.deployer;
    let cli = format!("{} --data-dir {}", d.bin.display(), d.data_dir.display());
    println!("\nThe fleet keeps running. Look at it with:");
    println!("  {cli} fleet");
    println!("  {cli} rollout status");
    println!("  curl {}/v1/fleet", d.url());
    for a in &fleet.agents {
        println!(
            "  curl http://127.0.0.1:{}/   # {} ({}), log {}",
            a.port,
            a.opts.id,
            a.opts.arch,
            a.log_path().display()
        );
    }
    println!(
        "Stop everything with: pkill -f {}; pkill -f 'muscle-deploy --data-dir {}'",
        muscle_e2e::target_dir().join("demo/dist").display(),
        d.data_dir.display()
    );
}
