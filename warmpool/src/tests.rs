//! The pool's behaviour, shown with a factory of numbered items whose create
//! delay, create failures, health, recycle delay and recycle failures can be
//! set per test. Time is tokio's paused clock, so waits are exact and
//! instant.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;

use crate::{
    Acquire, Factory, Lease, Pool, PoolError, TemplateKey, TemplateSettings, TemplateStats,
};

/// What the test factory did, for the assertions.
#[derive(Default)]
struct Ledger {
    next_id: AtomicU64,
    create_attempts: AtomicU64,
    created: AtomicU64,
    destroyed: Mutex<Vec<u64>>,
    unhealthy: Mutex<HashSet<u64>>,
    failing: AtomicBool,
    /// Ids handed to `recycle`, in call order.
    recycled: Mutex<Vec<u64>>,
    unrecyclable: Mutex<HashSet<u64>>,
    failing_recycles: AtomicBool,
}

impl Ledger {
    fn created(&self) -> u64 {
        self.created.load(Ordering::SeqCst)
    }

    fn attempts(&self) -> u64 {
        self.create_attempts.load(Ordering::SeqCst)
    }

    fn destroyed(&self) -> Vec<u64> {
        self.destroyed.lock().unwrap().clone()
    }

    fn fail_creates(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn make_unhealthy(&self, id: u64) {
        self.unhealthy.lock().unwrap().insert(id);
    }

    fn recycled(&self) -> Vec<u64> {
        self.recycled.lock().unwrap().clone()
    }

    fn fail_recycles(&self, failing: bool) {
        self.failing_recycles.store(failing, Ordering::SeqCst);
    }

    fn make_unrecyclable(&self, id: u64) {
        self.unrecyclable.lock().unwrap().insert(id);
    }
}

/// Creates items numbered 0, 1, 2, … after `create_delay`; recycles them
/// after `recycle_delay`.
struct Numbered {
    ledger: Arc<Ledger>,
    create_delay: Duration,
    recycle_delay: Duration,
}

#[derive(Debug)]
struct Item {
    id: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("the test factory was told to fail")]
struct Refused;

impl Factory for Numbered {
    type Item = Item;
    type Error = Refused;

    async fn create(&self, _template: &TemplateKey) -> Result<Item, Refused> {
        self.ledger.create_attempts.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.create_delay).await;
        if self.ledger.failing.load(Ordering::SeqCst) {
            return Err(Refused);
        }
        self.ledger.created.fetch_add(1, Ordering::SeqCst);
        Ok(Item {
            id: self.ledger.next_id.fetch_add(1, Ordering::SeqCst),
        })
    }

    async fn check(&self, item: &mut Item) -> bool {
        !self.ledger.unhealthy.lock().unwrap().contains(&item.id)
    }

    async fn recycle(&self, _template: &TemplateKey, item: &mut Item) -> bool {
        self.ledger.recycled.lock().unwrap().push(item.id);
        tokio::time::sleep(self.recycle_delay).await;
        !self.ledger.failing_recycles.load(Ordering::SeqCst)
            && !self.ledger.unrecyclable.lock().unwrap().contains(&item.id)
    }

    async fn destroy(&self, item: Item) {
        tokio::time::sleep(DESTROY_DELAY).await;
        self.ledger.destroyed.lock().unwrap().push(item.id);
    }
}

/// [`Numbered`] without its `recycle`: the trait's default.
struct CannotReset(Numbered);

impl Factory for CannotReset {
    type Item = Item;
    type Error = Refused;

    fn create(&self, template: &TemplateKey) -> impl Future<Output = Result<Item, Refused>> + Send {
        self.0.create(template)
    }

    fn check(&self, item: &mut Item) -> impl Future<Output = bool> + Send {
        self.0.check(item)
    }

    fn destroy(&self, item: Item) -> impl Future<Output = ()> + Send {
        self.0.destroy(item)
    }
}

const CREATE_DELAY: Duration = Duration::from_millis(50);
const RECYCLE_DELAY: Duration = Duration::from_millis(3);
const DESTROY_DELAY: Duration = Duration::from_millis(5);

fn python() -> TemplateKey {
    TemplateKey::new("python")
}

fn settings(min_idle: usize, max_total: usize) -> TemplateSettings {
    TemplateSettings {
        min_idle,
        max_total,
        ..TemplateSettings::default()
    }
}

fn pool_with(settings: TemplateSettings) -> (Pool<Numbered>, Arc<Ledger>) {
    pool_recycling_in(RECYCLE_DELAY, settings)
}

