//! Liveness: after healing, everything settles within the bound: every node
//! online in one generation, nothing in doubt, coordinating or applying,
//! streams drained, every client answered.

use super::Violation;

/// `pending`: what had not settled when the bound expired.
pub fn check(bound_ms: u64, pending: &[String]) -> Option<Violation> {
    (!pending.is_empty()).then(|| {
        Violation::new(
            "liveness",
            format!(
                "not settled {bound_ms}ms after healing: {}",
                pending.join("; ")
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsettled_cluster_is_caught() {
        assert!(check(30_000, &[]).is_none());
        let v = check(30_000, &["n2 status Catchup".to_string()]).unwrap();
        assert_eq!(v.checker, "liveness");
        assert!(v.message.contains("n2 status Catchup"));
    }
}
