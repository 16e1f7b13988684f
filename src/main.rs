use clap::Parser;

/// plr-engine: train, evaluate and export PLR-OSNet person re-identification models.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
