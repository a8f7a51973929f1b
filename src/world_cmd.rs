//! `proxytune world ...`: the toy world from the command line. `world export` writes world
//! subjects as a DreamBench-layout folder (subjects.tsv, prompts.txt, reference renders), which
//! every DreamBench command (`evaluate real-images`, `evaluate generators`) reads as it reads the
//! real photos.

use std::path::PathBuf;

use proxytune_actors::world::World;

/// World subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum WorldCommand {
    /// Render subjects as a DreamBench-layout folder.
    Export(ExportArgs),
}

/// Arguments of `proxytune world export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// World seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Subjects to export (the world reserves 8, one per class).
    #[arg(long, default_value_t = 8)]
    subjects: usize,
    /// Reference renders per subject (4 to 6).
    #[arg(long, default_value_t = 5)]
    references: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 32)]
    size: u32,
}

/// Runs a world subcommand.
pub fn run(command: WorldCommand) -> anyhow::Result<()> {
    let WorldCommand::Export(args) = command;
    World::new(args.seed, 8).export_dreambench(&args.out, args.subjects, args.references, args.size)?;
    println!("wrote {} world subjects to {}", args.subjects, args.out.display());
    Ok(())
}
