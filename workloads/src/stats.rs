//! Per-workload figures, the same for every checked workload.
//!
//! Why: the demo's verdict has to tell a protocol bug from an expected effect
//! of an injected fault. So every outcome of a client operation lands in
//! exactly one bucket — committed, aborted by the cluster (SQLSTATE 40001 or
//! 40P01: a conflict the client may retry), uncertain (the connection went
//! away while a commit was in flight: it may or may not have happened),
//! connection lost (the connection went away before anything could commit),
//! or a real error (kept with its message, the first few) — and the latency
//! of each commit goes into an HDR histogram for p50/p99.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

/// How many error messages a [`Stats`] keeps.
pub const ERROR_SAMPLES: usize = 5;

/// What one workload (or one client of it) saw.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Operations that committed and were acknowledged to the client.
    pub committed: u64,
    /// Operations the database aborted with 40001 (serialization failure) or
    /// 40P01 (deadlock): not committed, retried with new values.
    pub aborts: u64,
    /// Commits whose outcome is unknown: the connection broke (or the
    /// operation timed out) after the commit was sent.
    pub uncertain: u64,
    /// Operations that failed because the connection was lost (or could not
    /// be made) before any commit was sent: certainly not committed.
    pub conn_lost: u64,
    /// Every other failure.
    pub errors: u64,
    /// The first [`ERROR_SAMPLES`] messages of `errors`.
    pub error_samples: Vec<String>,
    /// Latency of committed operations.
    pub latency: Latency,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            committed: 0,
            aborts: 0,
            uncertain: 0,
            conn_lost: 0,
            errors: 0,
            error_samples: Vec::new(),
            latency: Latency::new(),
        }
    }

    pub fn record_commit(&mut self, latency: Duration) {
        self.committed += 1;
        self.latency.record(latency);
    }

    pub fn record_abort(&mut self) {
        self.aborts += 1;
    }

    pub fn record_uncertain(&mut self) {
        self.uncertain += 1;
    }

    pub fn record_conn_lost(&mut self) {
        self.conn_lost += 1;
    }

    pub fn record_error(&mut self, message: impl Into<String>) {
        self.errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES {
            self.error_samples.push(message.into());
        }
    }

    /// Adds `other` into `self` (error samples: ours first, up to the cap).
    pub fn merge(&mut self, other: &Stats) {
        self.committed += other.committed;
        self.aborts += other.aborts;
        self.uncertain += other.uncertain;
        self.conn_lost += other.conn_lost;
        self.errors += other.errors;
        for m in &other.error_samples {
            if self.error_samples.len() >= ERROR_SAMPLES {
                break;
            }
            self.error_samples.push(m.clone());
        }
        self.latency.merge(&other.latency);
    }

    /// Sums a list of stats.
    pub fn merged<'a>(all: impl IntoIterator<Item = &'a Stats>) -> Stats {
        let mut s = Stats::new();
        for o in all {
            s.merge(o);
        }
        s
    }

    /// One line: "committed 1234, aborts 5, uncertain 0, conn lost 0, errors 0, p50 1.20 ms, p99 8.00 ms".
    pub fn summary(&self) -> String {
        let mut s = format!(
            "committed {}, aborts {}, uncertain {}, conn lost {}, errors {}, p50 {:.2} ms, p99 {:.2} ms",
            self.committed,
            self.aborts,
            self.uncertain,
            self.conn_lost,
            self.errors,
            self.latency.p50_ms(),
            self.latency.p99_ms()
        );
        if !self.error_samples.is_empty() {
            s.push_str(&format!(
                " (first errors: {})",
                self.error_samples.join(" | ")
            ));
        }
        s
    }
}

/// Commit latencies in microseconds, 3 significant digits, up to an hour
/// (longer ones are clamped). Serializes as its summary, not its buckets.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    const MAX_US: u64 = 3_600_000_000;

    pub fn new() -> Latency {
        Latency(Histogram::new_with_bounds(1, Self::MAX_US, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(us.min(Self::MAX_US));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so this cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile (0.0..=1.0) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn p50_ms(&self) -> f64 {
        self.quantile_ms(0.50)
    }

    pub fn p99_ms(&self) -> f64 {
        self.quantile_ms(0.99)
    }

    pub fn max_ms(&self) -> f64 {
        if self.0.is_empty() {
            0.0
        } else {
            self.0.max() as f64 / 1000.0
        }
    }
}

impl Serialize for Latency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Latency", 4)?;
        st.serialize_field("count", &self.count())?;
        st.serialize_field("p50_ms", &self.p50_ms())?;
        st.serialize_field("p99_ms", &self.p99_ms())?;
        st.serialize_field("max_ms", &self.max_ms())?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_merges_and_serializes() {
        let mut a = Stats::new();
        for ms in 1..=100 {
            a.record_commit(Duration::from_millis(ms));
        }
        a.record_abort();
        let mut b = Stats::new();
        for i in 0..7 {
            b.record_error(format!("e{i}"));
        }
        b.record_uncertain();
        b.record_conn_lost();
        b.record_commit(Duration::from_secs(2));
        assert_eq!(b.errors, 7);
        assert_eq!(b.error_samples.len(), ERROR_SAMPLES);

        a.merge(&b);
        assert_eq!(a.committed, 101);
        assert_eq!(a.aborts, 1);
        assert_eq!(a.uncertain, 1);
        assert_eq!(a.conn_lost, 1);
        assert_eq!(a.errors, 7);
        assert_eq!(a.error_samples, vec!["e0", "e1", "e2", "e3", "e4"]);
        let p50 = a.latency.p50_ms();
        assert!((49.0..=52.0).contains(&p50), "p50 {p50}");
        let p99 = a.latency.p99_ms();
        assert!((99.0..=101.0).contains(&p99), "p99 {p99}");
        assert!((1999.0..=2002.0).contains(&a.latency.max_ms()));

        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["committed"], 101);
        assert_eq!(json["latency"]["count"], 101);
        assert!(json["latency"]["p99_ms"].as_f64().unwrap() > 90.0);
        assert!(a.summary().contains("first errors: e0 | e1"));
    }

    #[test]
    fn empty_latency_is_zero() {
        let s = Stats::new();
        assert_eq!(s.latency.p50_ms(), 0.0);
        assert_eq!(s.latency.max_ms(), 0.0);
    }
}
