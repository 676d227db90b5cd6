//! The executor's Prometheus metrics (the pool registers its own): jobs by
//! source and outcome, where their time went, admission refusals, load, and
//! HTTP requests. Every family has a help text, and a unit where it
//! measures one.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use kiln_protocol::{Acquire, JobResult};

use crate::scheduler::JobSource;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    source: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImageLabels {
    /// Manifest digest: as many values as stored images.
    image: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcquireLabels {
    acquire: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    source: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TemplateLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: u16,
}

/// Job-time histogram buckets: 1 ms doubling to ~16 min (the longest
/// allowed timeout).
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 21))
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Shared handles to every family; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    jobs: Family<OutcomeLabels, Counter>,
    image_jobs: Family<ImageLabels, Counter>,
    phases: Histograms<PhaseLabels>,
    acquires: Family<AcquireLabels, Counter>,
    rejections: Family<RejectLabels, Counter>,
    queued: Gauge,
    running: Gauge,
    workspaces: Gauge,
    templates_building: Gauge,
    template_builds: Family<TemplateLabels, Counter>,
    template_build_seconds: Histogram,
    http: Family<HttpLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            jobs: Family::default(),
            image_jobs: Family::default(),
            phases: Family::new_with_constructor(seconds_histogram),
            acquires: Family::default(),
            rejections: Family::default(),
            queued: Gauge::default(),
            running: Gauge::default(),
            workspaces: Gauge::default(),
            templates_building: Gauge::default(),
            template_builds: Family::default(),
            template_build_seconds: seconds_histogram(),
            http: Family::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "kiln_jobs",
            "Jobs finished, by intake and outcome",
            self.jobs.clone(),
        );
        r.register(
            "kiln_image_jobs",
            "Jobs finished in an image root, by the image's manifest digest",
            self.image_jobs.clone(),
        );
        r.register_with_unit(
            "kiln_job_phase",
            "Time jobs spent per phase: queued (waiting for a run slot), acquire (getting a sandbox), run, total",
            Unit::Seconds,
            self.phases.clone(),
        );
        r.register(
            "kiln_job_acquires",
            "Sandboxes acquired for jobs, warm (from the pool) or cold (made for the job)",
            self.acquires.clone(),
        );
        r.register(
            "kiln_admission_rejections",
            "Jobs not admitted, by intake and reason (busy, shutting_down, invalid)",
            self.rejections.clone(),
        );
        r.register(
            "kiln_jobs_queued",
            "Admitted jobs waiting for a run slot",
            self.queued.clone(),
        );
        r.register(
            "kiln_jobs_running",
            "Jobs holding a run slot",
            self.running.clone(),
        );
        r.register(
            "kiln_workspaces",
            "Sandboxes alive as workspaces",
            self.workspaces.clone(),
        );
        r.register(
            "kiln_templates_building",
            "Templates of the microVM backend being prepared (built, or found current)",
            self.templates_building.clone(),
        );
        r.register(
            "kiln_template_builds",
            "Template preparations finished, by result (ready, failed)",
            self.template_builds.clone(),
        );
        r.register_with_unit(
            "kiln_template_build",
            "Time a template preparation took (a few milliseconds when the current one exists)",
            Unit::Seconds,
            self.template_build_seconds.clone(),
        );
        r.register(
            "kiln_http_requests",
            "HTTP requests answered, by method, route and status",
            self.http.clone(),
        );
    }

    pub fn finished(&self, source: JobSource, r: &JobResult) {
        self.jobs
            .get_or_create(&OutcomeLabels {
                source: source.as_str(),
                outcome: r.outcome.as_str(),
            })
            .inc();
        if let Some(image) = &r.image {
            self.image_jobs
                .get_or_create(&ImageLabels {
                    image: image.clone(),
                })
                .inc();
        }
        let t = &r.timings;
        for (phase, ms) in [
            ("queued", t.queued_ms),
            ("acquire", t.acquire_ms),
            ("run", t.run_ms),
            ("total", t.total_ms),
        ] {
            self.phases
                .get_or_create(&PhaseLabels { phase })
                .observe(ms / 1000.0);
        }
        if let Some(a) = t.acquire {
            let acquire = match a {
                Acquire::Warm => "warm",
                Acquire::Cold => "cold",
            };
            self.acquires
                .get_or_create(&AcquireLabels { acquire })
                .inc();
        }
    }

    pub fn rejected(&self, source: JobSource, reason: &str) {
        self.rejections
            .get_or_create(&RejectLabels {
                source: source.as_str().into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn set_load(&self, queued: usize, running: usize) {
        self.queued.set(queued as i64);
        self.running.set(running as i64);
    }

    pub fn set_workspaces(&self, n: usize) {
        self.workspaces.set(n as i64);
    }

    /// A template preparation started.
    pub fn template_started(&self) {
        self.templates_building.inc();
    }

    /// A template preparation ended after `seconds`.
    pub fn template_finished(&self, ok: bool, seconds: f64) {
        self.templates_building.dec();
        self.template_builds
            .get_or_create(&TemplateLabels {
                result: if ok { "ready" } else { "failed" },
            })
            .inc();
        self.template_build_seconds.observe(seconds);
    }

    pub fn http(&self, method: &str, route: &str, status: u16) {
        self.http
            .get_or_create(&HttpLabels {
                method: method.into(),
                route: route.into(),
                status,
            })
            .inc();
    }
}
