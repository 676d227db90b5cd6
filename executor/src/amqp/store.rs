//! The result store: per job id, whether the job is running here or its
//! result, and whether that result has been confirmed by the broker. It is
//! what makes a redelivered message cheap and safe: the job is not run
//! again, and a result already confirmed is not published twice. Bounded:
//! finished entries expire by count and age; running ones are bounded by the
//! scheduler's capacity. Per node and in memory: see `docs/amqp.md` for what
//! that does and does not cover.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kiln_protocol::{JobId, JobResult};
use tokio::sync::watch;

/// What is known about one job id.
#[derive(Debug, Clone)]
pub enum SlotState {
    /// Admitted here and not finished.
    Running,
    /// Handed back to the queue without running (shutdown).
    Abandoned,
    /// Finished; `confirmed` once the broker confirmed its publication.
    Finished {
        result: Arc<JobResult>,
        confirmed: bool,
    },
}

/// One job id's entry. Deliveries of the same id share it.
#[derive(Debug)]
pub struct Slot {
    state: watch::Sender<SlotState>,
    /// Held while a delivery publishes this id's result, so that two
    /// deliveries of one id never both publish it.
    publishing: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: watch::Sender::new(SlotState::Running),
            publishing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn state(&self) -> SlotState {
        self.state.borrow().clone()
    }

    /// Waits until the job finished; `None` if the entry was abandoned (the
    /// job was handed back to the queue unrun).
    pub async fn finished(&self) -> Option<Arc<JobResult>> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                SlotState::Finished { result, .. } => return Some(result.clone()),
                SlotState::Abandoned => return None,
                SlotState::Running => {}
            }
            rx.changed().await.ok()?;
        }
    }

    /// Takes the right to publish this id's result. Returns `None` when it
    /// is already confirmed (nothing left to publish).
    pub async fn begin_publish(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        let guard = self.publishing.lock().await;
        match &*self.state.borrow() {
            SlotState::Finished {
                confirmed: true, ..
            } => None,
            _ => Some(guard),
        }
    }

    /// Takes the right to publish this id's result, whether or not it was
    /// confirmed before.
    pub async fn publish_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.publishing.lock().await
    }

    /// Records that the broker confirmed the result.
    pub fn confirmed(&self) {
        self.state.send_modify(|s| {
            if let SlotState::Finished { confirmed, .. } = s {
                *confirmed = true;
            }
        });
    }
}

/// How a delivery relates to what is already known about its id.
pub enum Claim {
    /// First time this id is seen (or it expired): run the job, then call
    /// [`ResultStore::finish`] or [`ResultStore::abandon`].
    New(Arc<Slot>),
    /// The id is running here or finished: wait for / reuse its result.
    Known(Arc<Slot>),
}

/// Bounds of the store.
#[derive(Debug, Clone, Copy)]
pub struct StoreBounds {
    pub max_finished: usize,
    pub ttl: Duration,
}

/// Results by job id.
pub struct ResultStore {
    bounds: StoreBounds,
    inner: Mutex<Inner>,
}

struct Inner {
    by_id: HashMap<JobId, Arc<Slot>>,
    /// Finished ids, oldest first, with when they finished.
    finished: VecDeque<(JobId, Instant)>,
}

impl ResultStore {
    pub fn new(bounds: StoreBounds) -> Self {
        Self {
            bounds,
            inner: Mutex::new(Inner {
                by_id: HashMap::new(),
                finished: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn claim(&self, id: &JobId) -> Claim {
        let mut s = self.lock();
        self.expire(&mut s);
        if let Some(slot) = s.by_id.get(id) {
            return Claim::Known(slot.clone());
        }
        let slot = Arc::new(Slot::new());
        s.by_id.insert(id.clone(), slot.clone());
        Claim::New(slot)
    }

    /// Stores the result of a job claimed with [`Claim::New`].
    pub fn finish(&self, id: &JobId, slot: &Slot, result: JobResult) {
        slot.state.send_replace(SlotState::Finished {
            result: Arc::new(result),
            confirmed: false,
        });
        let mut s = self.lock();
        s.finished.push_back((id.clone(), Instant::now()));
        self.expire(&mut s);
    }

    /// Forgets a claimed id whose job did not run (handed back to the
    /// queue); deliveries waiting on it see `None`.
    pub fn abandon(&self, id: &JobId, slot: Arc<Slot>) {
        let mut s = self.lock();
        if s.by_id.get(id).is_some_and(|x| Arc::ptr_eq(x, &slot)) {
            s.by_id.remove(id);
        }
        drop(s);
        slot.state.send_replace(SlotState::Abandoned);
    }

    fn expire(&self, s: &mut Inner) {
        let now = Instant::now();
        while let Some((_, at)) = s.finished.front() {
            let too_many = s.finished.len() > self.bounds.max_finished;
            let too_old = now.duration_since(*at) > self.bounds.ttl;
            if !(too_many || too_old) {
                break;
            }
            if let Some((id, _)) = s.finished.pop_front() {
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

    fn store(max: usize) -> ResultStore {
        ResultStore::new(StoreBounds {
            max_finished: max,
            ttl: Duration::from_secs(60),
        })
    }

    #[tokio::test]
    async fn a_second_delivery_waits_for_the_first_and_publishes_nothing_once_confirmed() {
        let st = store(10);
        let Claim::New(first) = st.claim(&id("a")) else {
            panic!("new id")
        };
        let Claim::Known(second) = st.claim(&id("a")) else {
            panic!("known id")
        };
        let waiter = tokio::spawn(async move {
            let r = second.finished().await.unwrap();
            (r.id.clone(), second.begin_publish().await.is_none())
        });
        st.finish(&id("a"), &first, JobResult::internal(id("a"), "x"));
        {
            let _g = first.begin_publish().await.expect("first publishes");
            first.confirmed();
        }
        let (rid, skipped) = waiter.await.unwrap();
        assert_eq!(rid, id("a"));
        assert!(
            skipped,
            "the result was confirmed once; no second publication"
        );
    }

    #[test]
    fn finished_entries_expire_by_count_running_ones_stay() {
        let st = store(1);
        let Claim::New(a) = st.claim(&id("a")) else {
            panic!()
        };
        let Claim::New(_running) = st.claim(&id("r")) else {
            panic!()
        };
        st.finish(&id("a"), &a, JobResult::internal(id("a"), "x"));
        let Claim::New(b) = st.claim(&id("b")) else {
            panic!()
        };
        st.finish(&id("b"), &b, JobResult::internal(id("b"), "x"));
        assert!(matches!(st.claim(&id("a")), Claim::New(_)), "a expired");
        assert!(matches!(st.claim(&id("r")), Claim::Known(_)));
        assert!(matches!(st.claim(&id("b")), Claim::Known(_)));
    }

    #[test]
    fn an_abandoned_id_can_be_claimed_again() {
        let st = store(10);
        let Claim::New(a) = st.claim(&id("a")) else {
            panic!()
        };
        st.abandon(&id("a"), a);
        assert!(matches!(st.claim(&id("a")), Claim::New(_)));
    }
}
