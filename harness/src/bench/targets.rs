//! What mm aims at: each figure of the bench against its target. Targets
//! are reported, never a pass/fail of the run. A figure that was not
//! measured (its phase not run, or failed) reads as NaN (`null` in JSON) and
//! is not met.

use serde::Serialize;

/// One figure against its target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub name: String,
    pub value: f64,
    /// `>=` or `<=`.
    pub op: String,
    pub target: f64,
    /// A NaN value (a figure missing) is not met.
    pub met: bool,
    /// How the target is derived when it is not a constant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

impl TargetCheck {
    pub fn at_least(name: &str, value: f64, target: f64) -> Self {
        TargetCheck {
            name: name.into(),
            value,
            op: ">=".into(),
            target,
            met: value >= target,
            rule: None,
        }
    }

    pub fn at_most(name: &str, value: f64, target: f64) -> Self {
        TargetCheck {
            name: name.into(),
            value,
            op: "<=".into(),
            target,
            met: value <= target,
            rule: None,
        }
    }

    fn because(mut self, rule: &str) -> Self {
        self.rule = Some(rule.into());
        self
    }

    /// Whether the figure was there to compare.
    pub fn measured(&self) -> bool {
        !self.value.is_nan() && !self.target.is_nan()
    }
}

pub const TARGET_CLUSTER_VS_ASYNC: f64 = 0.5;
pub const TARGET_CLUSTER_VS_SINGLE: f64 = 0.25;
pub const TARGET_PROXY_READ_RATIO: f64 = 0.9;
pub const TARGET_P99_RATIO: f64 = 3.0;
pub const TARGET_CLUSTER_VS_2PC_LIMIT: f64 = 0.8;
/// Single-row INSERT p50 through mm at most this times one plain server's...
pub const TARGET_INSERT_P50_FACTOR: f64 = 2.0;
/// ...plus this many ms.
pub const TARGET_INSERT_P50_PLUS_MS: f64 = 1.0;
/// COPY rows/s through mm at least this share of one plain server's.
pub const TARGET_COPY_SHARE: f64 = 0.3;

pub const STRETCH_CLUSTER_VS_SINGLE: f64 = 0.3;
pub const STRETCH_CLUSTER_VS_ASYNC: f64 = 0.5;
pub const STRETCH_CLUSTER_VS_2PC_LIMIT: f64 = 1.0;
pub const STRETCH_PROXY_READ_RATIO: f64 = 0.9;

/// The figures the targets read; `None` where not measured.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub cluster_vs_single: Option<f64>,
    pub cluster_vs_async: Option<f64>,
    pub cluster_vs_2pc_limit: Option<f64>,
    pub proxy_read_ratio: Option<f64>,
    pub pgbouncer_read_ratio: Option<f64>,
    pub p99_ratio: Option<f64>,
    pub insert_p50_single_ms: Option<f64>,
    pub insert_p50_cluster_ms: Option<f64>,
    pub bulk_ok: Option<bool>,
    pub copy_rows_per_s_single: Option<f64>,
    pub copy_rows_per_s_cluster: Option<f64>,
}

fn v(x: Option<f64>) -> f64 {
    x.unwrap_or(f64::NAN)
}

/// The targets mm must meet.
pub fn required(f: &Figures) -> Vec<TargetCheck> {
    vec![
        TargetCheck::at_least(
            "cluster_vs_async",
            v(f.cluster_vs_async),
            TARGET_CLUSTER_VS_ASYNC,
        ),
        TargetCheck::at_least(
            "cluster_vs_single",
            v(f.cluster_vs_single),
            TARGET_CLUSTER_VS_SINGLE,
        ),
        TargetCheck::at_least(
            "proxy_read_ratio",
            v(f.proxy_read_ratio),
            TARGET_PROXY_READ_RATIO,
        ),
        TargetCheck::at_most("p99_ratio", v(f.p99_ratio), TARGET_P99_RATIO),
        TargetCheck::at_least(
            "cluster_vs_2pc_limit",
            v(f.cluster_vs_2pc_limit),
            TARGET_CLUSTER_VS_2PC_LIMIT,
        ),
        TargetCheck::at_most(
            "insert_p50_cluster_ms",
            v(f.insert_p50_cluster_ms),
            TARGET_INSERT_P50_FACTOR * v(f.insert_p50_single_ms) + TARGET_INSERT_P50_PLUS_MS,
        )
        .because("2 x insert_p50_ms.single + 1 ms"),
        TargetCheck::at_least(
            "proxy_read_ratio_vs_pgbouncer",
            v(f.proxy_read_ratio),
            v(f.pgbouncer_read_ratio),
        )
        .because("proxy_read_ratio >= pgbouncer_read_ratio"),
        TargetCheck::at_least(
            "bulk_ok",
            f.bulk_ok.map_or(f64::NAN, |ok| if ok { 1.0 } else { 0.0 }),
            1.0,
        )
        .because("1 = every bulk step committed and every node consistent"),
        TargetCheck::at_least(
            "copy_rows_per_s_cluster",
            v(f.copy_rows_per_s_cluster),
            TARGET_COPY_SHARE * v(f.copy_rows_per_s_single),
        )
        .because("0.3 x copy_rows_per_s.single"),
    ]
}

