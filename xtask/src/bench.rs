use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Fewer repetitions.
    #[arg(long)]
    pub quick: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: BenchArgs) -> Result<i32> {
    anyhow::bail!("benchmarks are not written yet")
}
