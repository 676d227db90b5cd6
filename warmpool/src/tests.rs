//! The pool's behaviour, shown with a factory of numbered items whose create
//! delay, create failures and health can be set per test. Time is tokio's
//! paused clock, so waits are exact and instant.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;

use crate::{Acquire, Factory, Pool, PoolError, TemplateKey, TemplateSettings};

/// What the test factory did, for the assertions.
#[derive(Default)]
struct Ledger {
    next_id: AtomicU64,
    create_attempts: AtomicU64,
    created: AtomicU64,
    destroyed: Mutex<Vec<u64>>,
    unhealthy: Mutex<HashSet<u64>>,
    failing: AtomicBool,
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
}

/// Creates items numbered 0, 1, 2, … after `create_delay`.
struct Numbered {
    ledger: Arc<Ledger>,
    create_delay: Duration,
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

    async fn destroy(&self, item: Item) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.ledger.destroyed.lock().unwrap().push(item.id);
    }
}

const CREATE_DELAY: Duration = Duration::from_millis(50);

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
    let ledger = Arc::new(Ledger::default());
    let pool = Pool::new(Numbered {
        ledger: Arc::clone(&ledger),
        create_delay: CREATE_DELAY,
    });
    pool.set_template(python(), settings).unwrap();
    (pool, ledger)
}

/// Lets background creates and destroys finish (the paused clock jumps).
async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// After shutdown, everything the factory made was destroyed exactly once.
async fn assert_no_leak(pool: &Pool<Numbered>, ledger: &Ledger) {
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

/// The same churn on two real worker threads and the real clock: no
/// deadlock, no lost wake-up, no leak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_item_leaks_on_a_multi_threaded_runtime() {
    let ledger = Arc::new(Ledger::default());
    let pool = Pool::new(Numbered {
        ledger: Arc::clone(&ledger),
        create_delay: Duration::from_millis(1),
    });
    pool.set_template(
        python(),
        TemplateSettings {
            max_uses: 2,
            lease_timeout: Duration::from_secs(10),
            ..settings(2, 3)
        },
    )
    .unwrap();
    let workers: Vec<_> = (0..6u64)
        .map(|worker| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for round in 0..20u64 {
                    let mut lease = pool.lease(&python()).await.unwrap();
                    tokio::task::yield_now().await;
                    lease.set_remove_on_exit((worker + round) % 2 == 0);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    assert_no_leak(&pool, &ledger).await;
}
