//! Which protocol paths a seed reached, from core events and from
//! inspecting a node at the moment it crashes. A sweep reports the fraction
//! of seeds reaching each path; a path nobody reaches is untested.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Path {
    GenerationChange,
    ResolverCommitAlreadyDecided,
    ResolverCommitHighestAccepted,
    ResolverAbortNothingAccepted,
    ResolverAbortAlreadyDecided,
    CoordinatorCrashPreparing,
    CoordinatorCrashCollectingVotes,
    CoordinatorCrashPrecommitted,
    CoordinatorCrashCommitting,
    ParticipantCrashApplying,
    ParticipantCrashPrepared,
    ParticipantCrashPrecommitted,
    CatchupCompleted,
    VotesLost,
    VoteNo,
    GenerationChangeAbort,
}

impl Path {
    pub const ALL: [Path; 16] = [
        Path::GenerationChange,
        Path::ResolverCommitAlreadyDecided,
        Path::ResolverCommitHighestAccepted,
        Path::ResolverAbortNothingAccepted,
        Path::ResolverAbortAlreadyDecided,
        Path::CoordinatorCrashPreparing,
        Path::CoordinatorCrashCollectingVotes,
        Path::CoordinatorCrashPrecommitted,
        Path::CoordinatorCrashCommitting,
        Path::ParticipantCrashApplying,
        Path::ParticipantCrashPrepared,
        Path::ParticipantCrashPrecommitted,
        Path::CatchupCompleted,
        Path::VotesLost,
        Path::VoteNo,
        Path::GenerationChangeAbort,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path::GenerationChange => "generation_change",
            Path::ResolverCommitAlreadyDecided => "resolver_commit_already_decided",
            Path::ResolverCommitHighestAccepted => "resolver_commit_highest_accepted",
            Path::ResolverAbortNothingAccepted => "resolver_abort_nothing_accepted",
            Path::ResolverAbortAlreadyDecided => "resolver_abort_already_decided",
            Path::CoordinatorCrashPreparing => "coordinator_crash_preparing",
            Path::CoordinatorCrashCollectingVotes => "coordinator_crash_collecting_votes",
            Path::CoordinatorCrashPrecommitted => "coordinator_crash_precommitted",
            Path::CoordinatorCrashCommitting => "coordinator_crash_committing",
            Path::ParticipantCrashApplying => "participant_crash_applying",
            Path::ParticipantCrashPrepared => "participant_crash_prepared",
            Path::ParticipantCrashPrecommitted => "participant_crash_precommitted",
            Path::CatchupCompleted => "catchup_completed",
            Path::VotesLost => "votes_lost",
            Path::VoteNo => "vote_no",
            Path::GenerationChangeAbort => "generation_change_abort",
        }
    }
}

/// Paths reached by one seed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage(u32);

impl Coverage {
    pub fn hit(&mut self, p: Path) {
        self.0 |= 1 << p as u32;
    }
    pub fn has(&self, p: Path) -> bool {
        self.0 & (1 << p as u32) != 0
    }
    pub fn reached(&self) -> impl Iterator<Item = Path> + '_ {
        Path::ALL.into_iter().filter(|p| self.has(*p))
    }
}

/// Seeds reaching each path, over a sweep.
#[derive(Clone, Debug, Default)]
pub struct CoverageTally {
    pub seeds: u64,
    pub counts: [u64; Path::ALL.len()],
}

impl CoverageTally {
    pub fn add(&mut self, c: &Coverage) {
        self.seeds += 1;
        for p in Path::ALL {
            if c.has(p) {
                self.counts[p as usize] += 1;
            }
        }
    }

    pub fn fraction(&self, p: Path) -> f64 {
        if self.seeds == 0 {
            0.0
        } else {
            self.counts[p as usize] as f64 / self.seeds as f64
        }
    }

    /// One line per path: name, seeds, percentage; flags paths under 1%.
    pub fn table(&self) -> String {
        let mut s = String::new();
        for p in Path::ALL {
            let f = self.fraction(p) * 100.0;
            let flag = if f < 1.0 { "  <-- under 1%" } else { "" };
            s.push_str(&format!(
                "  {:<36} {:>7} {:>7.2}%{flag}\n",
                p.name(),
                self.counts[p as usize],
                f
            ));
        }
        s
    }
}
