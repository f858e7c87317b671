//! `lightpath`: flag parsing and dispatch. Each subcommand lives in its own
//! module of the library; this file stays thin.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "lightpath",
    version,
    about = "Node-scoped kube-proxy replacement"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
