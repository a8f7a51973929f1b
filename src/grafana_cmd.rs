//! `proxytune grafana render`: writes the dashboards defined as code in
//! `grafana/src/dashboards.rs` to `grafana/dashboards/*.json`; with `--check`, fails when the
//! committed files differ from what the source renders (so they are never edited by hand).

use std::path::PathBuf;

use anyhow::Context;

#[path = "../grafana/src/dashboards.rs"]
pub mod dashboards;

/// Grafana subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum GrafanaCommand {
    /// Render the dashboards to JSON.
    Render(RenderArgs),
}

/// Arguments of `proxytune grafana render`.
#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// Folder of the generated dashboards.
    #[arg(long, default_value = "grafana/dashboards")]
    out: PathBuf,
    /// Only compare: exit non-zero when a file is missing or differs.
    #[arg(long)]
    check: bool,
}

/// Runs a grafana subcommand.
pub fn run(command: GrafanaCommand) -> anyhow::Result<()> {
    let GrafanaCommand::Render(args) = command;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    for (name, dashboard) in dashboards::all() {
        let path = args.out.join(name);
        let text = serde_json::to_string_pretty(&dashboard)? + "\n";
        if args.check {
            let stored = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::ensure!(
                stored == text,
                "{} differs from grafana/src/dashboards.rs: run `proxytune grafana render`",
                path.display()
            );
        } else {
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            println!("{}", path.display());
        }
    }
    Ok(())
}
