//! `kiln-loadtest`: see the library's docs and `kiln-loadtest --help`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use kiln_loadtest::{compare_reports, plots, run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln-loadtest: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(main_inner(&cli)) {
        Ok(all_ok) => ExitCode::from(u8::from(!all_ok)),
        Err(e) => {
            eprintln!("kiln-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Returns whether every job ran with outcome ok (a comparison: true).
async fn main_inner(cli: &Cli) -> anyhow::Result<bool> {
    if !cli.compare.is_empty() {
        let text = compare_reports(cli)?;
        if !cli.quiet {
            print!("{text}");
        }
        return Ok(true);
    }
    let report = run(cli).await?;
    if let Some(p) = &cli.json_out {
        let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
        std::fs::write(p, text + "\n").with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(dir) = &cli.plots {
        plots::write_run(&report, dir)?;
    }
    if !cli.quiet {
        print!("{}", report.render());
    }
    let c = &report.counts;
    Ok(c.jobs > 0 && c.ok == c.jobs && c.abandoned == 0)
}