/// What mm aims at beyond the required targets, reported apart.
pub fn stretch(f: &Figures) -> Vec<TargetCheck> {
    vec![
        TargetCheck::at_least(
            "cluster_vs_single",
            v(f.cluster_vs_single),
            STRETCH_CLUSTER_VS_SINGLE,
        ),
        TargetCheck::at_least(
            "cluster_vs_async",
            v(f.cluster_vs_async),
            STRETCH_CLUSTER_VS_ASYNC,
        ),
        TargetCheck::at_least(
            "cluster_vs_2pc_limit",
            v(f.cluster_vs_2pc_limit),
            STRETCH_CLUSTER_VS_2PC_LIMIT,
        ),
        TargetCheck::at_least(
            "proxy_read_ratio",
            v(f.proxy_read_ratio),
            STRETCH_PROXY_READ_RATIO,
        ),
    ]
}

/// One line per target: name, value, target, met / NOT MET / not measured.
pub fn render(checks: &[TargetCheck]) -> String {
    let mut s = String::new();
    for t in checks {
        let verdict = if !t.measured() {
            "not measured"
        } else if t.met {
            "met"
        } else {
            "NOT MET"
        };
        let num = |x: f64| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{x:.3}")
            }
        };
        s.push_str(&format!(
            "{:<30} {:>10}   target {} {:<10} {verdict}{}\n",
            t.name,
            num(t.value),
            t.op,
            num(t.target),
            t.rule
                .as_deref()
                .map(|r| format!("  ({r})"))
                .unwrap_or_default()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(c: &'a [TargetCheck], name: &str) -> &'a TargetCheck {
        c.iter().find(|t| t.name == name).expect(name)
    }

    #[test]
    fn bounds_and_missing_figures() {
        assert!(TargetCheck::at_least("a", 0.8, 0.8).met);
        assert!(!TargetCheck::at_least("a", 0.79, 0.8).met);
        assert!(TargetCheck::at_most("a", 3.0, 3.0).met);
        assert!(!TargetCheck::at_most("a", f64::NAN, 3.0).met);
        assert!(!TargetCheck::at_least("a", f64::NAN, 0.5).met);
        let none = required(&Figures::default());
        assert!(none.iter().all(|t| !t.met && !t.measured()));
        assert!(render(&none).contains("not measured"));
    }

    #[test]
    fn derived_targets() {
        let f = Figures {
            insert_p50_single_ms: Some(2.0),
            insert_p50_cluster_ms: Some(5.0),
            proxy_read_ratio: Some(0.85),
            pgbouncer_read_ratio: Some(0.6),
            bulk_ok: Some(false),
            copy_rows_per_s_single: Some(100_000.0),
            copy_rows_per_s_cluster: Some(30_000.0),
            cluster_vs_2pc_limit: Some(0.9),
            ..Figures::default()
        };
        let r = required(&f);
        let ins = find(&r, "insert_p50_cluster_ms");
        assert_eq!(ins.target, 5.0);
        assert!(ins.met);
        assert!(find(&r, "proxy_read_ratio_vs_pgbouncer").met);
        assert!(!find(&r, "proxy_read_ratio").met);
        let bulk = find(&r, "bulk_ok");
        assert!(bulk.measured() && !bulk.met);
        assert!(find(&r, "copy_rows_per_s_cluster").met);
        assert!(find(&r, "cluster_vs_2pc_limit").met);
        let s = stretch(&f);
        assert!(!find(&s, "cluster_vs_2pc_limit").met);
        assert_eq!(s.len(), 4);
        assert_eq!(r.len(), 9);
    }

    #[test]
    fn json_of_a_missing_figure_is_null() {
        let t = TargetCheck::at_least("x", f64::NAN, 1.0);
        let j = serde_json::to_value(&t).unwrap();
        assert!(j["value"].is_null());
        assert_eq!(j["met"], false);
        assert!(j.get("rule").is_none());
    }
}
