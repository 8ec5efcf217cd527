//! Invariant checkers, one file per invariant. Each is fed by the world as
//! things happen (or at the end) and reports [`Violation`]s; each has a unit
//! test proving it can fail.

pub mod answered;
pub mod atomicity;
pub mod bank;
pub mod convergence;
pub mod durability;
pub mod liveness;
pub mod majority;
pub mod prepared_left;
pub mod read_after_commit;

use serde::Serialize;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub checker: &'static str,
    pub message: String,
}

impl Violation {
    pub fn new(checker: &'static str, message: impl Into<String>) -> Violation {
        Violation {
            checker,
            message: message.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.checker, self.message)
    }
}

/// Names of every checker, for reports.
pub const CHECKERS: [&str; 9] = [
    "atomicity",
    "durability",
    "convergence",
    "bank",
    "majority",
    "prepared_left",
    "answered",
    "liveness",
    "read_after_commit",
];
