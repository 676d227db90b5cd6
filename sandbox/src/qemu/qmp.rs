//! A minimal QMP (QEMU Machine Protocol) client: JSON objects, one per
//! line, over QEMU's `-qmp unix:...` socket. After the greeting, the client
//! must send `qmp_capabilities` before any other command. Events (objects
//! with an `"event"` key) may arrive between a command and its answer; they
//! are skipped.

use std::io;
use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket: {0}")]
    Io(#[from] io::Error),
    #[error("QMP: QEMU closed the connection")]
    Closed,
    #[error("QMP: malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// QEMU answered the command with an error.
    #[error("QMP command {command} failed: {message}")]
    Command { command: String, message: String },
}

/// A QMP connection in command mode.
pub struct Qmp {
    stream: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let mut qmp = Self {
            stream: BufReader::new(stream),
        };
        let greeting = qmp.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Command {
                command: "greeting".into(),
                message: format!("unexpected greeting {greeting}"),
            });
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(QmpError::Closed);
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(b'\n');
        self.stream.get_mut().write_all(&bytes).await?;
        loop {
            let v = self.read().await?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            let message = v
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .unwrap_or("no description")
                .to_owned();
            return Err(QmpError::Command {
                command: command.into(),
                message,
            });
        }
    }

    /// `query-status`: the VM's run state (`running`, `paused`, ...).
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None).await?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }
}
