//! hotfolder: an unattended watch-folder ingest appliance.
//!
//! The life of a file, module by module:
//! [`config`] is read once; [`watch`] discovers files and decides when each is
//! complete, taking only what [`admission`] lets in; [`route`] picks a rule, a provider and metadata; [`lifecycle`]
//! holds every state of a job and the one table of transitions; [`state`]
//! records the job (behind the [`state::JobStore`] trait; sled today) before
//! any work; [`upload`] drives a [`providers`] backend chunk by chunk under
//! the shared [`retry`] policy, reading the file through [`source`] and
//! hashing with [`hashing`] in the same pass; [`finish`] files the source into
//! done/ or failed/ with a receipt or error report through intents recorded
//! first, using the no-replace steps of [`fsx`]. [`daemon`] ties them together
//! with workers, supervised job tasks and graceful shutdown; [`jobs`] holds
//! the status view, `retry` and the small handle that [`api`] (HTTP status,
//! metrics, page) and [`control`] (`status`/`retry` while the daemon runs)
//! are given; [`oneshot`] is `hotfolder upload`; [`sandbox`] simulates the
//! providers for tests and trials; [`failpoint`] holds the crash points the
//! tests stop the binary at (a cargo feature); [`memory`] tunes the allocator
//! and reports the heap; [`cli`] is the command line.

pub mod admission;
pub mod api;
pub mod bandwidth;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod failpoint;
pub mod finish;
pub mod fsx;
pub mod group_commit;
pub mod hashing;
pub mod jobs;
pub mod lifecycle;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod oneshot;
pub mod pause;
pub mod providers;
pub mod reload;
pub mod retry;
pub mod route;
pub mod sandbox;
pub mod shutdown;
pub mod source;
pub mod state;
pub mod upload;
pub mod watch;