fn pool_recycling_in(
    recycle_delay: Duration,
    settings: TemplateSettings,
) -> (Pool<Numbered>, Arc<Ledger>) {
    let ledger = Arc::new(Ledger::default());
    let pool = Pool::new(Numbered {
        ledger: Arc::clone(&ledger),
        create_delay: CREATE_DELAY,
        recycle_delay,
    });
    pool.set_template(python(), settings).unwrap();
    (pool, ledger)
}

/// Settings under which an item may serve several leases.
fn reusable(min_idle: usize, max_total: usize) -> TemplateSettings {
    TemplateSettings {
        max_uses: 5,
        ..settings(min_idle, max_total)
    }
}

fn stats_of<F: Factory>(pool: &Pool<F>) -> TemplateStats {
    pool.stats(&python()).unwrap()
}

/// Lets background creates and destroys finish (the paused clock jumps).
async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Leases an item and ends the lease with a recycle; returns the item's id.
async fn lease_and_recycle<F: Factory<Item = Item>>(pool: &Pool<F>) -> u64 {
    let lease = pool.lease(&python()).await.unwrap();
    let id = lease.id;
    lease.recycle();
    id
}

/// After shutdown, everything the factory made was destroyed exactly once.
async fn assert_no_leak<F: Factory>(pool: &Pool<F>, ledger: &Ledger) {
    let report = pool.shutdown(Duration::from_secs(10)).await;
    assert!(report.is_clean(), "{report:?}");
    let destroyed = ledger.destroyed();
    let unique: HashSet<_> = destroyed.iter().collect();
    assert_eq!(unique.len(), destroyed.len(), "an item was destroyed twice");
    assert_eq!(ledger.created(), destroyed.len() as u64);
    assert_eq!(pool.stats(&python()).unwrap().live(), 0);
}

#[tokio::test(start_paused = true)]
async fn min_idle_is_reached_in_the_background_and_ready_flips() {
    let (pool, ledger) = pool_with(settings(3, 5));
    assert!(!pool.ready());
    settle().await;
    assert!(pool.ready());
    let stats = pool.stats(&python()).unwrap();
    assert_eq!((stats.idle, stats.creates), (3, 3));
    assert_eq!(ledger.created(), 3);
    assert_no_leak(&pool, &ledger).await;
    assert!(!pool.ready(), "a shut-down pool is not ready");
}

