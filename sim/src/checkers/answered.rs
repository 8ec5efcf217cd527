//! Every client commit request got an answer (a reply, or a lost
//! connection when its node crashed).

use super::Violation;
use mm_core::{ClientId, NodeId};

pub fn check(outstanding: &[(ClientId, NodeId)]) -> Vec<Violation> {
    outstanding
        .iter()
        .map(|(c, n)| {
            Violation::new(
                "answered",
                format!("client {} never got an answer from n{n}", c.0),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unanswered_request_is_caught() {
        assert!(check(&[]).is_empty());
        assert_eq!(check(&[(ClientId(4), 2)])[0].checker, "answered");
    }
}
