//! Names in `incoming/` to look at again shortly, because a writer still had the file open
//! when the daemon looked.
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

use std::collections::BTreeMap;
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

/// Busy names, with how often each was looked at again and when it is due next.
#[derive(Debug, Default)]
pub struct Rechecks {
    due: BTreeMap<OsString, (usize, Instant)>,
}

impl Rechecks {
    /// A new event for `name`: whatever was pending for it starts over.
    pub fn reset(&mut self, name: &OsStr) {
        self.due.remove(name);
    }

    /// `name` was busy at `now` after `tries` looks again (0 when it came from an event):
    /// schedules the next look, if any is left.
    pub fn busy(&mut self, name: &OsStr, tries: usize, now: Instant) {
        match DELAYS.get(tries) {
            Some(delay) => {
                self.due.insert(name.to_owned(), (tries + 1, now + *delay));
            }
            None => {
                self.due.remove(name);
            }
        }
    }

    /// Takes the names due at `now`, each with how often it was looked at again.
    pub fn take_due(&mut self, now: Instant) -> Vec<(OsString, usize)> {
        let due: Vec<OsString> = self
            .due
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(name, _)| name.clone())
            .collect();
        due.into_iter()
            .filter_map(|name| self.due.remove(&name).map(|(tries, _)| (name, tries)))
            .collect()
    }

    /// When the next name is due.
    pub fn next_at(&self) -> Option<Instant> {
        self.due.values().map(|(_, at)| *at).min()
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
}
