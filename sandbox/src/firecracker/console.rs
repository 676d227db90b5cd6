//! The guest's serial console as the host sees it. Firecracker connects the
//! guest's COM1 to its own stdin and stdout (no `PUT /serial`), so the host
//! holds both ends of two pipes: lines the guest writes arrive in order on a
//! bounded queue and in the shared microVM console (`crate::vm::Console`:
//! the tail kept for error messages, and the guest kernel's OOM kills), and
//! lines written to the console reach the guest's UART. What the VMM or the
//! jailer writes on stderr is kept in a tail of its own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{ChildStderr, ChildStdin, ChildStdout};
use tokio::sync::mpsc;

/// Lines of the VMM's stderr kept to explain a failure.
const TAIL_LINES: usize = 40;

/// Console lines waiting to be read; beyond this the oldest unread are
/// dropped (and counted), so a chatty guest cannot grow the host's memory.
const QUEUE_LINES: usize = 1024;

/// Longest line kept; the rest of a longer one is cut.
const MAX_LINE: usize = 4096;

/// Why a console exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Writing to the guest's serial input failed (the VMM is gone).
    #[error("cannot write to the guest's serial console: {0}")]
    Write(#[source] std::io::Error),
    /// The console has no input (it was closed).
    #[error("the guest's serial console is closed for input")]
    Closed,
    /// No line came in time.
    #[error("the guest wrote no line on its console within {0:?}")]
    Timeout(Duration),
    /// The console ended (the VMM exited) before a line came.
    #[error("the guest's console ended (its VMM exited)")]
    Ended,
}

#[derive(Default)]
struct Tail(Mutex<VecDeque<String>>);

impl Tail {
    fn push(&self, line: String) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }

    fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// One VM's serial console (and its VMM's stderr).
pub struct Console {
    input: tokio::sync::Mutex<Option<ChildStdin>>,
    lines: tokio::sync::Mutex<mpsc::Receiver<String>>,
    guest: Arc<crate::vm::Console>,
    stderr: Arc<Tail>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Console {
    /// Follows a VMM's pipes on the current tokio runtime. `id` names the
    /// VM in the debug log.
    pub(crate) fn attach(
        id: &str,
        stdin: ChildStdin,
        stdout: ChildStdout,
        stderr: ChildStderr,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_LINES);
        let guest = Arc::new(crate::vm::Console::default());
        let errors = Arc::new(Tail::default());
        let dropped = Arc::new(AtomicU64::new(0));
        {
            let (guest, dropped, id) = (guest.clone(), dropped.clone(), id.to_owned());
            tokio::spawn(async move {
                let mut reader = BufReader::new(stdout);
                while let Some(line) = read_line(&mut reader).await {
                    tracing::debug!(vm = %id, "guest: {line}");
                    guest.push(line.clone());
                    if tx.try_send(line).is_err() {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        {
            let (errors, id) = (errors.clone(), id.to_owned());
            tokio::spawn(async move {
                let mut reader = BufReader::new(stderr);
                while let Some(line) = read_line(&mut reader).await {
                    tracing::debug!(vm = %id, "vmm stderr: {line}");
                    errors.push(line);
                }
            });
        }
        Self {
            input: tokio::sync::Mutex::new(Some(stdin)),
            lines: tokio::sync::Mutex::new(rx),
            guest,
            stderr: errors,
            dropped,
        }
    }

    /// Writes `line` and a newline to the guest's serial input.
    pub async fn send_line(&self, line: &str) -> Result<(), ConsoleError> {
        let mut input = self.input.lock().await;
        let pipe = input.as_mut().ok_or(ConsoleError::Closed)?;
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        pipe.write_all(&bytes).await.map_err(ConsoleError::Write)?;
        pipe.flush().await.map_err(ConsoleError::Write)
    }

    /// The next line the guest writes, waiting at most `within`.
    pub async fn next_line(&self, within: Duration) -> Result<String, ConsoleError> {
        let mut lines = self.lines.lock().await;
        match tokio::time::timeout(within, lines.recv()).await {
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(ConsoleError::Ended),
            Err(_) => Err(ConsoleError::Timeout(within)),
        }
    }

    /// Waits, at most `within` in all, for a line for which `wanted` holds,
    /// skipping the others.
    pub async fn wait_for(
        &self,
        within: Duration,
        mut wanted: impl FnMut(&str) -> bool,
    ) -> Result<String, ConsoleError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_line(left).await {
                Ok(line) if wanted(&line) => return Ok(line),
                Ok(_) => {}
                Err(ConsoleError::Timeout(_)) => return Err(ConsoleError::Timeout(within)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `line` and returns the next line the guest writes.
    pub async fn request(&self, line: &str, within: Duration) -> Result<String, ConsoleError> {
        self.send_line(line).await?;
        self.next_line(within).await
    }

    /// Closes the guest's serial input.
    pub async fn close_input(&self) {
        self.input.lock().await.take();
    }

    /// The last lines the guest wrote.
    pub fn tail(&self) -> Vec<String> {
        self.guest.tail().lines().map(str::to_owned).collect()
    }

    /// The guest's output as every microVM backend keeps it: its tail for
    /// error messages (what the boot steps of `crate::vm::boot` report)
    /// and the guest kernel's OOM kills.
    pub fn guest(&self) -> &crate::vm::Console {
        &self.guest
    }

    /// The last lines the VMM (or the jailer) wrote on stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.stderr.lines()
    }

    /// Console lines dropped because nobody read them.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// One line without its line ending, at most [`MAX_LINE`] bytes of it;
/// `None` at the end of the stream.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Option<String> {
    let mut buf = Vec::new();
    loop {
        let chunk = reader.fill_buf().await.ok()?;
        if chunk.is_empty() {
            return (!buf.is_empty()).then(|| finish(buf));
        }
        if let Some(i) = chunk.iter().position(|&b| b == b'\n') {
            take_up_to(&mut buf, &chunk[..i]);
            reader.consume(i + 1);
            return Some(finish(buf));
        }
        let n = chunk.len();
        take_up_to(&mut buf, chunk);
        reader.consume(n);
    }
}

fn take_up_to(buf: &mut Vec<u8>, bytes: &[u8]) {
    let room = MAX_LINE.saturating_sub(buf.len());
    buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

fn finish(mut buf: Vec<u8>) -> String {
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_cut_at_the_limit_and_lose_their_line_ending() {
        let long = "x".repeat(MAX_LINE + 10);
        let input = format!("one\r\n{long}\ntwo");
        let mut reader = BufReader::new(input.as_bytes());
        assert_eq!(read_line(&mut reader).await.as_deref(), Some("one"));
        assert_eq!(
            read_line(&mut reader).await.map(|l| l.len()),
            Some(MAX_LINE)
        );
        assert_eq!(read_line(&mut reader).await.as_deref(), Some("two"));
        assert_eq!(read_line(&mut reader).await, None);
    }

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let t = Tail::default();
        for i in 0..TAIL_LINES + 5 {
            t.push(i.to_string());
        }
        let lines = t.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "5");
    }
}
