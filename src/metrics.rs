//! Counters the daemon keeps for `/metrics` (Prometheus text format 0.0.4).
//! Written by hand: a few labelled counters and one histogram need no
//! registry, and the text format is small and stable.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Upper bounds (seconds) of the upload duration histogram.
const DURATION_BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0];

/// Label pairs of one sample.
pub type Labels = Vec<(&'static str, String)>;

/// A value read at scrape time from elsewhere (the store, the watches):
/// a gauge, or a counter kept by its owner.
pub struct Measured {
    /// Family name.
    pub name: &'static str,
    /// `# HELP` text.
    pub help: &'static str,
    /// `counter` or `gauge` (names ending in `_total` are counters).
    pub kind: &'static str,
    /// Label pairs.
    pub labels: Labels,
    /// The value.
    pub value: f64,
}

impl Measured {
    /// A value that goes up and down.
    pub fn gauge(name: &'static str, help: &'static str, labels: Labels, value: f64) -> Self {
        Measured {
            name,
            help,
            kind: "gauge",
            labels,
            value,
        }
    }

    /// A count that only goes up, kept elsewhere.
    pub fn counter(name: &'static str, help: &'static str, labels: Labels, value: u64) -> Self {
        Measured {
            name,
            help,
            kind: "counter",
            labels,
            value: value as f64,
        }
    }
}

#[derive(Default)]
struct Histogram {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Everything counted since start.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, Labels), u64>>,
    durations: Mutex<BTreeMap<String, Histogram>>,
    /// Source bytes read, all jobs (moved by each read as it happens).
    pub source_bytes_read: Arc<AtomicU64>,
    /// Job tasks alive now (the rest of the queue waits as ids).
    pub job_tasks: AtomicU64,
}

impl Metrics {
    /// Add `by` to a labelled counter.
    pub fn add(&self, name: &'static str, labels: Labels, by: u64) {
        if let Ok(mut counters) = self.counters.lock() {
            *counters.entry((name, labels)).or_default() += by;
        }
    }

    /// A finished upload: result counter, and its duration when delivered.
    pub fn upload_finished(&self, provider: &str, result: &str, seconds: Option<f64>) {
        self.add(
            "hotfolder_uploads_total",
            vec![("provider", provider.into()), ("result", result.into())],
            1,
        );
        let Some(seconds) = seconds else { return };
        if let Ok(mut durations) = self.durations.lock() {
            let histogram = durations.entry(provider.to_string()).or_default();
            if histogram.buckets.is_empty() {
                histogram.buckets = vec![0; DURATION_BUCKETS.len()];
            }
            for (slot, bound) in histogram.buckets.iter_mut().zip(DURATION_BUCKETS) {
                if seconds <= *bound {
                    *slot += 1;
                }
            }
            histogram.sum += seconds;
            histogram.count += 1;
        }
    }

    /// Render counters plus what the caller measured just now.
    pub fn render(&self, measured: &[Measured]) -> String {
        let mut out = String::new();
        let mut typed = Vec::new();
        let mut header = |out: &mut String, name: &'static str, kind: &str, help: &str| {
            if !typed.contains(&name) {
                typed.push(name);
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} {kind}");
            }
        };
        // The text format wants each family's samples together.
        let mut grouped: Vec<&Measured> = measured.iter().collect();
        grouped.sort_by_key(|m| m.name);
        for m in grouped {
            header(&mut out, m.name, m.kind, m.help);
            let _ = writeln!(out, "{}{} {}", m.name, label_text(&m.labels), m.value);
        }
        if let Ok(counters) = self.counters.lock() {
            for ((name, labels), value) in counters.iter() {
                header(&mut out, name, "counter", help_of(name));
                let _ = writeln!(out, "{name}{} {value}", label_text(labels));
            }
        }
        let read = "hotfolder_source_bytes_read_total";
        header(&mut out, read, "counter", help_of(read));
        let _ = writeln!(
            out,
            "{read} {}",
            self.source_bytes_read.load(Ordering::Relaxed)
        );
        let name = "hotfolder_upload_duration_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "Time from the first byte to delivery, per provider.",
        );
        if let Ok(durations) = self.durations.lock() {
            for (provider, h) in durations.iter() {
                for (count, bound) in h.buckets.iter().zip(DURATION_BUCKETS) {
                    let labels = vec![("provider", provider.clone()), ("le", bound.to_string())];
                    let _ = writeln!(out, "{name}_bucket{} {count}", label_text(&labels));
                }
                let labels = vec![("provider", provider.clone()), ("le", "+Inf".into())];
                let _ = writeln!(out, "{name}_bucket{} {}", label_text(&labels), h.count);
                let labels = vec![("provider", provider.clone())];
                let _ = writeln!(out, "{name}_sum{} {}", label_text(&labels), h.sum);
                let _ = writeln!(out, "{name}_count{} {}", label_text(&labels), h.count);
            }
        }
        out
    }
}

fn help_of(name: &str) -> &'static str {
    match name {
        "hotfolder_uploads_total" => "Uploads finished, by provider and result.",
        "hotfolder_bytes_uploaded_total" => "Bytes acknowledged by providers.",
        "hotfolder_retries_total" => "Failed attempts that were retried, by provider and reason.",
        "hotfolder_source_bytes_read_total" => "Bytes read from source files (hashing included).",
        _ => "hotfolder counter.",
    }
}

/// `{a="x",b="y"}` with Prometheus escaping; empty without labels.
fn label_text(labels: &[(&'static str, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::default();
        m.add(
            "hotfolder_bytes_uploaded_total",
            vec![("provider", "a\"b".into())],
            10,
        );
        m.upload_finished("p", "delivered", Some(3.0));
        let text = m.render(&[
            Measured::gauge(
                "hotfolder_jobs",
                "Jobs by state.",
                vec![("state", "done".into())],
                2.0,
            ),
            Measured::counter("hotfolder_scans_total", "Scans.", vec![], 3),
        ]);
        assert!(
            text.contains("# TYPE hotfolder_scans_total counter"),
            "{text}"
        );
        assert!(text.contains("hotfolder_jobs{state=\"done\"} 2"), "{text}");
        assert!(
            text.contains("hotfolder_bytes_uploaded_total{provider=\"a\\\"b\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("hotfolder_upload_duration_seconds_bucket{provider=\"p\",le=\"5\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("hotfolder_upload_duration_seconds_bucket{provider=\"p\",le=\"1\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hotfolder_uploads_total counter"),
            "{text}"
        );
    }
}
