use clap::{Parser, Subcommand};
use plr_engine::cli;

/// plr-engine: train, evaluate and export PLR-OSNet person re-identification models.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Train(Box<cli::train::TrainArgs>),
    Eval(cli::eval::EvalArgs),
    Export(cli::export::ExportArgs),
    Embed(cli::embed::EmbedArgs),
    Synth(cli::synth::SynthArgs),
    Bench(cli::bench::BenchArgs),
}

fn main() {
    plr_engine::keep_freed_memory();
    let result = match Cli::parse().command {
        Command::Train(args) => cli::train::run(&args),
        Command::Eval(args) => cli::eval::run(&args),
        Command::Export(args) => cli::export::run(&args),
        Command::Embed(args) => cli::embed::run(&args),
        Command::Synth(args) => cli::synth::run(&args),
        Command::Bench(args) => cli::bench::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
