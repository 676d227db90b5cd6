//! The live progress line: while a phase runs, one line on stderr,
//! rewritten in place four times a second, with the jobs done and failed,
//! the rate over the last second, p50 and p99 so far and the elapsed time.
//! Only when stderr is a terminal (and not `--quiet`): a log or a pipe
//! gets nothing extra. The line is cleared when the phase ends, so the
//! report starts on a clean line.

use std::collections::VecDeque;
use std::io::{IsTerminal as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::stats::{Recorder, Snapshot};

/// How often the line is rewritten.
const PERIOD: Duration = Duration::from_millis(250);
/// The rate is taken over this window.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// ANSI "erase to end of line", after a carriage return.
const CLEAR: &str = "\r\x1b[K";

/// Whether a progress line should be drawn: stderr is a terminal and the
/// user did not ask for quiet.
pub fn wanted(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// One rendering of the line.
pub fn line(label: &str, s: &Snapshot, rate_per_s: f64, elapsed: Duration) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2} ms"));
    format!(
        "{label}{} done, {} failed | {rate_per_s:.1}/s | p50 {} p99 {} | {:.1} s",
        s.done,
        s.failed,
        ms(s.p50_ms),
        ms(s.p99_ms),
        elapsed.as_secs_f64()
    )
}

/// A running progress line; [`Progress::finish`] stops and clears it.
#[must_use = "a progress line runs until finished"]
pub struct Progress {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Starts drawing the figures of `rec` (labelled, e.g. `"warm-up: "`).
    pub fn start(rec: Arc<Mutex<Recorder>>, label: &'static str) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut recent: VecDeque<(Instant, u64)> = VecDeque::new();
            let mut tick = tokio::time::interval(PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => break,
                }
                let now = Instant::now();
                let snap = rec.lock().expect("recorder lock").snapshot();
                recent.push_back((now, snap.done));
                while recent.len() > 2 && now - recent[1].0 >= RATE_WINDOW {
                    recent.pop_front();
                }
                let rate = match (recent.front(), recent.back()) {
                    (Some(a), Some(b)) if b.0 > a.0 => {
                        (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64()
                    }
                    _ => 0.0,
                };
                let text = line(label, &snap, rate, now - start);
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "{CLEAR}{text}");
                let _ = err.flush();
            }
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "{CLEAR}");
            let _ = err.flush();
        });
        Self { stop, task }
    }

    /// Stops drawing and clears the line.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_counts_rate_percentiles_and_time() {
        let s = Snapshot {
            done: 120,
            failed: 3,
            p50_ms: Some(2.5),
            p99_ms: Some(17.25),
        };
        assert_eq!(
            line("", &s, 41.04, Duration::from_millis(2900)),
            "120 done, 3 failed | 41.0/s | p50 2.50 ms p99 17.25 ms | 2.9 s"
        );
        let empty = Snapshot {
            done: 0,
            failed: 0,
            p50_ms: None,
            p99_ms: None,
        };
        assert!(line("warm-up: ", &empty, 0.0, Duration::ZERO).starts_with("warm-up: 0 done"));
    }
}
