//! Names in `incoming/` to look at again shortly, because a writer still had the file open
//! when the daemon looked, or to look at a moment after they were moved in ([`SETTLE`]).
//!
//! The daemon reads a submission when inotify reports `CLOSE_WRITE` (or `MOVED_TO`), under a
//! read lease, which the kernel refuses while anyone has the file open for writing. But the
//! kernel queues `CLOSE_WRITE` before it drops the closing writer from the file's count of
//! writers (`__fput`: `fsnotify_close`, then the filesystem's release, then
//! `put_file_access`). A daemon that is quick enough finds the file "still being written"
//! after its last writer has closed it, and no further event will come. So a busy file is
//! looked at again after 2 ms, then after longer waits, a few times; a writer that keeps it
//! open past the last look closes it later, and that close is a new event. Bounded: no
//! polling while a file stays open. (The same holds for a directory moved in whose
//! `job.yaml` is still open for writing; nothing in it is watched.)

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::time::{Duration, Instant};

/// The waits before each look again, in order.
pub const DELAYS: [Duration; 5] = [
    Duration::from_millis(2),
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_millis(1000),
];

/// How long a name moved into `incoming/` (`MOVED_TO`) waits before the daemon looks at it.
/// GNU `mv`, moving several files into a directory, stats each destination right after
/// renaming it there (to remember what it made); a daemon woken by the rename, and often
/// run at once on the same CPU, claimed the file first, and `mv` failed with "cannot stat"
/// for a file it had in fact submitted (half the runs of `mv a.yaml b.yaml incoming/` on
/// an idle daemon). A file completed by its writer's close is looked at at once.
pub const SETTLE: Duration = Duration::from_millis(10);

/// Names to look at later, with how often each was looked at again and when it is due next
/// (and the same entries ordered by when they are due).
#[derive(Debug, Default)]
pub struct Rechecks {
    due: BTreeMap<OsString, (usize, Instant)>,
    order: BTreeSet<(Instant, OsString)>,
}

impl Rechecks {
    /// A new event for `name`: whatever was pending for it starts over.
    pub fn reset(&mut self, name: &OsStr) {
        if let Some((_, at)) = self.due.remove(name) {
            self.order.remove(&(at, name.to_owned()));
        }
    }

    fn schedule(&mut self, name: &OsStr, tries: usize, at: Instant) {
        self.reset(name);
        self.due.insert(name.to_owned(), (tries, at));
        self.order.insert((at, name.to_owned()));
    }

    /// `name` was moved in at `now`: it is looked at after [`SETTLE`] (as from an event: a
    /// busy file then backs off from the first delay).
    pub fn settle(&mut self, name: &OsStr, now: Instant) {
        self.schedule(name, 0, now + SETTLE);
    }

    /// `name` was busy at `now` after `tries` looks again (0 when it came from an event):
    /// schedules the next look, if any is left.
    pub fn busy(&mut self, name: &OsStr, tries: usize, now: Instant) {
        match DELAYS.get(tries) {
            Some(delay) => self.schedule(name, tries + 1, now + *delay),
            None => self.reset(name),
        }
    }

    /// Takes the names due at `now`, each with how often it was looked at again.
    pub fn take_due(&mut self, now: Instant) -> Vec<(OsString, usize)> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.order.first() {
            if *at > now {
                break;
            }
            let Some((_, name)) = self.order.pop_first() else {
                break;
            };
            if let Some((tries, _)) = self.due.remove(&name) {
                out.push((name, tries));
            }
        }
        out
    }

    /// When the next name is due.
    pub fn next_at(&self) -> Option<Instant> {
        self.order.first().map(|(at, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_then_gives_up() {
        let mut r = Rechecks::default();
        let t0 = Instant::now();
        let name = OsStr::new("a.yaml");
        r.busy(name, 0, t0);
        assert_eq!(r.next_at(), Some(t0 + DELAYS[0]));
        assert!(r.take_due(t0).is_empty(), "not due yet");
        let mut now = t0;
        for (i, delay) in DELAYS.iter().enumerate() {
            now += *delay;
            let due = r.take_due(now);
            assert_eq!(due, vec![(name.to_owned(), i + 1)]);
            assert_eq!(r.next_at(), None, "taken");
            // Still busy at this look: the next wait, until none is left.
            r.busy(name, i + 1, now);
        }
        assert_eq!(r.next_at(), None, "gave up after {} looks", DELAYS.len());
    }

    #[test]
    fn an_event_starts_over_and_names_are_independent() {
        let mut r = Rechecks::default();
        let t0 = Instant::now();
        r.busy(OsStr::new("a.yaml"), 3, t0);
        r.busy(OsStr::new("b.yaml"), 0, t0);
        assert_eq!(r.next_at(), Some(t0 + DELAYS[0]));
        assert_eq!(
            r.take_due(t0 + DELAYS[0]),
            vec![(OsString::from("b.yaml"), 1)]
        );
        assert_eq!(r.next_at(), Some(t0 + DELAYS[3]));
        r.reset(OsStr::new("a.yaml"));
        assert_eq!(r.next_at(), None);
    }

    #[test]
    fn moved_names_wait_to_settle_in_the_order_they_came() {
        let mut r = Rechecks::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_micros(300);
        r.settle(OsStr::new("b.yaml"), t0);
        r.settle(OsStr::new("a.yaml"), t1);
        assert!(r.take_due(t0).is_empty(), "not before SETTLE");
        assert_eq!(r.next_at(), Some(t0 + SETTLE));
        assert_eq!(r.take_due(t0 + SETTLE), vec![(OsString::from("b.yaml"), 0)]);
        // Moved in again before it was looked at: the wait starts over.
        r.settle(OsStr::new("a.yaml"), t1 + SETTLE);
        assert!(r.take_due(t1 + SETTLE).is_empty());
        assert_eq!(
            r.take_due(t1 + SETTLE * 2),
            vec![(OsString::from("a.yaml"), 0)]
        );
        assert_eq!(r.next_at(), None);
        // Busy when looked at after settling: backs off from the first delay.
        r.busy(OsStr::new("a.yaml"), 0, t0);
        assert_eq!(r.next_at(), Some(t0 + DELAYS[0]));
    }
}
