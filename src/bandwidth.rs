//! Bandwidth limits: `bandwidth:` at top level (all uploads together) and
//! per provider, either a plain rate (`20MiB/s`) or a weekly timetable in
//! the spirit of rclone's `--bwlimit`
//! (`"Mon-Fri 08:00 10MiB/s, Mon-Fri 19:00 off, Sat-Sun off"`), so that a
//! studio's uploads stay off the link during working hours. The limit
//! applies to the bytes handed to the wire by every upload of its scope
//! together, and changes live at each boundary of the timetable.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jiff::civil::{DateTime, Weekday};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::Config;

/// Minutes in a week: a timetable's positions are minutes from Monday 00:00.
const WEEK: u32 = 7 * 24 * 60;

/// The most bytes a throttled upload hands the wire at once: pieces are
/// cut to this, so the rate holds within a fraction of a second instead of
/// in megabyte bursts.
pub const SLICE: usize = 64 << 10;

/// A limit, as the config gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The text as written (shown by `check`).
    text: String,
    /// Either one entry at Monday 00:00 (a plain rate or `off`), or the
    /// timetable's entries.
    entries: Vec<Entry>,
}

/// From `days` at `minute`, the rate is `rate` (bytes per second; `None`:
/// no limit) until the next entry's time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Monday first.
    days: [bool; 7],
    /// Minutes after midnight.
    minute: u32,
    rate: Option<u64>,
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(name: &str) -> Result<usize, String> {
    let lower = name.to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|d| lower.starts_with(d) && lower.len() <= 9)
        .ok_or_else(|| format!("{name:?} is not a day (Mon, Tue, ... Sun)"))
}

fn days(text: &str) -> Result<[bool; 7], String> {
    let mut set = [false; 7];
    if text.eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    let (first, last) = match text.split_once('-') {
        Some((a, b)) => (day(a)?, day(b)?),
        None => (day(text)?, day(text)?),
    };
    let mut d = first;
    loop {
        set[d] = true;
        if d == last {
            break;
        }
        d = (d + 1) % 7;
    }
    Ok(set)
}

fn time_of_day(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a time of day (HH:MM, 00:00 to 23:59)");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// `off` (no limit) or a size per second: `10MiB/s`, `512KiB/s`, `10MiB`.
fn rate(text: &str) -> Result<Option<u64>, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let size = text.strip_suffix("/s").unwrap_or(text);
    let bytes = size
        .parse::<crate::config::ByteSize>()
        .map_err(|e| format!("{text:?} is not a rate such as 10MiB/s or off: {e}"))?
        .0;
    if bytes == 0 {
        return Err(format!(
            "{text:?} would stop every upload; use `off` for no limit, or `hotfolder pause` to stop uploads"
        ));
    }
    Ok(Some(bytes))
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        if parts.len() == 1 && !parts[0].contains(' ') {
            return Ok(Schedule {
                text: text.to_string(),
                entries: vec![Entry {
                    days: [true; 7],
                    minute: 0,
                    rate: rate(parts[0])?,
                }],
            });
        }
        let mut entries = Vec::new();
        for part in parts {
            let words: Vec<&str> = part.split_whitespace().collect();
            let entry = match words.as_slice() {
                [d, r] => Entry {
                    days: days(d)?,
                    minute: 0,
                    rate: rate(r)?,
                },
                [d, t, r] => Entry {
                    days: days(d)?,
                    minute: time_of_day(t)?,
                    rate: rate(r)?,
                },
                _ => {
                    return Err(format!(
                        "{part:?} is not a timetable entry: write DAYS [HH:MM] RATE, e.g. \"Mon-Fri 08:00 10MiB/s\""
                    ));
                }
            };
            entries.push(entry);
        }
        Ok(Schedule {
            text: text.to_string(),
            entries,
        })
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::config::parse_scalar(d, "a rate (20MiB/s) or a weekly timetable")
    }
}

impl Serialize for Schedule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Minutes from Monday 00:00 of `at`.
fn week_minute(at: DateTime) -> u32 {
    let day = match at.weekday() {
        Weekday::Monday => 0,
        Weekday::Tuesday => 1,
        Weekday::Wednesday => 2,
        Weekday::Thursday => 3,
        Weekday::Friday => 4,
        Weekday::Saturday => 5,
        Weekday::Sunday => 6,
    };
    day * 24 * 60 + at.hour() as u32 * 60 + at.minute() as u32
}

