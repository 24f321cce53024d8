//! The life of a job on one screen: every state it can be in, every outcome
//! its owner can learn, and the one table ([`next`]) that says where each
//! outcome leads from each state. The engine, filing and `retry` report
//! outcomes through [`crate::state::Job::apply`]; nothing else changes a
//! job's state, so no transition can be refused and dropped on the way.
//!
//! The table is total: every (state, outcome) pair has a next state. An
//! outcome that does not apply to a state (a late chunk acknowledgement for
//! a job that is already filing, a `retry` of a job that has not failed)
//! leaves the state unchanged; the tests below walk every pair, and a model
//! of the job's owner driven by random outcomes (crashes, transient and
//! permanent errors, changed and vanished sources) always ends in a
//! terminal state or in one it resumes from.

use serde::{Deserialize, Serialize};

/// Where a job stands. Only [`next`] moves a job from one state to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// The create call is (or may be) in flight: on restart, look for the
    /// remote object before creating another.
    Creating,
    /// Remote session exists; chunks are going out.
    Uploading,
    /// Every byte acknowledged; provider finalisation under way.
    Finalizing,
    /// Delivered; the source is being moved to done/ with its receipt.
    Filing,
    /// Finished: delivered (or a duplicate skipped) and filed.
    Done,
    /// Failed for good; the remote upload is being given up and the source
    /// moved to failed/ with its report.
    Failing,
    /// Finished: failed and filed, waiting for `retry`.
    Failed,
    /// The source changed before delivery; a new job takes over.
    Superseded,
}

/// Every state, for tests and exhaustive walks.
pub const STATES: [JobState; 9] = [
    JobState::Queued,
    JobState::Creating,
    JobState::Uploading,
    JobState::Finalizing,
    JobState::Filing,
    JobState::Done,
    JobState::Failing,
    JobState::Failed,
    JobState::Superseded,
];

impl JobState {
    /// No more work will happen on a job in this state (until `retry`).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Superseded
        )
    }

    /// Bytes may still go to the provider from this state.
    pub fn is_uploading(self) -> bool {
        matches!(
            self,
            JobState::Queued | JobState::Creating | JobState::Uploading | JobState::Finalizing
        )
    }

    /// The state a name of [`JobState::as_str`] stands for (the
    /// database's column, an API filter).
    pub fn named(name: &str) -> Option<JobState> {
        STATES.into_iter().find(|s| s.as_str() == name)
    }

    /// The snake_case name used in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Creating => "creating",
            JobState::Uploading => "uploading",
            JobState::Finalizing => "finalizing",
            JobState::Filing => "filing",
            JobState::Done => "done",
            JobState::Failing => "failing",
            JobState::Failed => "failed",
            JobState::Superseded => "superseded",
        }
    }
}

/// What the owner of a job learned; the table turns it into the next state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The same content was already delivered to this provider: skip it.
    Duplicate,
    /// A remote object is about to be created (recorded before the call,
    /// so a crash inside it is looked for, not repeated blindly).
    CreateStarted,
    /// The remote object exists and its session is persisted.
    Created,
    /// The server answered the create call with a refusal that proves
    /// nothing was made: the job may start over from the queue.
    CreateRefused,
    /// The provider acknowledged bytes.
    Acknowledged,
    /// The provider acknowledged every byte; finalisation comes next.
    Uploaded,
    /// The provider finalised the upload: the content is delivered.
    Delivered,
    /// A failure worth retrying later from where the job stands.
    Transient,
    /// A failure retrying cannot fix (or the retry budget is spent).
    Permanent,
    /// The source changed before it was delivered and filed.
    SourceChanged,
    /// The source was filed (or, if it could not be, left in place) and
    /// its receipt or error report written.
    Filed,
    /// The operator asked for another try.
    Retry,
}

/// Every outcome, for tests and exhaustive walks.
pub const OUTCOMES: [Outcome; 12] = [
    Outcome::Duplicate,
    Outcome::CreateStarted,
    Outcome::Created,
    Outcome::CreateRefused,
    Outcome::Acknowledged,
    Outcome::Uploaded,
    Outcome::Delivered,
    Outcome::Transient,
    Outcome::Permanent,
    Outcome::SourceChanged,
    Outcome::Filed,
    Outcome::Retry,
];

