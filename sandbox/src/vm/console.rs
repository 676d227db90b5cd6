//! A guest's serial console as the host sees it: the last lines (to
//! explain a guest that failed) and the guest kernel's OOM kills, counted
//! from its messages. The VMM writes the console to its stdout; the host
//! reads it line by line on a thread of its own ([`Console::follow`]).

use std::collections::VecDeque;
use std::io::{self, BufRead as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::SandboxId;

/// Lines of console output kept to explain a guest that failed.
const TAIL_LINES: usize = 30;

/// The guest kernel's line for each OOM kill, global or memory cgroup
/// (mm/oom_kill.c, `pr_err`, so it reaches the console even with `quiet`),
/// in lower case.
const OOM_KILL_LINE: &str = "out of memory: killed process";

/// What the guest wrote on its console.
#[derive(Debug, Default)]
pub struct Console {
    tail: Mutex<VecDeque<String>>,
    oom_kills: AtomicU64,
}

impl Console {
    /// Takes one line of console output.
    pub fn push(&self, line: String) {
        if line.to_ascii_lowercase().contains(OOM_KILL_LINE) {
            self.oom_kills.fetch_add(1, Ordering::SeqCst);
        }
        let mut t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }

    /// The last lines, oldest first.
    pub fn tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// OOM kills the guest kernel reported so far. The console carries
    /// only the kernel's and the agent's output (jobs cannot open it), so
    /// a job cannot fake one.
    pub fn oom_kills(&self) -> u64 {
        self.oom_kills.load(Ordering::SeqCst)
    }

    /// Reads `from` (a VMM's stdout or stderr) line by line into `console`
    /// and the debug log, on a thread that ends with the stream.
    pub fn follow(console: &Arc<Console>, id: &SandboxId, from: impl io::Read + Send + 'static) {
        let id = id.clone();
        let console = console.clone();
        std::thread::spawn(move || {
            for line in io::BufReader::new(from).lines().map_while(Result::ok) {
                let line = line.trim_end_matches('\r').to_owned();
                tracing::debug!(sandbox = %id, "guest: {line}");
                console.push(line);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_guest_kernels_oom_kills() {
        let c = Console::default();
        c.push("[    3.1] Out of memory: Killed process 231 (python3) total-vm:300000kB".into());
        c.push("some job said Killed process".into());
        c.push("[    3.2] Memory cgroup out of memory: Killed process 240 (node)".into());
        assert_eq!(c.oom_kills(), 2);
    }

    #[test]
    fn keeps_only_the_last_lines() {
        let c = Console::default();
        for i in 0..(TAIL_LINES + 5) {
            c.push(format!("line {i}"));
        }
        let tail = c.tail();
        assert!(!tail.contains("line 4\n") && tail.starts_with("line 5"));
        assert!(tail.ends_with(&format!("line {}", TAIL_LINES + 4)));
    }
}