impl Schedule {
    /// Every boundary of the week: (minute of the week, rate), the later
    /// entry of the list winning where two start at the same minute.
    fn boundaries(&self) -> BTreeMap<u32, Option<u64>> {
        let mut all = BTreeMap::new();
        for entry in &self.entries {
            for (d, on) in entry.days.iter().enumerate() {
                if *on {
                    all.insert(d as u32 * 24 * 60 + entry.minute, entry.rate);
                }
            }
        }
        all
    }

    /// The limit in force at `at` (local time), in bytes per second;
    /// `None`: no limit. Before the week's first boundary, the last one of
    /// the week before holds.
    pub fn rate_at(&self, at: DateTime) -> Option<u64> {
        let all = self.boundaries();
        let now = week_minute(at);
        all.range(..=now)
            .next_back()
            .or_else(|| all.iter().next_back())
            .and_then(|(_, rate)| *rate)
    }

    /// How long from `at` until the next boundary (at least a second).
    pub fn until_next_change(&self, at: DateTime) -> Duration {
        let all = self.boundaries();
        let now = week_minute(at);
        let next = all
            .range(now + 1..)
            .next()
            .map(|(m, _)| *m)
            .or_else(|| all.keys().next().map(|m| m + WEEK))
            .unwrap_or(now + WEEK);
        let seconds = u64::from(next - now) * 60 - u64::from(at.second() as u32);
        Duration::from_secs(seconds.max(1))
    }
}

/// One scope's limit: the rate limiter of the rate in force (none while
/// unlimited), replaced when the timetable moves on.
pub struct Limiter {
    /// `all`, or `provider`.
    pub scope: &'static str,
    /// The provider's name; empty for `all`.
    pub name: String,
    schedule: Schedule,
    current: Mutex<Option<(u64, Arc<DefaultDirectRateLimiter>)>>,
    /// Set once a rate was taken: the first one is news too (logged).
    applied: std::sync::atomic::AtomicBool,
}

impl Limiter {
    fn new(scope: &'static str, name: &str, schedule: Schedule) -> Self {
        Limiter {
            scope,
            name: name.to_string(),
            schedule,
            current: Mutex::new(None),
            applied: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The limit in force now, bytes per second (`None`: no limit).
    pub fn rate(&self) -> Option<u64> {
        self.current
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|(rate, _)| *rate))
    }

    /// Take the rate the timetable gives for `at`; true when it changed
    /// (or is the first).
    fn apply(&self, at: DateTime) -> bool {
        let wanted = self.schedule.rate_at(at);
        let Ok(mut current) = self.current.lock() else {
            return false;
        };
        let first = !self
            .applied
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        if !first && current.as_ref().map(|(rate, _)| *rate) == wanted {
            return false;
        }
        *current = wanted.map(|rate| (rate, Arc::new(limiter_for(rate))));
        true
    }

    /// Wait until `bytes` may go on the wire (at most [`SLICE`] at a time).
    pub async fn take(&self, bytes: usize) {
        let limiter = self
            .current
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|(_, l)| Arc::clone(l)));
        let Some(limiter) = limiter else {
            return;
        };
        if let Some(n) = NonZeroU32::new(bytes.min(SLICE) as u32) {
            // The burst is at least a slice, so the capacity always suffices.
            let _ = limiter.until_n_ready(n).await;
        }
    }
}

/// A limiter of `rate` bytes per second whose burst is a slice or a
/// twentieth of a second's worth, whichever is more.
fn limiter_for(rate: u64) -> DefaultDirectRateLimiter {
    let per_second =
        NonZeroU32::new(rate.min(u64::from(u32::MAX)) as u32).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new((rate / 20).max(SLICE as u64).min(u64::from(u32::MAX)) as u32)
        .unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
}

/// The limits an upload passes through: everything's, then its provider's.
pub type Throttle = Vec<Arc<Limiter>>;

/// Every configured limit of a daemon, replaced at a reload.
#[derive(Default)]
pub struct Bandwidth {
    limits: crate::reload::Shared<Limits>,
    /// The timetables' clock.
    clock: Clock,
    /// Woken at a reload: the next boundary may have moved.
    changed: tokio::sync::Notify,
}
/// The limiters of one config.
#[derive(Default)]
struct Limits {
    global: Option<Arc<Limiter>>,
    providers: BTreeMap<String, Arc<Limiter>>,
}

