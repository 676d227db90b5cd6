//! Per-template pool settings and their validation.

use std::time::Duration;

/// How the pool keeps one template's items. Plain fields with a
/// [`Default`]; [`Pool::set_template`](crate::Pool::set_template) rejects
/// combinations that cannot work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateSettings {
    /// Idle items the background refill keeps ready, counting those on their
    /// way to idle (`idle + refilling + recycling`).
    pub min_idle: usize,
    /// Upper bound on items of this template that exist at once: idle, leased,
    /// being created, being recycled and being destroyed.
    pub max_total: usize,
    /// Background creates running at once for this template.
    pub replenish_concurrency: usize,
    /// An item older than this (since it was created; a recycle does not
    /// make it younger) is destroyed instead of being handed out, returned
    /// to idle or recycled.
    pub max_age: Duration,
    /// Leases an item may serve; one that has served them is destroyed when
    /// its lease ends, without a recycle. The default, 1, never hands a
    /// sandbox that ran one job's code to another job. A pool whose leases
    /// end with [`Lease::recycle`](crate::Lease::recycle) may set it higher:
    /// a recycled item carries nothing of its previous lease (the factory
    /// guarantees it, see [`Factory::recycle`](crate::Factory::recycle)). A
    /// lease that is merely returned (`remove_on_exit` off) hands the item
    /// on as it is.
    pub max_uses: u32,
    /// How long [`Pool::lease`](crate::Pool::lease) waits for an item when
    /// `max_total` are already out.
    pub lease_timeout: Duration,
    /// Pause of the background refill after the first create failure; it
    /// doubles with each consecutive failure up to `max_failure_backoff`, and
    /// resets on the next success.
    pub failure_backoff: Duration,
    /// Upper bound of the refill pause after create failures.
    pub max_failure_backoff: Duration,
}

impl Default for TemplateSettings {
    fn default() -> Self {
        Self {
            min_idle: 1,
            max_total: 8,
            replenish_concurrency: 2,
            max_age: Duration::from_secs(3600),
            max_uses: 1,
            lease_timeout: Duration::from_secs(5),
            failure_backoff: Duration::from_millis(100),
            max_failure_backoff: Duration::from_secs(30),
        }
    }
}

impl TemplateSettings {
    pub(crate) fn validate(&self) -> Result<(), SettingsError> {
        if self.max_total == 0 {
            return Err(SettingsError::NoCapacity);
        }
        if self.min_idle > self.max_total {
            return Err(SettingsError::MinIdleAboveMaxTotal {
                min_idle: self.min_idle,
                max_total: self.max_total,
            });
        }
        if self.replenish_concurrency == 0 {
            return Err(SettingsError::NoReplenishment);
        }
        if self.max_uses == 0 {
            return Err(SettingsError::NoUses);
        }
        if self.max_age.is_zero() {
            return Err(SettingsError::NoAge);
        }
        if self.failure_backoff.is_zero() || self.failure_backoff > self.max_failure_backoff {
            return Err(SettingsError::Backoff {
                failure_backoff: self.failure_backoff,
                max_failure_backoff: self.max_failure_backoff,
            });
        }
        Ok(())
    }

    /// The refill pause after `streak` consecutive create failures (`streak >= 1`).
    pub(crate) fn backoff(&self, streak: u32) -> Duration {
        let doublings = streak.saturating_sub(1).min(20);
        self.failure_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_failure_backoff)
    }
}

/// Template settings that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    /// The template could never hold an item.
    #[error("max_total is 0: set it to at least 1")]
    NoCapacity,
    /// The refill could never reach `min_idle`.
    #[error(
        "min_idle ({min_idle}) is above max_total ({max_total}): lower min_idle or raise max_total"
    )]
    MinIdleAboveMaxTotal {
        /// The requested idle floor.
        min_idle: usize,
        /// The requested bound.
        max_total: usize,
    },
    /// The refill could never create anything.
    #[error("replenish_concurrency is 0: set it to at least 1")]
    NoReplenishment,
    /// Every item would be retired before its first use.
    #[error("max_uses is 0: set it to at least 1 (1 = never reuse a sandbox)")]
    NoUses,
    /// Every item would be retired as soon as it was made.
    #[error("max_age is 0: set it to how long an idle sandbox may wait, e.g. 1h")]
    NoAge,
    /// The backoff bounds are empty or inverted.
    #[error("failure_backoff ({failure_backoff:?}) must be above 0 and at most max_failure_backoff ({max_failure_backoff:?})")]
    Backoff {
        /// The requested first pause.
        failure_backoff: Duration,
        /// The requested longest pause.
        max_failure_backoff: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(TemplateSettings::default().validate(), Ok(()));
    }

    #[test]
    fn min_idle_above_max_total_is_rejected_naming_both() {
        let settings = TemplateSettings {
            min_idle: 5,
            max_total: 2,
            ..TemplateSettings::default()
        };
        let error = settings.validate().unwrap_err();
        assert_eq!(
            error,
            SettingsError::MinIdleAboveMaxTotal {
                min_idle: 5,
                max_total: 2
            }
        );
        assert!(error.to_string().contains("min_idle (5)"));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let settings = TemplateSettings {
            failure_backoff: Duration::from_millis(100),
            max_failure_backoff: Duration::from_secs(1),
            ..TemplateSettings::default()
        };
        assert_eq!(settings.backoff(1), Duration::from_millis(100));
        assert_eq!(settings.backoff(2), Duration::from_millis(200));
        assert_eq!(settings.backoff(4), Duration::from_millis(800));
        assert_eq!(settings.backoff(5), Duration::from_secs(1));
        assert_eq!(settings.backoff(u32::MAX), Duration::from_secs(1));
    }
}