/// The transition table: where `outcome` leads from `state`.
pub fn next(state: JobState, outcome: Outcome) -> JobState {
    use JobState::*;
    use Outcome::*;
    match (state, outcome) {
        // Finished jobs stay finished; only a failed one can be retried.
        (Failed, Retry) => Queued,
        (Done | Failed | Superseded, _) => state,

        // Failures and changes, wherever the upload stands.
        (Queued | Creating | Uploading | Finalizing, Permanent) => Failing,
        (Queued | Creating | Uploading | Finalizing, SourceChanged) => Superseded,
        (_, Transient) => state,

        // The upload.
        (Queued, Duplicate) => Filing,
        (Queued | Creating | Uploading | Finalizing, CreateStarted) => Creating,
        (Queued | Creating | Uploading, Created | Acknowledged) => Uploading,
        (Creating, CreateRefused) => Queued,
        (Queued | Creating | Uploading | Finalizing, Uploaded) => Finalizing,
        (Queued | Creating | Uploading | Finalizing, Delivered) => Filing,

        // Filing: delivered content stays delivered; a source that changed
        // after delivery is a new version, taken again as a new job.
        (Filing, Filed | Permanent) => Done,
        (Filing, SourceChanged) => Superseded,
        (Failing, Filed | Permanent | SourceChanged) => Failed,

        // Everything else does not apply to the state and changes nothing:
        // a duplicate found once the upload started, an acknowledgement
        // after finalisation, an upload step reported while filing, a
        // retry of a job that has not failed.
        (
            Queued | Creating | Uploading | Finalizing | Filing | Failing,
            Duplicate | CreateStarted | Created | CreateRefused | Acknowledged | Uploaded
            | Delivered | Filed | Retry,
        ) => state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState::*;
    use Outcome::*;

    /// Every pair, spelled out: the table must match this list exactly, so
    /// a change to it is a visible change to this test.
    #[test]
    fn the_whole_table() {
        let moves: &[(JobState, Outcome, JobState)] = &[
            (Queued, Duplicate, Filing),
            (Queued, CreateStarted, Creating),
            (Queued, Created, Uploading),
            (Queued, Acknowledged, Uploading),
            (Queued, Uploaded, Finalizing),
            (Queued, Delivered, Filing),
            (Queued, Permanent, Failing),
            (Queued, SourceChanged, Superseded),
            (Creating, CreateStarted, Creating),
            (Creating, Created, Uploading),
            (Creating, CreateRefused, Queued),
            (Creating, Acknowledged, Uploading),
            (Creating, Uploaded, Finalizing),
            (Creating, Delivered, Filing),
            (Creating, Permanent, Failing),
            (Creating, SourceChanged, Superseded),
            (Uploading, CreateStarted, Creating),
            (Uploading, Created, Uploading),
            (Uploading, Acknowledged, Uploading),
            (Uploading, Uploaded, Finalizing),
            (Uploading, Delivered, Filing),
            (Uploading, Permanent, Failing),
            (Uploading, SourceChanged, Superseded),
            (Finalizing, CreateStarted, Creating),
            (Finalizing, Uploaded, Finalizing),
            (Finalizing, Delivered, Filing),
            (Finalizing, Permanent, Failing),
            (Finalizing, SourceChanged, Superseded),
            (Filing, Filed, Done),
            (Filing, Permanent, Done),
            (Filing, SourceChanged, Superseded),
            (Failing, Filed, Failed),
            (Failing, Permanent, Failed),
            (Failing, SourceChanged, Failed),
            (Failed, Retry, Queued),
        ];
        for state in STATES {
            for outcome in OUTCOMES {
                let expected = moves
                    .iter()
                    .find(|(s, o, _)| *s == state && *o == outcome)
                    .map_or(state, |(_, _, to)| *to);
                assert_eq!(next(state, outcome), expected, "{state:?} + {outcome:?}");
            }
        }
    }

    #[test]
    fn terminal_states_absorb_all_but_retry() {
        for state in STATES.into_iter().filter(|s| s.is_terminal()) {
            for outcome in OUTCOMES {
                let to = next(state, outcome);
                if state == Failed && outcome == Retry {
                    assert_eq!(to, Queued);
                } else {
                    assert_eq!(to, state, "{state:?} + {outcome:?}");
                }
            }
        }
    }

    #[test]
    fn every_state_is_reachable_from_the_queue() {
        let mut seen = vec![Queued];
        let mut frontier = vec![Queued];
        while let Some(state) = frontier.pop() {
            for outcome in OUTCOMES {
                let to = next(state, outcome);
                if !seen.contains(&to) {
                    seen.push(to);
                    frontier.push(to);
                }
            }
        }
        for state in STATES {
            assert!(seen.contains(&state), "{state:?} unreachable");
        }
    }

    /// A model of the job's owner: in each state it takes the step that
    /// state calls for, and the world answers with one of the outcomes that
    /// step can have. `Crash` keeps the persisted state (everything the
    /// owner persists is persisted before the next step), which is then
    /// resumed.
    mod model {
        use super::*;
        use proptest::prelude::*;

        /// What the world does to one step.
        #[derive(Debug, Clone, Copy)]
        pub enum World {
            Crash,
            Transient,
            Permanent,
            SourceChanged,
            Refused,
            Succeeds,
        }

        pub fn world() -> impl Strategy<Value = World> {
            prop_oneof![
                3 => Just(World::Crash),
                3 => Just(World::Transient),
                1 => Just(World::Permanent),
                1 => Just(World::SourceChanged),
                1 => Just(World::Refused),
                8 => Just(World::Succeeds),
            ]
        }

        /// The outcome the owner reports for the step `state` calls for,
        /// given what the world did; `None` for a crash (nothing reported).
        pub fn step(state: JobState, world: World, duplicate: bool) -> Option<Outcome> {
            let outcome = match (world, state) {
                (World::Crash, _) => return None,
                (World::Transient, _) => Transient,
                (World::Permanent, _) => Permanent,
                (World::SourceChanged, _) => SourceChanged,
                (World::Refused, Creating) => CreateRefused,
                (World::Refused, _) => Transient,
                (World::Succeeds, Queued) if duplicate => Duplicate,
                (World::Succeeds, Queued) => CreateStarted,
                (World::Succeeds, Creating) => Created,
                (World::Succeeds, Uploading) => Uploaded,
                (World::Succeeds, Finalizing) => Delivered,
                (World::Succeeds, Filing | Failing) => Filed,
                (World::Succeeds, Done | Failed | Superseded) => return None,
            };
            Some(outcome)
        }

        proptest! {
            /// Whatever happens, each step moves the job along the table
            /// (never to a state the step cannot lead to), and once the
            /// world stops interfering the job finishes within a few steps:
            /// nothing is ever stuck.
            #[test]
            fn never_stuck(
                worlds in proptest::collection::vec(world(), 0..200),
                duplicate in any::<bool>(),
            ) {
                let mut state = Queued;
                for world in worlds {
                    if state.is_terminal() {
                        break;
                    }
                    if let Some(outcome) = step(state, world, duplicate) {
                        let to = next(state, outcome);
                        // Failures never skip filing: the report is written.
                        if outcome == Permanent && state.is_uploading() {
                            prop_assert_eq!(to, Failing);
                        }
                        if state == Filing {
                            prop_assert!(matches!(to, Filing | Done | Superseded));
                        }
                        state = to;
                    }
                }
                // The world now lets every step succeed.
                let mut steps = 0;
                while !state.is_terminal() {
                    let outcome = step(state, World::Succeeds, duplicate);
                    prop_assert!(outcome.is_some(), "no step for {:?}", state);
                    let to = next(state, outcome.unwrap_or(Transient));
                    prop_assert_ne!(to, state, "{:?} does not advance", state);
                    state = to;
                    steps += 1;
                    prop_assert!(steps <= 6, "not finished after {} steps", steps);
                }
            }
        }
    }
}