impl Limits {
    /// The limits `config` sets; a scope whose schedule is the same as in
    /// `before` keeps its limiter (and what uploads already took from it).
    fn of(config: &Config, before: &Limits) -> Self {
        let keep = |before: Option<&Arc<Limiter>>, scope, name: &str, schedule: Schedule| {
            before
                .filter(|l| l.schedule == schedule)
                .cloned()
                .unwrap_or_else(|| Arc::new(Limiter::new(scope, name, schedule)))
        };
        Limits {
            global: config
                .bandwidth
                .clone()
                .map(|s| keep(before.global.as_ref(), "all", "", s)),
            providers: config
                .providers
                .iter()
                .filter_map(|(name, p)| {
                    let schedule = p.bandwidth.clone()?;
                    let limiter = keep(before.providers.get(name), "provider", name, schedule);
                    Some((name.clone(), limiter))
                })
                .collect(),
        }
    }

    fn all(&self) -> Vec<Arc<Limiter>> {
        self.global
            .iter()
            .chain(self.providers.values())
            .cloned()
            .collect()
    }
}

impl Bandwidth {
    /// The limits `config` sets, in force now by `clock`.
    pub fn new(config: &Config, clock: Clock) -> Self {
        let bandwidth = Bandwidth {
            limits: crate::reload::Shared::new(Limits::of(config, &Limits::default())),
            clock,
            changed: tokio::sync::Notify::new(),
        };
        bandwidth.apply(clock.now());
        bandwidth
    }

    /// Take the limits of a reloaded `config`. Uploads under way pass
    /// through the new limits from their next chunk on.
    pub fn reconfigure(&self, config: &Config) {
        let limits = Limits::of(config, &self.limits.get());
        self.limits.set(Arc::new(limits));
        self.apply(self.clock.now());
        self.changed.notify_one();
    }

    fn all(&self) -> Vec<Arc<Limiter>> {
        self.limits.get().all()
    }

    /// The limits an upload to `provider` passes through (empty: none).
    pub fn throttle_for(&self, provider: &str) -> Throttle {
        let limits = self.limits.get();
        limits
            .global
            .iter()
            .chain(limits.providers.get(provider))
            .cloned()
            .collect()
    }
    /// Every scope with a limit configured, and the rate in force.
    pub fn limits(&self) -> Vec<(&'static str, String, Option<u64>)> {
        self.all()
            .iter()
            .map(|l| (l.scope, l.name.clone(), l.rate()))
            .collect()
    }

    /// Take the rates in force at `at`, logging each change; answers how
    /// long until the next boundary of any timetable.
    pub fn apply(&self, at: DateTime) -> Duration {
        let mut next = Duration::from_secs(3600);
        for limiter in self.all() {
            if limiter.apply(at) {
                let rate = limiter.rate().map_or_else(
                    || "off (no limit)".to_string(),
                    |r| format!("{}/s", crate::config::ByteSize(r)),
                );
                let scope = if limiter.name.is_empty() {
                    "all uploads".to_string()
                } else {
                    format!("provider {}", limiter.name)
                };
                tracing::info!(scope = %scope, rate = %rate, "bandwidth limit now in force");
            }
            next = next.min(limiter.schedule.until_next_change(at));
        }
        next
    }
}

/// Local wall-clock time as the timetables read it. Tests built with the
/// `failpoints` feature may start it at another moment
/// (`HOTFOLDER_CLOCK_START=2026-12-07T07:59:58`); it then runs on from
/// there in real time, so a boundary can be crossed without waiting hours.
#[derive(Clone, Copy, Default)]
pub struct Clock {
    offset: jiff::SignedDuration,
}

impl Clock {
    /// The real clock, or (failpoints builds) the test's.
    pub fn from_env() -> Self {
        #[cfg(feature = "failpoints")]
        if let Some(start) = std::env::var("HOTFOLDER_CLOCK_START")
            .ok()
            .and_then(|s| s.parse::<DateTime>().ok())
        {
            let real = jiff::Zoned::now().datetime();
            return Clock {
                offset: start.duration_since(real),
            };
        }
        Clock::default()
    }

    /// Local time now.
    pub fn now(&self) -> DateTime {
        let real = jiff::Zoned::now().datetime();
        real.checked_add(self.offset).unwrap_or(real)
    }
}

