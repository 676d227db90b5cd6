//! A program spawned once per job as a target (the bare interpreter
//! baseline, `kiln run`, bwrap...): exit status 0 is outcome `ok`.

use std::process::Stdio;

use anyhow::bail;
use kiln_protocol::Outcome;

use super::Attempt;
use crate::stats::Ending;

/// A program spawned once per job.
pub struct SpawnTarget {
    argv: Vec<String>,
    expect_stdout: Option<String>,
}

impl SpawnTarget {
    pub fn new(argv: Vec<String>, expect_stdout: Option<String>) -> anyhow::Result<Self> {
        if argv.is_empty() {
            bail!("the command to spawn is empty");
        }
        Ok(Self {
            argv,
            expect_stdout,
        })
    }

    pub fn endpoint(&self) -> String {
        self.argv
            .iter()
            .map(|a| {
                if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"()$".contains(c)) {
                    format!("'{}'", a.replace('\'', r"'\''"))
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the program to its exit (killed if the caller gives up).
    pub async fn attempt(&self) -> Attempt {
        let out = tokio::process::Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output()
            .await;
        Attempt::Done(match out {
            Ok(o) => Ending::Ran {
                outcome: if o.status.success() {
                    Outcome::Ok
                } else {
                    Outcome::Error
                },
                timings: None,
                stdout_ok: self
                    .expect_stdout
                    .as_ref()
                    .is_none_or(|e| e.as_bytes() == o.stdout),
            },
            Err(e) => Ending::Failed(format!("spawning {}: {e}", self.argv[0])),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawn_checks_exit_status_and_stdout() {
        let t = SpawnTarget::new(
            vec!["/bin/sh".into(), "-c".into(), "echo 1".into()],
            Some("1\n".into()),
        )
        .unwrap();
        match t.attempt().await {
            Attempt::Done(Ending::Ran {
                outcome: Outcome::Ok,
                stdout_ok: true,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let t =
            SpawnTarget::new(vec!["/bin/sh".into(), "-c".into(), "exit 3".into()], None).unwrap();
        assert!(matches!(
            t.attempt().await,
            Attempt::Done(Ending::Ran {
                outcome: Outcome::Error,
                ..
            })
        ));
        let t = SpawnTarget::new(vec!["/nonexistent/x".into()], None).unwrap();
        assert!(matches!(
            t.attempt().await,
            Attempt::Done(Ending::Failed(_))
        ));
    }
}