#[tokio::test(start_paused = true)]
async fn ready_with_min_idle_zero_is_immediate_and_latches() {
    let (pool, ledger) = pool_with(settings(1, 2));
    pool.set_template(TemplateKey::new("lazy"), settings(0, 2))
        .unwrap();
    settle().await;
    assert!(pool.ready());
    let _lease = pool.lease(&python()).await.unwrap();
    assert!(
        pool.ready(),
        "readiness must not flap while leases drain idle"
    );
    drop(_lease);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn lease_is_a_warm_hit_when_idle_exists_and_a_cold_miss_otherwise() {
    let (pool, ledger) = pool_with(TemplateSettings {
        replenish_concurrency: 1,
        ..settings(1, 4)
    });
    settle().await;
    let warm = pool.lease(&python()).await.unwrap();
    assert_eq!(warm.acquire(), Acquire::Warm);
    assert_eq!(warm.acquire_duration(), Duration::ZERO);
    // The refill has just started replacing it; nothing is idle yet.
    let cold = pool.lease(&python()).await.unwrap();
    assert_eq!(cold.acquire(), Acquire::Cold);
    assert_eq!(cold.acquire_duration(), CREATE_DELAY);
    assert_ne!(warm.id, cold.id);
    let stats = pool.stats(&python()).unwrap();
    assert_eq!((stats.hits, stats.misses, stats.busy), (1, 1, 2));
    drop((warm, cold));
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn dropping_a_lease_with_remove_on_exit_destroys_its_item() {
    let (pool, ledger) = pool_with(settings(1, 2));
    settle().await;
    let lease = pool.lease(&python()).await.unwrap();
    assert!(lease.remove_on_exit(), "remove_on_exit is the default");
    let id = lease.id;
    drop(lease);
    settle().await;
    assert!(ledger.destroyed().contains(&id));
    assert_eq!(pool.stats(&python()).unwrap().idle, 1, "refilled");
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn release_without_remove_on_exit_returns_the_item_to_idle() {
    let (pool, ledger) = pool_with(TemplateSettings {
        max_uses: 5,
        ..settings(1, 1)
    });
    settle().await;
    let mut lease = pool.lease(&python()).await.unwrap();
    let id = lease.id;
    lease.set_remove_on_exit(false);
    lease.release();
    let again = pool.lease(&python()).await.unwrap();
    assert_eq!(
        (again.id, again.acquire(), again.uses()),
        (id, Acquire::Warm, 2)
    );
    assert!(ledger.destroyed().is_empty());
    again.discard();
    settle().await;
    assert_eq!(ledger.destroyed(), vec![id], "discard destroys regardless");
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn max_uses_retires_an_item() {
    let (pool, ledger) = pool_with(TemplateSettings {
        max_uses: 2,
        ..settings(1, 1)
    });
    settle().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut lease = pool.lease(&python()).await.unwrap();
        ids.push(lease.id);
        lease.set_remove_on_exit(false);
        drop(lease);
        settle().await;
    }
    assert_eq!(ids[0], ids[1], "reused within max_uses");
    assert_ne!(ids[1], ids[2], "retired after max_uses");
    assert_eq!(ledger.destroyed(), vec![ids[0]]);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn max_age_retires_idle_and_returned_items() {
    let max_age = Duration::from_secs(60);
    let (pool, ledger) = pool_with(TemplateSettings {
        max_age,
        max_uses: 10,
        ..settings(1, 2)
    });
    settle().await;
    let first = pool.stats(&python()).unwrap();
    assert_eq!((first.idle, first.creates), (1, 1));

    // An idle item past max_age is replaced without any lease.
    tokio::time::sleep(max_age).await;
    settle().await;
    assert_eq!(ledger.destroyed(), vec![0]);
    let stats = pool.stats(&python()).unwrap();
    assert_eq!((stats.idle, stats.creates), (1, 2));

    // A leased item that outlives max_age is not returned to idle.
    let mut lease = pool.lease(&python()).await.unwrap();
    lease.set_remove_on_exit(false);
    let id = lease.id;
    tokio::time::sleep(max_age).await;
    drop(lease);
    settle().await;
    assert!(ledger.destroyed().contains(&id));
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_health_check_destroys_the_item_and_the_next_one_is_used() {
    let (pool, ledger) = pool_with(settings(2, 3));
    settle().await;
    ledger.make_unhealthy(0);
    let lease = pool.lease(&python()).await.unwrap();
    assert_eq!((lease.id, lease.acquire()), (1, Acquire::Warm));
    settle().await;
    assert_eq!(ledger.destroyed(), vec![0]);
    assert_eq!(pool.stats(&python()).unwrap().check_failures, 1);
    drop(lease);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_gives_up_when_every_idle_item_is_unhealthy() {
    let (pool, ledger) = pool_with(settings(2, 2));
    settle().await;
    ledger.make_unhealthy(0);
    ledger.make_unhealthy(1);
    let error = pool.lease(&python()).await.unwrap_err();
    assert!(
        matches!(error, PoolError::Unhealthy { failed: 2, .. }),
        "{error:?}"
    );
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn max_total_bounds_creation_and_a_waiting_lease_times_out_with_a_clear_error() {
    let (pool, ledger) = pool_with(settings(0, 2));
    let a = pool.lease(&python()).await.unwrap();
    let b = pool.lease(&python()).await.unwrap();
    let error = pool
        .lease_within(&python(), Duration::from_secs(3))
        .await
        .unwrap_err();
    let PoolError::CapacityTimeout {
        waited, max_total, ..
    } = &error
    else {
        panic!("expected a capacity timeout, got {error:?}");
    };
    assert_eq!((*waited, *max_total), (Duration::from_secs(3), 2));
    let message = error.to_string();
    assert!(
        message.contains("`python`") && message.contains("max_total"),
        "{message}"
    );
    assert_eq!(ledger.attempts(), 2, "never more than max_total created");
    drop((a, b));
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn a_waiting_lease_gets_an_item_as_soon_as_one_is_returned() {
    let (pool, ledger) = pool_with(TemplateSettings {
        max_uses: 3,
        ..settings(0, 1)
    });
    let mut held = pool.lease(&python()).await.unwrap();
    held.set_remove_on_exit(false);
    let id = held.id;
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.lease(&python())
                .await
                .map(|lease| (lease.id, lease.acquire_duration()))
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    held.release();
    let (got, waited) = waiter.await.unwrap().unwrap();
    assert_eq!((got, waited), (id, Duration::from_secs(2)));
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn create_failures_are_counted_and_backoff_prevents_a_hot_loop() {
    let ledger = Arc::new(Ledger::default());
    ledger.fail_creates(true);
    let pool = Pool::new(Numbered {
        ledger: Arc::clone(&ledger),
        create_delay: Duration::ZERO,
        recycle_delay: RECYCLE_DELAY,
    });
    pool.set_template(
        python(),
        TemplateSettings {
            failure_backoff: Duration::from_millis(100),
            max_failure_backoff: Duration::from_secs(10),
            ..settings(2, 4)
        },
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    // Backoff 0.1, 0.2, … 6.4 s then 10 s: about 8 + 5 rounds of at most 2
    // creates in a minute. Without backoff it would be unbounded.
    let attempts = ledger.attempts();
    assert!((4..=30).contains(&attempts), "{attempts} creates in 60 s");
    let stats = pool.stats(&python()).unwrap();
    assert_eq!(stats.create_failures, attempts);
    assert!(!pool.ready());

    // A miss still tries on the spot and hands back the factory's error.
    let error = pool.lease(&python()).await.unwrap_err();
    assert!(matches!(error, PoolError::CreateFailed { .. }), "{error:?}");
    let source = std::error::Error::source(&error).unwrap();
    assert_eq!(source.to_string(), "the test factory was told to fail");

    // Once the factory recovers the refill catches up (after at most one
    // max_failure_backoff).
    ledger.fail_creates(false);
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(pool.ready());
    assert_eq!(pool.stats(&python()).unwrap().idle, 2);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_destroys_everything_waits_for_leases_and_refuses_new_ones() {
    let (pool, ledger) = pool_with(settings(2, 4));
    settle().await;
    let lease = pool.lease(&python()).await.unwrap();
    let leased = lease.id;
    let shutdown = tokio::spawn({
        let pool = pool.clone();
        async move { pool.shutdown(Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!shutdown.is_finished(), "shutdown waits for the lease");
    let error = pool.lease(&python()).await.unwrap_err();
    assert!(matches!(error, PoolError::ShuttingDown), "{error:?}");
    assert!(!ledger.destroyed().contains(&leased));
    drop(lease);
    assert!(shutdown.await.unwrap().is_clean());
    assert!(ledger.destroyed().contains(&leased));
    assert_no_leak(&pool, &ledger).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        pool.stats(&python()).unwrap().live(),
        0,
        "no refill after shutdown"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_reports_leases_not_back_within_the_grace() {
    let (pool, ledger) = pool_with(settings(0, 2));
    let lease = pool.lease(&python()).await.unwrap();
    let report = pool.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.outstanding, 1);
    drop(lease);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_cold_lease_leaves_its_new_item_idle() {
    let (pool, ledger) = pool_with(settings(0, 2));
    let cancelled = tokio::time::timeout(CREATE_DELAY / 2, pool.lease(&python())).await;
    assert!(cancelled.is_err());
    settle().await;
    let stats = pool.stats(&python()).unwrap();
    assert_eq!((stats.idle, stats.busy, stats.creating), (1, 0, 0));
    let lease = pool.lease(&python()).await.unwrap();
    assert_eq!((lease.acquire(), lease.uses()), (Acquire::Warm, 1));
    drop(lease);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn no_item_leaks_under_concurrent_leases() {
    let (pool, ledger) = pool_with(TemplateSettings {
        max_uses: 3,
        lease_timeout: Duration::from_secs(60),
        ..settings(2, 4)
    });
    ledger.make_unhealthy(1);
    let workers: Vec<_> = (0..8u64)
        .map(|worker| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for round in 0..10u64 {
                    let mut lease = pool.lease(&python()).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(10 * (worker + round % 3))).await;
                    match (worker + round) % 3 {
                        0 => lease.discard(),
                        1 => {
                            lease.set_remove_on_exit(false);
                            lease.release();
                        }
                        _ => drop(lease),
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let stats = pool.stats(&python()).unwrap();
    assert_eq!(stats.hits + stats.misses, 80);
    assert!(stats.creates <= ledger.attempts());
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn lowering_max_total_trims_idle_items() {
    let (pool, ledger) = pool_with(settings(4, 4));
    settle().await;
    pool.set_template(python(), settings(1, 2)).unwrap();
    settle().await;
    assert_eq!(pool.stats(&python()).unwrap().idle, 2);
    assert_eq!(ledger.destroyed().len(), 2);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn unknown_templates_and_bad_settings_are_refused() {
    let (pool, ledger) = pool_with(settings(0, 1));
    let error = pool.lease(&TemplateKey::new("ruby")).await.unwrap_err();
    assert!(error.to_string().contains("`ruby`"), "{error}");
    assert!(pool.stats(&TemplateKey::new("ruby")).is_none());
    assert!(pool
        .set_template(TemplateKey::new("ruby"), settings(3, 2))
        .is_err());
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn metrics_are_exported_per_template_with_help_text() {
    let (pool, ledger) = pool_with(settings(1, 2));
    let mut registry = Registry::default();
    pool.register(&mut registry);
    settle().await;
    let warm = pool.lease(&python()).await.unwrap();
    let cold = pool.lease(&python()).await.unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "kiln_pool_hits_total{template=\"python\"} 1",
        "kiln_pool_misses_total{template=\"python\"} 1",
        "kiln_pool_creates_total{template=\"python\"} 2",
        "kiln_pool_create_failures_total{template=\"python\"} 0",
        "kiln_pool_destroys_total{template=\"python\"} 0",
        "kiln_pool_busy_sandboxes{template=\"python\"} 2",
        "kiln_pool_idle_sandboxes{template=\"python\"} 0",
        "kiln_pool_create_seconds_count{template=\"python\"} 2",
        "# HELP kiln_pool_create_seconds Time to create",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    drop((warm, cold));
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_wakes_a_waiting_lease_with_an_error() {
    let (pool, ledger) = pool_with(settings(0, 1));
    let held = pool.lease(&python()).await.unwrap();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.lease_within(&python(), Duration::from_secs(60)).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let shutdown = tokio::spawn({
        let pool = pool.clone();
        async move { pool.shutdown(Duration::from_secs(30)).await }
    });
    let error = waiter.await.unwrap().unwrap_err();
    assert!(matches!(error, PoolError::ShuttingDown), "{error:?}");
    drop(held);
    assert!(shutdown.await.unwrap().is_clean());
    assert_no_leak(&pool, &ledger).await;
}

/// A pool on the real clock for the multi-threaded churns below, with
/// `max_uses` and `min_idle`.
fn real_clock_pool(max_uses: u32, min_idle: usize) -> (Pool<Numbered>, Arc<Ledger>) {
    let ledger = Arc::new(Ledger::default());
    let pool = Pool::new(Numbered {
        ledger: Arc::clone(&ledger),
        create_delay: Duration::from_millis(1),
        recycle_delay: Duration::from_millis(1),
    });
    pool.set_template(
        python(),
        TemplateSettings {
            max_uses,
            lease_timeout: Duration::from_secs(10),
            ..settings(min_idle, 3)
        },
    )
    .unwrap();
    (pool, ledger)
}

/// Six workers each lease 20 times and end every lease as `end` says.
async fn churn(pool: &Pool<Numbered>, end: fn(u64, Lease<Numbered>)) {
    let workers: Vec<_> = (0..6u64)
        .map(|worker| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for round in 0..20u64 {
                    let lease = pool.lease(&python()).await.unwrap();
                    tokio::task::yield_now().await;
                    end(worker + round, lease);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
}

/// The same churn on two real worker threads and the real clock: no
/// deadlock, no lost wake-up, no leak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_item_leaks_on_a_multi_threaded_runtime() {
    let (pool, ledger) = real_clock_pool(2, 2);
    churn(&pool, |n, mut lease| lease.set_remove_on_exit(n % 2 == 0)).await;
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn a_recycled_item_goes_back_to_idle_and_serves_the_next_lease_warm() {
    let (pool, ledger) = pool_with(reusable(1, 1));
    settle().await;
    let lease = pool.lease(&python()).await.unwrap();
    let id = lease.id;
    assert!(lease.remove_on_exit(), "recycle ignores remove_on_exit");
    lease.recycle();
    let stats = stats_of(&pool);
    assert_eq!((stats.recycling, stats.busy, stats.live()), (1, 0, 1));
    settle().await;
    let stats = stats_of(&pool);
    assert_eq!((stats.idle, stats.recycling, stats.recycles), (1, 0, 1));
    assert_eq!(ledger.recycled(), vec![id]);

    let again = pool.lease(&python()).await.unwrap();
    assert_eq!(
        (again.id, again.acquire(), again.uses()),
        (id, Acquire::Warm, 2)
    );
    assert!(ledger.destroyed().is_empty());
    assert_eq!(ledger.created(), 1);
    drop(again);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_recycle_destroys_the_item_once_and_the_refill_replaces_it() {
    let (pool, ledger) = pool_with(reusable(1, 1));
    ledger.fail_recycles(true);
    settle().await;
    let id = lease_and_recycle(&pool).await;
    settle().await;
    assert_eq!(ledger.recycled(), vec![id]);
    assert_eq!(ledger.destroyed(), vec![id]);
    let stats = stats_of(&pool);
    assert_eq!((stats.recycles, stats.recycle_failures), (0, 1));
    assert_eq!((stats.idle, stats.creates), (1, 2), "refilled");
    let next = pool.lease(&python()).await.unwrap();
    assert_ne!(next.id, id);
    drop(next);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn an_item_at_max_uses_is_destroyed_without_a_recycle() {
    let (pool, ledger) = pool_with(TemplateSettings {
        max_uses: 2,
        ..settings(1, 1)
    });
    settle().await;
    let id = lease_and_recycle(&pool).await;
    settle().await;
    let second = pool.lease(&python()).await.unwrap();
    assert_eq!((second.id, second.uses()), (id, 2));
    second.recycle();
    settle().await;
    assert_eq!(ledger.recycled(), vec![id], "recycled once, not twice");
    assert_eq!(ledger.destroyed(), vec![id]);
    let stats = stats_of(&pool);
    assert_eq!((stats.recycles, stats.recycle_failures), (1, 0));
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn the_default_max_uses_destroys_a_recycled_item() {
    let (pool, ledger) = pool_with(settings(0, 1));
    let id = lease_and_recycle(&pool).await;
    settle().await;
    assert!(ledger.recycled().is_empty());
    assert_eq!(ledger.destroyed(), vec![id]);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn an_item_past_max_age_is_destroyed_without_a_recycle() {
    let max_age = Duration::from_secs(60);
    let (pool, ledger) = pool_with(TemplateSettings {
        max_age,
        ..reusable(0, 1)
    });
    let lease = pool.lease(&python()).await.unwrap();
    let id = lease.id;
    tokio::time::sleep(max_age).await;
    lease.recycle();
    settle().await;
    assert!(ledger.recycled().is_empty());
    assert_eq!(ledger.destroyed(), vec![id]);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn an_item_that_ages_out_while_recycling_is_destroyed_after_it() {
    let max_age = Duration::from_secs(60);
    let recycle_delay = Duration::from_secs(10);
    let (pool, ledger) = pool_recycling_in(
        recycle_delay,
        TemplateSettings {
            max_age,
            ..reusable(0, 1)
        },
    );
    let lease = pool.lease(&python()).await.unwrap();
    let id = lease.id;
    tokio::time::sleep(max_age - recycle_delay / 2).await;
    lease.recycle();
    settle().await;
    assert!(ledger.destroyed().is_empty(), "still recycling");
    tokio::time::sleep(recycle_delay).await;
    assert_eq!(ledger.recycled(), vec![id]);
    assert_eq!(ledger.destroyed(), vec![id]);
    let stats = stats_of(&pool);
    assert_eq!((stats.idle, stats.recycles), (0, 1));
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn recycling_during_shutdown_destroys_the_item_and_shutdown_waits_for_recycles_in_flight() {
    let recycle_delay = Duration::from_secs(2);
    let (pool, ledger) = pool_recycling_in(recycle_delay, reusable(0, 2));
    let in_flight = pool.lease(&python()).await.unwrap();
    let late = pool.lease(&python()).await.unwrap();
    let (in_flight_id, late_id) = (in_flight.id, late.id);
    in_flight.recycle();
    let shutdown = tokio::spawn({
        let pool = pool.clone();
        async move { pool.shutdown(Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    late.recycle();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ledger.destroyed(), vec![late_id], "destroyed, not recycled");
    assert!(!shutdown.is_finished(), "shutdown waits for the recycle");
    assert_eq!(stats_of(&pool).recycling, 1);
    assert!(shutdown.await.unwrap().is_clean());
    assert_eq!(ledger.recycled(), vec![in_flight_id]);
    assert_eq!(ledger.destroyed(), vec![late_id, in_flight_id]);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn the_refill_counts_recycling_items_towards_min_idle() {
    let recycle_delay = Duration::from_secs(1);
    let (pool, ledger) = pool_recycling_in(recycle_delay, reusable(1, 3));
    settle().await;
    let recycled = pool.lease(&python()).await.unwrap();
    let recycled_id = recycled.id;
    settle().await;
    assert_eq!(ledger.attempts(), 2, "the refill replaced the leased item");
    recycled.recycle();
    // Takes the idle item: nothing is idle now, one item is recycling.
    let other = pool.lease(&python()).await.unwrap();
    assert_eq!(other.acquire(), Acquire::Warm);
    tokio::time::sleep(recycle_delay / 2).await;
    let stats = stats_of(&pool);
    assert_eq!((stats.idle, stats.recycling, stats.creating), (0, 1, 0));
    settle().await;
    assert_eq!(ledger.attempts(), 2, "no create while the item recycled");
    let stats = stats_of(&pool);
    assert_eq!((stats.idle, stats.recycles), (1, 1));
    let back = pool.lease(&python()).await.unwrap();
    assert_eq!(back.id, recycled_id);
    drop((other, back));
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_with_no_idle_item_waits_for_a_recycling_item_instead_of_creating() {
    let recycle_delay = Duration::from_millis(10);
    let (pool, ledger) = pool_recycling_in(recycle_delay, reusable(0, 4));
    let id = lease_and_recycle(&pool).await;
    let next = pool.lease(&python()).await.unwrap();
    assert_eq!(
        (
            next.id,
            next.acquire(),
            next.uses(),
            next.acquire_duration()
        ),
        (id, Acquire::Warm, 2, recycle_delay)
    );
    assert_eq!(ledger.attempts(), 1, "no create");
    let stats = stats_of(&pool);
    assert_eq!((stats.hits, stats.misses), (1, 1));
    drop(next);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn leases_beyond_the_number_of_recycling_items_create_cold() {
    let recycle_delay = Duration::from_millis(10);
    let (pool, ledger) = pool_recycling_in(recycle_delay, reusable(0, 4));
    let id = lease_and_recycle(&pool).await;
    let key = python();
    let (a, b) = tokio::join!(pool.lease(&key), pool.lease(&key));
    let mut leases = [a.unwrap(), b.unwrap()];
    leases.sort_by_key(|lease| lease.id);
    let [waited, created] = leases;
    assert_eq!(
        (waited.id, waited.acquire(), waited.acquire_duration()),
        (id, Acquire::Warm, recycle_delay)
    );
    assert_eq!(
        (created.acquire(), created.acquire_duration()),
        (Acquire::Cold, CREATE_DELAY)
    );
    assert_eq!(
        ledger.attempts(),
        2,
        "one create for the lease that could not wait"
    );
    drop((waited, created));
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_waiting_for_a_recycle_that_fails_goes_on_to_create() {
    let recycle_delay = Duration::from_millis(10);
    let (pool, ledger) = pool_recycling_in(recycle_delay, reusable(0, 1));
    ledger.fail_recycles(true);
    let id = lease_and_recycle(&pool).await;
    let next = pool.lease(&python()).await.unwrap();
    assert_ne!(next.id, id);
    assert_eq!(next.acquire(), Acquire::Cold);
    // The recycle, then the failed item's destroy (max_total is 1), then
    // the create.
    assert_eq!(
        next.acquire_duration(),
        recycle_delay + DESTROY_DELAY + CREATE_DELAY
    );
    assert_eq!(ledger.destroyed(), vec![id]);
    assert_eq!(stats_of(&pool).recycle_failures, 1);
    drop(next);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_lease_waiting_for_a_recycle_gives_its_claim_back() {
    let recycle_delay = Duration::from_secs(1);
    let (pool, ledger) = pool_recycling_in(recycle_delay, reusable(0, 4));
    let id = lease_and_recycle(&pool).await;
    let cancelled = tokio::time::timeout(Duration::from_millis(100), pool.lease(&python())).await;
    assert!(cancelled.is_err());
    // With a leaked claim this lease would find the recycle taken and create.
    let next = pool.lease(&python()).await.unwrap();
    assert_eq!((next.id, next.acquire()), (id, Acquire::Warm));
    assert_eq!(ledger.attempts(), 1);
    drop(next);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_whose_recycle_outlasts_its_timeout_creates_cold() {
    let recycle_delay = Duration::from_secs(10);
    let (pool, ledger) = pool_recycling_in(recycle_delay, reusable(0, 4));
    let id = lease_and_recycle(&pool).await;
    let timeout = Duration::from_secs(1);
    let next = pool.lease_within(&python(), timeout).await.unwrap();
    assert_ne!(next.id, id);
    assert_eq!(
        (next.acquire(), next.acquire_duration()),
        (Acquire::Cold, timeout + CREATE_DELAY)
    );
    tokio::time::sleep(recycle_delay).await;
    assert_eq!(stats_of(&pool).idle, 1, "the slow recycle still comes back");
    drop(next);
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn live_never_exceeds_max_total_while_leases_recycle() {
    const MAX_TOTAL: usize = 3;
    let (pool, ledger) = pool_with(TemplateSettings {
        max_uses: 4,
        lease_timeout: Duration::from_secs(60),
        ..settings(2, MAX_TOTAL)
    });
    for id in (0..200).step_by(3) {
        ledger.make_unrecyclable(id);
    }
    let done = Arc::new(AtomicBool::new(false));
    let monitor = tokio::spawn({
        let pool = pool.clone();
        let done = Arc::clone(&done);
        async move {
            let mut most = 0;
            while !done.load(Ordering::SeqCst) {
                most = most.max(stats_of(&pool).live());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            most
        }
    });
    let workers: Vec<_> = (0..6u64)
        .map(|worker| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for round in 0..10u64 {
                    let mut lease = pool.lease(&python()).await.unwrap();
                    assert!(stats_of(&pool).live() <= MAX_TOTAL);
                    tokio::time::sleep(Duration::from_millis(2 * (worker + round % 3))).await;
                    match (worker + round) % 4 {
                        0 | 1 => lease.recycle(),
                        2 => {
                            lease.set_remove_on_exit(false);
                            lease.release();
                        }
                        _ => drop(lease),
                    }
                    assert!(stats_of(&pool).live() <= MAX_TOTAL);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let most = monitor.await.unwrap();
    assert!(most <= MAX_TOTAL, "{most} items existed at once");
    let stats = stats_of(&pool);
    assert_eq!(stats.hits + stats.misses, 60);
    assert!(
        stats.recycles > 0 && stats.recycle_failures > 0,
        "{stats:?}"
    );
    assert_eq!(
        stats.recycles + stats.recycle_failures,
        ledger.recycled().len() as u64
    );
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn the_default_recycle_destroys_the_item() {
    let ledger = Arc::new(Ledger::default());
    let pool = Pool::new(CannotReset(Numbered {
        ledger: Arc::clone(&ledger),
        create_delay: CREATE_DELAY,
        recycle_delay: RECYCLE_DELAY,
    }));
    pool.set_template(python(), reusable(0, 1)).unwrap();
    let id = lease_and_recycle(&pool).await;
    settle().await;
    assert!(
        ledger.recycled().is_empty(),
        "Numbered::recycle is not used"
    );
    assert_eq!(ledger.destroyed(), vec![id]);
    let stats = stats_of(&pool);
    assert_eq!(
        (stats.recycles, stats.recycle_failures, stats.idle),
        (0, 1, 0)
    );
    assert_no_leak(&pool, &ledger).await;
}

#[tokio::test(start_paused = true)]
async fn recycle_metrics_are_exported_per_template_with_help_text() {
    let recycle_delay = Duration::from_millis(3);
    let (pool, ledger) = pool_recycling_in(recycle_delay, reusable(0, 2));
    let mut registry = Registry::default();
    pool.register(&mut registry);
    let kept = pool.lease(&python()).await.unwrap();
    let broken = pool.lease(&python()).await.unwrap();
    kept.recycle();
    let mut during = String::new();
    prometheus_client::encoding::text::encode(&mut during, &registry).unwrap();
    assert!(
        during.contains("kiln_pool_recycling_sandboxes{template=\"python\"} 1"),
        "{during}"
    );
    settle().await;
    ledger.fail_recycles(true);
    broken.recycle();
    settle().await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "kiln_pool_recycles_total{template=\"python\"} 1",
        "kiln_pool_recycle_failures_total{template=\"python\"} 1",
        "kiln_pool_recycling_sandboxes{template=\"python\"} 0",
        "kiln_pool_recycle_seconds_count{template=\"python\"} 1",
        "kiln_pool_recycle_seconds_bucket{le=\"0.004\",template=\"python\"} 1",
        "# HELP kiln_pool_recycle_seconds Time to reset",
        "# HELP kiln_pool_recycles Sandboxes reset",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert_no_leak(&pool, &ledger).await;
}

/// Recycles on two real worker threads and the real clock: no deadlock, no
/// lost wake-up, no leaked claim or item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_item_leaks_with_recycles_on_a_multi_threaded_runtime() {
    let (pool, ledger) = real_clock_pool(3, 1);
    for id in (0..1000).step_by(4) {
        ledger.make_unrecyclable(id);
    }
    churn(&pool, |n, lease| {
        if n % 3 == 0 {
            drop(lease);
        } else {
            lease.recycle();
        }
    })
    .await;
    assert_no_leak(&pool, &ledger).await;
}