/// Keep every limit at its timetable's rate until `shutdown`.
pub async fn follow_timetables(
    bandwidth: Arc<Bandwidth>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let next = bandwidth.apply(bandwidth.clock.now());
        tokio::select! {
            () = crate::shutdown::stopped(&mut shutdown) => return,
            () = tokio::time::sleep(next) => {}
            () = bandwidth.changed.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime {
        text.parse().expect("a date and time")
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_plain_rate_holds_all_week() {
        let s: Schedule = "20MiB/s".parse().expect("rate");
        // 2026-12-07 is a Monday.
        assert_eq!(s.rate_at(at("2026-12-07T00:00")), Some(20 * MIB));
        assert_eq!(s.rate_at(at("2026-12-13T23:59")), Some(20 * MIB));
        let off: Schedule = "off".parse().expect("off");
        assert_eq!(off.rate_at(at("2026-12-09T12:00")), None);
    }

    #[test]
    fn the_timetable_switches_at_each_boundary() {
        let s: Schedule = "Mon-Fri 08:00 10MiB/s, Mon-Fri 19:00 off, Sat-Sun off"
            .parse()
            .expect("timetable");
        // Monday before 08:00: Sunday's `off` (from the week before) holds.
        assert_eq!(s.rate_at(at("2026-12-07T07:59")), None);
        assert_eq!(s.rate_at(at("2026-12-07T08:00")), Some(10 * MIB));
        assert_eq!(s.rate_at(at("2026-12-07T18:59")), Some(10 * MIB));
        assert_eq!(s.rate_at(at("2026-12-07T19:00")), None);
        // Friday evening to Monday morning: off.
        assert_eq!(s.rate_at(at("2026-12-11T12:00")), Some(10 * MIB));
        assert_eq!(s.rate_at(at("2026-12-12T12:00")), None);
        // From Monday 07:59:30, the next change is 30 s away.
        assert_eq!(
            s.until_next_change(at("2026-12-07T07:59:30")),
            Duration::from_secs(30)
        );
        // From Friday 19:00, the next change is Saturday 00:00 (5 hours).
        assert_eq!(
            s.until_next_change(at("2026-12-11T19:00")),
            Duration::from_secs(5 * 3600)
        );
        // From Sunday noon, the next is Monday 08:00: across the week's end.
        assert_eq!(
            s.until_next_change(at("2026-12-13T12:00")),
            Duration::from_secs(20 * 3600)
        );
    }

    #[test]
    fn a_wrapping_day_range_and_a_late_entry_winning() {
        let s: Schedule = "Fri-Mon 00:00 1MiB/s, Mon 00:00 2MiB/s"
            .parse()
            .expect("timetable");
        assert_eq!(s.rate_at(at("2026-12-12T10:00")), Some(MIB)); // Saturday
        assert_eq!(s.rate_at(at("2026-12-07T10:00")), Some(2 * MIB)); // Monday: the later entry
        assert_eq!(s.rate_at(at("2026-12-08T10:00")), Some(2 * MIB)); // Tuesday: Monday's holds
    }

    #[test]
    fn bad_limits_say_what_is_wrong() {
        let error = |text: &str| text.parse::<Schedule>().expect_err(text);
        assert!(error("fast").contains("not a rate such as 10MiB/s or off"));
        assert!(error("0MiB/s").contains("use `off` for no limit"));
        assert!(error("Mon-Fri 25:00 1MiB/s").contains("not a time of day"));
        assert!(error("Mon-Fry 08:00 1MiB/s").contains("\"Fry\" is not a day"));
        assert!(error("Mon-Fri 08:00").contains("not a rate"));
        assert!(error("Mon 08:00 1MiB/s extra").contains("not a timetable entry"));
    }

    #[tokio::test]
    async fn a_limiter_holds_its_rate() {
        let limiter = Limiter::new("all", "", "1MiB/s".parse().expect("rate"));
        assert!(limiter.apply(at("2026-12-07T00:00")));
        let started = std::time::Instant::now();
        // The first twentieth of a second's worth is the burst; the rest
        // (1 MiB) takes about a second.
        let mut sent = 0;
        while sent < (MIB + MIB / 20) as usize {
            limiter.take(SLICE).await;
            sent += SLICE;
        }
        let took = started.elapsed().as_secs_f64();
        assert!(
            (0.85..3.0).contains(&took),
            "{took} s for 1 MiB past the burst"
        );
    }
}
