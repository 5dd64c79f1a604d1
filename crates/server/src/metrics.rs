//! Server metrics, exported at `/metrics` in the Prometheus text format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds, in seconds, of the boot time histogram's buckets. QEMU under TCG boots in
/// one to two seconds and Firecracker with KVM in a fraction of one, so the buckets span
/// both.
const BOOT_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0];

/// Every counter the server exports.
#[derive(Default)]
pub struct Metrics {
    /// Requests by matched route pattern, method and status code.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    pub sandboxes_created: AtomicU64,
    pub sandboxes_destroyed: AtomicU64,
    pub sandbox_create_failures: AtomicU64,
    pub execs: AtomicU64,
    pub runs: AtomicU64,
    boot: Histogram,
}

#[derive(Default)]
struct Histogram {
    /// Count per bucket of `BOOT_BUCKETS`, not cumulative.
    buckets: [AtomicU64; BOOT_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Metrics {
    pub fn count_request(&self, route: &str, method: &str, status: u16) {
        let mut requests = self.requests.lock().unwrap();
        *requests
            .entry((route.to_string(), method.to_string(), status))
            .or_default() += 1;
    }

    pub fn observe_boot(&self, boot: Duration) {
        let secs = boot.as_secs_f64();
        if let Some(bucket) = BOOT_BUCKETS.iter().position(|bound| secs <= *bound) {
            self.boot.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.boot.count.fetch_add(1, Ordering::Relaxed);
        self.boot
            .sum_micros
            .fetch_add(boot.as_micros() as u64, Ordering::Relaxed);
    }

    /// Renders every metric; `running` is the number of live sandboxes.
    pub fn render(&self, running: usize) -> String {
        let mut out = String::new();
        out.push_str("# HELP upstream_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE upstream_http_requests_total counter\n");
        for ((route, method, status), count) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "upstream_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {count}",
                escape_label(route)
            );
        }
        counter(
            &mut out,
            "upstream_sandboxes_created_total",
            "Sandboxes booted.",
            &self.sandboxes_created,
        );
        counter(
            &mut out,
            "upstream_sandboxes_destroyed_total",
            "Sandboxes destroyed, for any reason.",
            &self.sandboxes_destroyed,
        );
        counter(
            &mut out,
            "upstream_sandbox_create_failures_total",
            "Sandbox creations that failed after passing validation.",
            &self.sandbox_create_failures,
        );
        counter(
            &mut out,
            "upstream_execs_total",
            "Commands started.",
            &self.execs,
        );
        counter(
            &mut out,
            "upstream_runs_total",
            "Turns submitted.",
            &self.runs,
        );
        out.push_str("# HELP upstream_sandboxes_running Live sandboxes.\n");
        out.push_str("# TYPE upstream_sandboxes_running gauge\n");
        let _ = writeln!(out, "upstream_sandboxes_running {running}");
        self.render_boot(&mut out);
        out
    }

    fn render_boot(&self, out: &mut String) {
        out.push_str(
            "# HELP upstream_sandbox_boot_seconds Time from create request to a ready agent.\n",
        );
        out.push_str("# TYPE upstream_sandbox_boot_seconds histogram\n");
        let mut cumulative = 0;
        for (bound, bucket) in BOOT_BUCKETS.iter().zip(&self.boot.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "upstream_sandbox_boot_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.boot.count.load(Ordering::Relaxed);
        let sum = self.boot.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "upstream_sandbox_boot_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(out, "upstream_sandbox_boot_seconds_sum {sum}");
        let _ = writeln!(out, "upstream_sandbox_boot_seconds_count {count}");
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_histogram_is_cumulative() {
        let metrics = Metrics::default();
        metrics.observe_boot(Duration::from_millis(300));
        metrics.observe_boot(Duration::from_millis(1500));

        let text = metrics.render(0);

        assert!(text.contains("upstream_sandbox_boot_seconds_bucket{le=\"0.25\"} 0\n"));
        assert!(text.contains("upstream_sandbox_boot_seconds_bucket{le=\"0.5\"} 1\n"));
        assert!(text.contains("upstream_sandbox_boot_seconds_bucket{le=\"2\"} 2\n"));
        assert!(text.contains("upstream_sandbox_boot_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("upstream_sandbox_boot_seconds_count 2\n"));
    }

    #[test]
    fn requests_are_labelled_by_route() {
        let metrics = Metrics::default();
        metrics.count_request("/v1/sandboxes/{id}", "GET", 404);
        metrics.count_request("/v1/sandboxes/{id}", "GET", 404);

        let text = metrics.render(3);

        assert!(text.contains(
            "upstream_http_requests_total{route=\"/v1/sandboxes/{id}\",method=\"GET\",status=\"404\"} 2\n"
        ));
        assert!(text.contains("upstream_sandboxes_running 3\n"));
    }
}
