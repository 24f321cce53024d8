//! What `/metrics` shows, encoded by the Prometheus project's own client
//! (`prometheus-client`, text format 0.0.4).
//!
//! Every family is declared when the daemon starts, so a scraper sees each
//! one with its HELP and TYPE before it first moves (an alert on
//! `rate(hotfolder_retries_total[5m])` needs the series to exist at 0).
//! Two kinds of family:
//! - counts the daemon keeps itself ([`Metrics`]' own fields), moved as
//!   things happen;
//! - values read from their owner at each scrape ([`Scraped`]: jobs by
//!   state from the store, a watch's counters, the outbox...), listed once
//!   in [`SCRAPED`] and passed to [`Metrics::render`] as [`Measured`].

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the upload duration histogram.
const DURATION_BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0];

/// Label pairs of one sample.
pub type Labels = Vec<(&'static str, String)>;

/// Whether a scraped family only goes up (a counter) or up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; its name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// A family whose values are read from their owner at each scrape.
#[derive(Debug)]
pub struct Scraped {
    /// Family name as scraped (counters end in `_total`).
    pub name: &'static str,
    /// HELP text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
}

macro_rules! scraped {
    ($($id:ident: $kind:ident $name:literal $help:literal;)*) => {
        $(
            #[doc = $help]
            pub const $id: Scraped = Scraped { name: $name, help: $help, kind: Kind::$kind };
        )*
        /// Every family read at scrape time, declared on every scrape
        /// whether or not it has a sample now.
        pub const SCRAPED: &[&Scraped] = &[$(&$id),*];
    };
}

scraped! {
    JOBS: Gauge "hotfolder_jobs" "Jobs by state.";
    QUEUE_DEPTH: Gauge "hotfolder_queue_depth" "Unfinished jobs not uploading right now.";
    UPLOADS_IN_FLIGHT: Gauge "hotfolder_uploads_in_flight" "Uploads moving bytes right now.";
    STORE_UP: Gauge "hotfolder_store_up" "1 while the fleet database answers, 0 while it is away (no sample on a single box).";
    STORE_OUTAGES: Counter "hotfolder_store_outages_total" "Times the fleet database stopped answering.";
    PAUSED: Gauge "hotfolder_paused" "Paused scopes (1 each): everything, a provider or a watch; their uploads wait.";
    WEBHOOKS_WAITING: Gauge "hotfolder_webhooks_waiting" "Webhook events not yet taken by their receiver.";
    WEBHOOKS_FAILING: Gauge "hotfolder_webhooks_failing" "Webhook events whose receiver refused or missed a try (they are tried again).";
    WEBHOOK_DELIVERIES: Counter "hotfolder_webhook_deliveries_total" "Webhook events their receiver took.";
    WEBHOOK_FAILED_TRIES: Counter "hotfolder_webhook_failed_tries_total" "Tries of webhook events that failed (refused, no answer, no connection).";
    BANDWIDTH_LIMIT: Gauge "hotfolder_bandwidth_limit_bytes_per_second" "The bandwidth limit in force, by scope (all uploads, or a provider); 0 while its timetable says off.";
    STORE_DURABLE_WRITES: Counter "hotfolder_store_durable_writes_total" "Job steps written and waited for until on disk.";
    STORE_RECORDS_WRITTEN: Counter "hotfolder_store_records_written_total" "Job records written to the embedded database, durable or not: each is encoded and indexed, so a small file's cost is counted in them.";
    STORE_FLUSHES: Counter "hotfolder_store_flushes_total" "Flushes of the embedded database (durable writes made at once share one).";
    HEAP_IN_USE: Gauge "hotfolder_heap_in_use_bytes" "Bytes of live heap allocations (glibc's count, read at most once a second).";
    HEAP_HELD: Gauge "hotfolder_heap_held_bytes" "Bytes the heap holds from the system, in use or free (glibc's count, read at most once a second).";
    FILES_DETECTED: Counter "hotfolder_files_detected_total" "Files found complete and offered, by watch.";
    FILES_VANISHED: Counter "hotfolder_files_vanished_total" "Files that disappeared before they were complete (not those hotfolder moved), by watch.";
    SCANS: Counter "hotfolder_scans_total" "Full scans of the watch folder, by watch.";
    FILES_SKIPPED: Counter "hotfolder_files_skipped_total" "Files left in place, by watch and reason (each version of a file once).";
}

/// One sample of a [`Scraped`] family, read just now.
pub struct Measured {
    /// Its family.
    pub family: &'static Scraped,
    /// Label pairs.
    pub labels: Labels,
    /// The value; every value shown is a whole number (counts, bytes,
    /// bytes per second, 0 or 1), so it is shown as one.
    pub value: f64,
}

impl Measured {
    /// A sample of `family`.
    pub fn new(family: &'static Scraped, labels: Labels, value: f64) -> Self {
        Measured {
            family,
            labels,
            value,
        }
    }

    /// A sample of a counter `family`, counted by its owner.
    pub fn count(family: &'static Scraped, labels: Labels, value: u64) -> Self {
        Measured::new(family, labels, value as f64)
    }
}

/// The counts the daemon keeps itself, registered at start.
pub struct Metrics {
    registry: Registry,
    uploads: Family<Labels, Counter>,
    bytes_uploaded: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
    /// Source bytes read, all jobs (moved by each read as it happens).
    pub source_bytes_read: Counter,
    /// Job tasks alive now (the rest of the queue waits as ids).
    pub job_tasks: Gauge,
    /// Job tasks that ended in a bug or a store failure.
    pub job_task_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        fn duration_histogram() -> Histogram {
            Histogram::new(DURATION_BUCKETS.iter().copied())
        }
        let metrics = Metrics {
            registry: Registry::default(),
            uploads: Family::default(),
            bytes_uploaded: Family::default(),
            retries: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            source_bytes_read: Counter::default(),
            job_tasks: Gauge::default(),
            job_task_failures: Counter::default(),
        };
        let mut registry = Registry::default();
        register(
            &mut registry,
            "hotfolder_uploads_total",
            "Uploads finished, by provider and result.",
            metrics.uploads.clone(),
        );
        register(
            &mut registry,
            "hotfolder_bytes_uploaded_total",
            "Bytes acknowledged by providers, by provider.",
            metrics.bytes_uploaded.clone(),
        );
        register(
            &mut registry,
            "hotfolder_retries_total",
            "Failed attempts that were retried, by provider and reason.",
            metrics.retries.clone(),
        );
        register(
            &mut registry,
            "hotfolder_source_bytes_read_total",
            "Bytes read from source files (hashing included).",
            metrics.source_bytes_read.clone(),
        );
        register(
            &mut registry,
            "hotfolder_upload_duration_seconds",
            "Time from the first byte to delivery, per provider.",
            metrics.durations.clone(),
        );
        register(
            &mut registry,
            "hotfolder_job_tasks",
            "Job tasks alive now; other queued jobs wait without one.",
            metrics.job_tasks.clone(),
        );
        register(
            &mut registry,
            "hotfolder_job_task_failures_total",
            "Job tasks that ended in a bug or a store failure (recorded on the job, which is tried again).",
            metrics.job_task_failures.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

/// Register under the name a scraper sees: the client adds `_total` to a
/// counter's name and a full stop to its help, so both are taken off here.
fn register(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: impl EncodeMetric + Send + Sync + std::fmt::Debug + 'static,
) {
    let name = name.strip_suffix("_total").unwrap_or(name);
    let help = help.strip_suffix('.').unwrap_or(help);
    registry.register(name, help, Declared(metric));
}

/// A family shown with its HELP and TYPE before its first sample: the
/// client leaves out a family with no samples, and a scraper could not
/// tell a count that has not moved from one that does not exist.
#[derive(Debug)]
struct Declared<M>(M);

impl<M: EncodeMetric> EncodeMetric for Declared<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

impl Metrics {
    /// A finished upload: result counter, and its duration when delivered.
    pub fn upload_finished(&self, provider: &str, result: &str, seconds: Option<f64>) {
        self.uploads
            .get_or_create(&vec![
                ("provider", provider.into()),
                ("result", result.into()),
            ])
            .inc();
        if let Some(seconds) = seconds {
            self.durations
                .get_or_create(&vec![("provider", provider.into())])
                .observe(seconds);
        }
    }

    /// `bytes` more were acknowledged by `provider`.
    pub fn bytes_uploaded(&self, provider: &str, bytes: u64) {
        self.bytes_uploaded
            .get_or_create(&vec![("provider", provider.into())])
            .inc_by(bytes);
    }

    /// A failed attempt of `provider` will be retried.
    pub fn retried(&self, provider: &str, reason: String) {
        self.retries
            .get_or_create(&vec![("provider", provider.into()), ("reason", reason)])
            .inc();
    }

    /// The daemon's own counts, then every [`SCRAPED`] family with the
    /// samples `measured` has for it.
    pub fn render(&self, measured: &[Measured]) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        let _ = prometheus_text::encode(&mut out, &scraped_registry(measured));
        out
    }
}

/// A registry made for one scrape: every scraped family, with this
/// scrape's samples (a counter starts at 0 and is moved to its value).
fn scraped_registry(measured: &[Measured]) -> Registry {
    let mut registry = Registry::default();
    let mut families: Vec<&'static Scraped> = SCRAPED.to_vec();
    for m in measured {
        if !families.iter().any(|f| f.name == m.family.name) {
            families.push(m.family);
        }
    }
    for family in families {
        let samples = measured.iter().filter(|m| m.family.name == family.name);
        match family.kind {
            Kind::Counter => {
                let counters = Family::<Labels, Counter>::default();
                for m in samples {
                    counters.get_or_create(&m.labels).inc_by(m.value as u64);
                }
                register(&mut registry, family.name, family.help, counters);
            }
            Kind::Gauge => {
                let gauges = Family::<Labels, Gauge>::default();
                for m in samples {
                    gauges.get_or_create(&m.labels).set(m.value.round() as i64);
                }
                register(&mut registry, family.name, family.help, gauges);
            }
        }
    }
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::default();
        m.bytes_uploaded("a\"b", 10);
        m.upload_finished("p", "delivered", Some(3.0));
        let text = m.render(&[
            Measured::new(&JOBS, vec![("state", "done".into())], 2.0),
            Measured::new(&SCANS, vec![("watch", "w".into())], 3.0),
        ]);
        for line in [
            "# TYPE hotfolder_scans_total counter",
            "# HELP hotfolder_scans_total Full scans of the watch folder, by watch.",
            "hotfolder_scans_total{watch=\"w\"} 3",
            "hotfolder_jobs{state=\"done\"} 2",
            "hotfolder_bytes_uploaded_total{provider=\"a\\\"b\"} 10",
            "hotfolder_upload_duration_seconds_bucket{provider=\"p\",le=\"5\"} 1",
            "hotfolder_upload_duration_seconds_bucket{provider=\"p\",le=\"1\"} 0",
            "# TYPE hotfolder_uploads_total counter",
            "# TYPE hotfolder_retries_total counter",
            "# TYPE hotfolder_store_outages_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}:\n{text}");
        }
    }
}
