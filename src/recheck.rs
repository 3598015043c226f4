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
/// (and the same entries ordered by when they are due, then by when they were scheduled).
#[derive(Debug, Default)]
pub struct Rechecks {
    /// Name -> (looks so far, due, sequence, whether it waits in arrival order).
    due: BTreeMap<OsString, (usize, Instant, u64, bool)>,
    order: BTreeSet<(Instant, u64, OsString)>,
    /// Scheduling sequence, to keep the order of arrival among names due at once.
    seq: u64,
    /// How many names wait in arrival order (moved in and settling, or completed behind
    /// one): while any does, a newly completed name waits behind them, so submissions are
    /// admitted in the order they arrived.
    in_line: usize,
    /// The latest time such a name is due.
    tail: Option<Instant>,
}

impl Rechecks {
    /// A new event for `name`: whatever was pending for it starts over.
    pub fn reset(&mut self, name: &OsStr) {
        if let Some(entry) = self.due.remove(name) {
            self.forget(name, entry);
        }
    }

    fn forget(&mut self, name: &OsStr, (_, at, seq, in_line): (usize, Instant, u64, bool)) {
        self.order.remove(&(at, seq, name.to_owned()));
        if in_line {
            self.in_line -= 1;
        }
    }

    fn schedule(&mut self, name: &OsStr, tries: usize, at: Instant, in_line: bool) {
        self.reset(name);
        self.seq += 1;
        self.due
            .insert(name.to_owned(), (tries, at, self.seq, in_line));
        self.order.insert((at, self.seq, name.to_owned()));
        if in_line {
            self.in_line += 1;
            self.tail = Some(self.tail.map_or(at, |t| t.max(at)));
        }
    }

    /// `name` was moved in at `now`: it is looked at after [`SETTLE`] (as from an event: a
    /// busy file then backs off from the first delay).
    pub fn settle(&mut self, name: &OsStr, now: Instant) {
        self.schedule(name, 0, now + SETTLE, true);
    }

    /// `name` was completed at `now` by its writer's close. `true`: it may be looked at now;
    /// `false`: a name that came before it still waits (settling), so it waits behind it
    /// (even past that one's due time: the timer and new events can be handled in either
    /// order).
    pub fn completed(&mut self, name: &OsStr, now: Instant) -> bool {
        self.reset(name);
        if self.in_line == 0 {
            return true;
        }
        let at = self.tail.map_or(now, |t| t.max(now));
        self.schedule(name, 0, at, true);
        false
    }

    /// `name` was busy at `now` after `tries` looks again (0 when it came from an event):
    /// schedules the next look, if any is left.
    pub fn busy(&mut self, name: &OsStr, tries: usize, now: Instant) {
        match DELAYS.get(tries) {
            Some(delay) => self.schedule(name, tries + 1, now + *delay, false),
            None => self.reset(name),
        }
    }

    /// Takes the names due at `now`, in order, each with how often it was looked at again.
    pub fn take_due(&mut self, now: Instant) -> Vec<(OsString, usize)> {
        let mut out = Vec::new();
        while let Some((at, _, _)) = self.order.first() {
            if *at > now {
                break;
            }
            let Some((_, _, name)) = self.order.pop_first() else {
                break;
            };
            if let Some((tries, _, _, in_line)) = self.due.remove(&name) {
                if in_line {
                    self.in_line -= 1;
                }
                out.push((name, tries));
            }
        }
        out
    }

    /// When the next name is due.
    pub fn next_at(&self) -> Option<Instant> {
        self.order.first().map(|(at, _, _)| *at)
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

    #[test]
    fn a_name_completed_while_an_earlier_one_settles_waits_behind_it() {
        let mut r = Rechecks::default();
        let t0 = Instant::now();
        assert!(
            r.completed(OsStr::new("first.yaml"), t0),
            "nothing settles yet"
        );
        r.settle(OsStr::new("moved.yaml"), t0);
        let t1 = t0 + Duration::from_millis(1);
        assert!(!r.completed(OsStr::new("zz-closed.yaml"), t1));
        assert!(!r.completed(OsStr::new("aa-closed.yaml"), t1));
        assert!(r.take_due(t1).is_empty());
        assert_eq!(
            r.take_due(t0 + SETTLE),
            vec![
                (OsString::from("moved.yaml"), 0),
                (OsString::from("zz-closed.yaml"), 0),
                (OsString::from("aa-closed.yaml"), 0)
            ],
            "in the order they came"
        );
        assert!(r.completed(OsStr::new("later.yaml"), t0 + SETTLE));
        // Past its due time but not taken yet: a later name still waits behind it.
        r.settle(OsStr::new("m2.yaml"), t0);
        let late = t0 + SETTLE * 3;
        assert!(!r.completed(OsStr::new("c2.yaml"), late));
        assert_eq!(
            r.take_due(late),
            vec![
                (OsString::from("m2.yaml"), 0),
                (OsString::from("c2.yaml"), 0)
            ]
        );
        // A busy file's looks again do not hold later names back.
        r.busy(OsStr::new("busy.yaml"), 0, late);
        assert!(r.completed(OsStr::new("c3.yaml"), late));
    }
}
