use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Leave the fleet running at the end and print how to look at it.
    #[arg(long)]
    pub keep: bool,
}

pub fn run(_args: DemoArgs) -> Result<i32> {
    anyhow::bail!("the demo is not written yet")
}
