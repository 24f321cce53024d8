//! Named points in the code where a test can stop the real binary hard
//! (as a power cut or `kill -9` would, at exactly that step) or make an
//! operation fail as an odd filesystem would. Compiled in only with the
//! `failpoints` cargo feature, which the test suite enables; a normal build
//! has none. Configured by the `FAILPOINTS` environment variable of the
//! `fail` crate, e.g. `FAILPOINTS="filing::after_rename=return"` or
//! `"chunk::acknowledged=2*off->return"` (the third time).

/// Read `FAILPOINTS`; call once at start. Without the feature, nothing.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    {
        // The scenario is kept for the life of the process.
        std::mem::forget(fail::FailScenario::setup());
    }
}

/// True when the point `name` is configured to fire now (`return`).
#[inline]
pub fn active(name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    {
        fail::eval(name, |_| ()).is_some()
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}

/// Stop the process at once, without unwinding, flushing or cleaning up,
/// when the point `name` fires: the next start sees exactly what a crash
/// at this step leaves.
#[inline]
pub fn crash(name: &str) {
    if active(name) {
        eprintln!("failpoint {name}: stopping the process here");
        std::process::abort();
    }
}
