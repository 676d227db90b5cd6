//! A minimal QMP (QEMU Machine Protocol) client: JSON objects, one per
//! line, over QEMU's `-qmp unix:...` socket. After the greeting, the client
//! must send `qmp_capabilities` before any other command. Events (objects
//! with an `"event"` key) may arrive between a command and its answer; they
//! are kept, in order, for [`Qmp::wait_event`].

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

/// Events kept unread at most; older ones are dropped (nobody waits for
/// them: a wait starts by forgetting what came before, see
/// [`Qmp::forget_events`]).
const MAX_KEPT_EVENTS: usize = 64;

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
    /// An awaited event did not come.
    #[error("QMP: no {event} event within {within:?}")]
    NoEvent { event: String, within: Duration },
}

/// A QMP connection in command mode.
pub struct Qmp {
    stream: BufReader<UnixStream>,
    events: VecDeque<Value>,
    /// A line being read; kept across a cancelled read (`read_line`
    /// appends what it got before it was cancelled).
    line: String,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let mut qmp = Self {
            stream: BufReader::new(stream),
            events: VecDeque::new(),
            line: String::new(),
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

    /// The next message. Cancel-safe: a line half read stays in `line`.
    async fn read(&mut self) -> Result<Value, QmpError> {
        if self.stream.read_line(&mut self.line).await? == 0 {
            return Err(QmpError::Closed);
        }
        let line = std::mem::take(&mut self.line);
        Ok(serde_json::from_str(&line)?)
    }

    fn keep_event(&mut self, v: Value) {
        if self.events.len() == MAX_KEPT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(v);
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
                self.keep_event(v);
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

    /// Forgets every event QEMU sent so far (a round trip makes sure all of
    /// them have been read), so that a following [`wait_event`](Self::wait_event)
    /// sees only what happens from now on.
    pub async fn forget_events(&mut self) -> Result<(), QmpError> {
        self.execute("query-status", None).await?;
        self.events.clear();
        Ok(())
    }

    /// Waits until an event `name` whose `data` satisfies `matches` arrives
    /// (or has arrived since the last [`forget_events`](Self::forget_events)),
    /// at most `within`. Earlier events, matching or not, are consumed.
    pub async fn wait_event(
        &mut self,
        name: &str,
        within: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value, QmpError> {
        let is_it = |v: &Value| {
            v.get("event").and_then(Value::as_str) == Some(name)
                && matches(v.get("data").unwrap_or(&Value::Null))
        };
        while let Some(v) = self.events.pop_front() {
            if is_it(&v) {
                return Ok(v);
            }
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match tokio::time::timeout(left, self.read()).await {
                Ok(v) => v?,
                Err(_) => {
                    return Err(QmpError::NoEvent {
                        event: name.into(),
                        within,
                    })
                }
            };
            if is_it(&v) {
                return Ok(v);
            }
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
