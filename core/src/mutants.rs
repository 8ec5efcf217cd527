//! Deliberately broken protocol variants. They exist to prove that the
//! simulator's checkers catch the bugs they are meant to catch; they are
//! selectable only with the `mutants` feature, which `mmd` never enables.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mutant {
    /// The coordinator precommits once a majority voted yes instead of every member.
    CommitOnMajorityPrepares,
    /// An acceptor answers `Accepted` before its acceptance is durable.
    AckBeforePersist,
    /// The resolver ignores accepted ballots: abort unless someone already committed.
    ResolverIgnoresBallots,
    /// Quorums are counted over the generation's members, so a minority forms
    /// its own generation and accepts writes.
    MinorityAcceptsWrites,
    /// The joiner asks its donor for one generation too few, skipping the
    /// transactions of the first generation it missed.
    CatchupSkipsTransactions,
    /// The origin answers COMMIT once committed locally, without waiting
    /// for the members' `Committed` (or the read lease) when the client asked
    /// for visibility everywhere.
    ReplyBeforePeerCommits,
    /// A member counts (and announces) its own acceptance of ballot zero
    /// without making it durable.
    CountOwnAckUndurable,
    /// An acceptor writes its acceptance as a lazy record (`Output::Record`,
    /// which later outputs do not wait for) instead of a `Persist`, so its
    /// `Accepted` leaves before the acceptance is durable.
    AcceptanceRecordedLazily,
    /// The coordinator aborts alone when its votes time out (or its
    /// generation changes) after its own yes, as if it alone could still
    /// choose: the members may have heard every yes and accepted ballot zero.
    CoordinatorAbortsAlone,
}

impl Mutant {
    pub const ALL: [Mutant; 9] = [
        Mutant::CommitOnMajorityPrepares,
        Mutant::AckBeforePersist,
        Mutant::ResolverIgnoresBallots,
        Mutant::MinorityAcceptsWrites,
        Mutant::CatchupSkipsTransactions,
        Mutant::ReplyBeforePeerCommits,
        Mutant::CountOwnAckUndurable,
        Mutant::AcceptanceRecordedLazily,
        Mutant::CoordinatorAbortsAlone,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutant::CommitOnMajorityPrepares => "commit_on_majority_prepares",
            Mutant::AckBeforePersist => "ack_before_persist",
            Mutant::ResolverIgnoresBallots => "resolver_ignores_ballots",
            Mutant::MinorityAcceptsWrites => "minority_accepts_writes",
            Mutant::CatchupSkipsTransactions => "catchup_skips_transactions",
            Mutant::ReplyBeforePeerCommits => "reply_before_peer_commits",
            Mutant::CountOwnAckUndurable => "count_own_ack_undurable",
            Mutant::AcceptanceRecordedLazily => "acceptance_recorded_lazily",
            Mutant::CoordinatorAbortsAlone => "coordinator_aborts_alone",
        }
    }
}
