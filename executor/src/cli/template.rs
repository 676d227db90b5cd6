//! `kiln template build|ls|rm`: the templates of the microVM backends, a
//! guest booted once with a runtime warmed, paused and snapshotted, which
//! sandboxes are restored from instead of booted. `kiln serve` prepares
//! the templates of its pooled runtimes by itself at start-up, and
//! `kiln run` on first use; these commands are for operators who want to
//! build ahead, look, or clean up.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use kiln_protocol::Limits;
use kiln_sandbox::{AnyBackend, Backend, BackendFlags, SandboxSpec, TemplateInfo};

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Build the template of a runtime (boot, warm, pause, snapshot,
    /// publish), unless the current one exists.
    Build(BuildArgs),
    /// List the backend's published templates.
    Ls(LsArgs),
    /// Remove a template (sandboxes restored from it live on).
    Rm(RmArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The runtime to warm in the template (its sandboxes serve its jobs).
    #[arg(long, short = 'r', value_name = "NAME")]
    runtime: String,
    /// Print the template as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: BackendFlags,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print the templates as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: BackendFlags,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The template's id (from `kiln template ls`).
    id: String,
    #[command(flatten)]
    backend: BackendFlags,
}

pub async fn run(cmd: TemplateCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TemplateCommand::Build(a) => build(a).await,
        TemplateCommand::Ls(a) => ls(a),
        TemplateCommand::Rm(a) => rm(a),
    }
}

/// The configured backend, refused with advice when it has no templates.
fn open(flags: &BackendFlags) -> anyhow::Result<(AnyBackend, kiln_protocol::RuntimeTable)> {
    let settings = flags.settings();
    let table = settings.runtime_table()?;
    let backend = settings.open(table.clone())?;
    if !backend.capabilities().templates {
        bail!(
            "the {} backend has no templates{}",
            backend.name(),
            if backend.name() == "jail" {
                ": its sandboxes start warm without snapshots; templates are for --backend qemu or firecracker"
            } else {
                ": they are turned off (snapshot.templates / --snapshot-templates / KILN_SNAPSHOT_TEMPLATES)"
            }
        );
    }
    Ok((backend, table))
}

/// The spec a template for `runtime` is built for: the pool's, sized by
/// the default limits.
pub fn template_spec(runtime: &str) -> SandboxSpec {
    SandboxSpec::for_job(&Limits::default(), runtime)
}

async fn build(a: BuildArgs) -> anyhow::Result<ExitCode> {
    let (backend, table) = open(&a.backend)?;
    let rt = table
        .resolve(&a.runtime)
        .with_context(|| format!("--runtime {}", a.runtime))?;
    let progress = |line: &str| eprintln!("kiln: template: {line}");
    let t = backend
        .prepare_template(&template_spec(&rt.name), &progress)
        .await
        .context("building the template")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        println!("{}", t.id);
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(a: LsArgs) -> anyhow::Result<ExitCode> {
    let (backend, _) = open(&a.backend)?;
    let list = backend.templates()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", table(&list));
    }
    Ok(ExitCode::SUCCESS)
}

fn rm(a: RmArgs) -> anyhow::Result<ExitCode> {
    let (backend, _) = open(&a.backend)?;
    backend
        .remove_template(&a.id)
        .with_context(|| format!("removing template {}", a.id))?;
    Ok(ExitCode::SUCCESS)
}

/// The templates as a text table, newest first.
fn table(list: &[TemplateInfo]) -> String {
    let mut rows: Vec<&TemplateInfo> = list.iter().collect();
    rows.sort_by_key(|t| std::cmp::Reverse(t.created_unix));
    let mut out = Vec::new();
    let _ = writeln!(
        out,
        "{:<48} {:>10} {:>9} {:>5} {:>7}",
        "ID", "CREATED", "MEMORY", "WSET", "CURRENT"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for t in rows {
        let _ = writeln!(
            out,
            "{:<48} {:>10} {:>9} {:>5} {:>7}",
            t.id,
            format!("{} ago", age(now.saturating_sub(t.created_unix))),
            format!("{} MiB", t.memory_bytes >> 20),
            if t.working_set { "yes" } else { "no" },
            if t.current { "yes" } else { "no" },
        );
    }
    String::from_utf8(out).unwrap_or_default()
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_the_newest_first_with_sizes_and_ages() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let t = |id: &str, age: u64, current: bool| TemplateInfo {
            id: id.into(),
            backend: "qemu".into(),
            created_unix: now - age,
            memory_bytes: 192 << 20,
            working_set: false,
            current,
            inputs: Default::default(),
            dir: "/x".into(),
        };
        let text = table(&[t("old", 7200, false), t("new", 30, true)]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID"));
        assert!(
            lines[1].starts_with("new")
                && lines[1].contains("192 MiB")
                && lines[1].ends_with("yes")
        );
        assert!(
            lines[2].starts_with("old") && lines[2].contains("2h ago"),
            "{}",
            lines[2]
        );
    }
}
