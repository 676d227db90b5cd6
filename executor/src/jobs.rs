//! The record of every admitted job: its phase, the output it produced so
//! far (for SSE subscribers that join late) and, once done, its result.
//! Finished records are kept for a bounded time and count, so `GET
//! /v1/jobs/{id}` works after the fact without memory growing for ever.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_protocol::{JobId, JobResult};
use serde::Serialize;
use tokio::sync::watch;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Admitted, waiting for a run slot.
    Queued,
    /// Has a run slot: acquiring a sandbox or running.
    Running,
    /// Finished; the result is available.
    Done,
}

/// One event of a job's output stream.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The last event: the job's result.
    Exit(Box<JobResult>),
}

struct State {
    phase: Phase,
    events: Vec<OutputEvent>,
    result: Option<JobResult>,
    finished_at: Option<Instant>,
}

/// A job's shared record; the job task writes it, handles read it.
pub struct JobRecord {
    pub id: JobId,
    state: Mutex<State>,
    /// Bumped on every change; readers wait on it.
    version: watch::Sender<u64>,
}

impl JobRecord {
    fn new(id: JobId) -> Self {
        Self {
            id,
            state: Mutex::new(State {
                phase: Phase::Queued,
                events: Vec::new(),
                result: None,
                finished_at: None,
            }),
            version: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    pub fn result(&self) -> Option<JobResult> {
        self.lock().result.clone()
    }

    pub(crate) fn set_running(&self) {
        self.lock().phase = Phase::Running;
        self.bump();
    }

    pub(crate) fn push(&self, event: OutputEvent) {
        self.lock().events.push(event);
        self.bump();
    }

    pub(crate) fn finish(&self, result: JobResult) {
        {
            let mut s = self.lock();
            s.phase = Phase::Done;
            s.events.push(OutputEvent::Exit(Box::new(result.clone())));
            s.result = Some(result);
            s.finished_at = Some(Instant::now());
        }
        self.bump();
    }

    /// Waits for the result.
    pub async fn wait(&self) -> JobResult {
        let mut rx = self.version.subscribe();
        loop {
            if let Some(r) = self.result() {
                return r;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`; it cannot be dropped while we
                // borrow it, but stay total.
                return self
                    .result()
                    .unwrap_or_else(|| JobResult::internal(self.id.clone(), "job record closed"));
            }
        }
    }

    /// The job's output events from the start, then live until `Exit`.
    pub fn events(self: &Arc<Self>) -> EventStream {
        EventStream {
            rx: self.version.subscribe(),
            record: self.clone(),
            next: 0,
        }
    }
}

/// Reads a job's events in order, replaying what already happened.
pub struct EventStream {
    record: Arc<JobRecord>,
    rx: watch::Receiver<u64>,
    next: usize,
}

impl EventStream {
    /// The next event; `None` after `Exit`.
    pub async fn next(&mut self) -> Option<OutputEvent> {
        loop {
            {
                let s = self.record.lock();
                if let Some(e) = s.events.get(self.next) {
                    self.next += 1;
                    return Some(e.clone());
                }
                if s.phase == Phase::Done {
                    return None;
                }
                self.rx.mark_unchanged();
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// Bounds of the store.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Finished jobs kept at most.
    pub max_results: usize,
    /// How long a finished job is kept.
    pub ttl: Duration,
}

/// Every admitted job by id; finished ones expire by [`Retention`].
pub struct JobStore {
    retention: Retention,
    inner: Mutex<StoreInner>,
}

struct StoreInner {
    by_id: HashMap<JobId, Arc<JobRecord>>,
    /// Finished ids, oldest first.
    finished: VecDeque<JobId>,
}

impl JobStore {
    pub fn new(retention: Retention) -> Self {
        Self {
            retention,
            inner: Mutex::new(StoreInner {
                by_id: HashMap::new(),
                finished: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StoreInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a record for `id`; `None` if the id is taken.
    pub fn insert(&self, id: JobId) -> Option<Arc<JobRecord>> {
        let mut s = self.lock();
        self.expire(&mut s);
        if s.by_id.contains_key(&id) {
            return None;
        }
        let rec = Arc::new(JobRecord::new(id.clone()));
        s.by_id.insert(id, rec.clone());
        Some(rec)
    }

    pub fn get(&self, id: &JobId) -> Option<Arc<JobRecord>> {
        let mut s = self.lock();
        self.expire(&mut s);
        s.by_id.get(id).cloned()
    }

    /// Marks `id` finished (it now counts against the retention bounds).
    pub fn finished(&self, id: &JobId) {
        let mut s = self.lock();
        s.finished.push_back(id.clone());
        self.expire(&mut s);
    }

    fn expire(&self, s: &mut StoreInner) {
        let now = Instant::now();
        while let Some(oldest) = s.finished.front() {
            let too_many = s.finished.len() > self.retention.max_results;
            let too_old = s
                .by_id
                .get(oldest)
                .and_then(|r| r.lock().finished_at)
                .is_none_or(|t| now.duration_since(t) > self.retention.ttl);
            if !(too_many || too_old) {
                break;
            }
            if let Some(id) = s.finished.pop_front() {
                s.by_id.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> JobId {
        JobId::parse(s).unwrap()
    }

    #[test]
    fn a_taken_id_is_refused_until_it_expires() {
        let store = JobStore::new(Retention {
            max_results: 1,
            ttl: Duration::from_secs(60),
        });
        let a = store.insert(id("a")).unwrap();
        assert!(store.insert(id("a")).is_none());
        a.finish(JobResult::internal(id("a"), "x"));
        store.finished(&id("a"));
        let b = store.insert(id("b")).unwrap();
        b.finish(JobResult::internal(id("b"), "x"));
        store.finished(&id("b"));
        assert!(
            store.get(&id("a")).is_none(),
            "count bound evicts the oldest"
        );
        assert!(store.get(&id("b")).is_some());
    }

    #[tokio::test]
    async fn a_late_subscriber_sees_every_event_in_order() {
        let store = JobStore::new(Retention {
            max_results: 10,
            ttl: Duration::from_secs(60),
        });
        let rec = store.insert(id("j")).unwrap();
        rec.push(OutputEvent::Stdout(Bytes::from_static(b"a")));
        let mut ev = rec.events();
        let r2 = rec.clone();
        let t = tokio::spawn(async move {
            r2.push(OutputEvent::Stderr(Bytes::from_static(b"b")));
            r2.finish(JobResult::internal(id("j"), "done"));
        });
        assert_eq!(
            ev.next().await,
            Some(OutputEvent::Stdout(Bytes::from_static(b"a")))
        );
        assert_eq!(
            ev.next().await,
            Some(OutputEvent::Stderr(Bytes::from_static(b"b")))
        );
        assert!(matches!(ev.next().await, Some(OutputEvent::Exit(_))));
        assert_eq!(ev.next().await, None);
        t.await.unwrap();
    }
}
