//! `lightpath`: flag parsing and dispatch. Each subcommand lives in its own
//! module of the library; this file stays thin.

use clap::{Parser, Subcommand};

/// mimalloc: per-request allocations of the L7 path are cheaper than with
/// glibc malloc (see BENCHMARKS.md, "L7 per-request cost").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
enum Command {
    /// Serve this node's Services: TPROXY rules in, L4 relay out.
    Run(lightpath::run::RunArgs),
    /// Remove lightpath's nftables table and policy routing.
    Cleanup,
    /// Print what this node does with every Service frontend, resolved from
    /// manifest files (endpoint sets, policy, verdict).
    Table(lightpath::table_cmd::TableArgs),
    /// Build a sandbox of network namespaces, send real traffic through
    /// lightpath, print what happened, tear it down (needs root).
    Demo,
    /// A tiny test backend (TCP echo + HTTP name) for the demo and tests.
    Backend(lightpath::backend::BackendArgs),
    /// Mutating admission webhook (hybrid install): labels new Services that
    /// lightpath can carry entirely.
    Webhook(lightpath::webhook::WebhookArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => lightpath::run::main(args)?,
        Command::Cleanup => lightpath::cleanup::main()?,
        Command::Table(args) => lightpath::table_cmd::main(args)?,
        Command::Demo => {
            if let Err(e) = lightpath::demo::main() {
                eprintln!("lightpath demo: {e}");
                std::process::exit(1);
            }
        }
        Command::Backend(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(lightpath::backend::run(args))?,
        Command::Webhook(args) => lightpath::webhook::main(args)?,
    }
    Ok(())
}
