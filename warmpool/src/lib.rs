//! A pool of ready sandboxes per template, generic over the backend that
//! makes them. It knows a factory, not a jail or a microVM: `min_idle`,
//! `max_total`, replenishment, leases that cannot be forgotten, health checks
//! and the events that feed metrics. Not built yet: the daemon issue fills it;
//! `kiln run` creates one sandbox per job and needs no pool.
