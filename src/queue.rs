//! The `sky queue` table, rendered from job records (the `queue` file and `skyspool queue`).

use crate::spool::JobInfo;
use chrono::{DateTime, Local, Utc};
use std::borrow::Cow;

/// How times are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeStyle {
    /// `10 mins ago` (like `sky queue`; for a terminal, where it is read at once).
    Relative,
    /// `2026-11-28 10:32:05` local time (for the `queue` file, which is read later).
    Absolute,
}

fn parse_time(s: &Option<String>) -> Option<DateTime<Utc>> {
    s.as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// `5s`, `3m 20s`, `2h 5m`, `1d 3h`.
pub fn format_duration(secs: i64) -> String {
    let s = secs.max(0);
    let (d, h, m, sec) = (s / 86400, (s / 3600) % 24, (s / 60) % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

fn format_ago(secs: i64) -> String {
    let s = secs.max(0);
    if s < 60 {
        format!("{s} secs ago")
    } else if s < 3600 {
        let m = s / 60;
        format!("{m} min{} ago", if m == 1 { "" } else { "s" })
    } else if s < 86400 {
        let h = s / 3600;
        format!("{h} hr{} ago", if h == 1 { "" } else { "s" })
    } else {
        let d = s / 86400;
        format!("{d} day{} ago", if d == 1 { "" } else { "s" })
    }
}

fn format_time(t: Option<DateTime<Utc>>, now: DateTime<Utc>, style: TimeStyle) -> String {
    match (t, style) {
        (None, _) => "-".into(),
        (Some(t), TimeStyle::Relative) => format_ago((now - t).num_seconds()),
        (Some(t), TimeStyle::Absolute) => t
            .with_timezone(&Local)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
    }
}

const HEADER: [&str; 8] = [
    "ID",
    "NAME",
    "USER",
    "SUBMITTED",
    "STARTED",
    "DURATION",
    "RESOURCES",
    "STATUS",
];

/// One job's cells, in the columns of [`HEADER`].
pub fn row_cells(job: &JobInfo, now: DateTime<Utc>, style: TimeStyle) -> [String; 8] {
    let started = parse_time(&job.started);
    let ended = parse_time(&job.ended);
    let duration = match (started, ended) {
        (Some(s), Some(e)) => format_duration((e - s).num_seconds()),
        (Some(s), None) if style == TimeStyle::Relative => format_duration((now - s).num_seconds()),
        _ => "-".into(),
    };
    [
        job.id.to_string(),
        job.name.clone(),
        job.user.clone(),
        format_time(parse_time(&Some(job.submitted.clone())), now, style),
        format_time(started, now, style),
        duration,
        job.resources.clone(),
        job.status.to_string(),
    ]
}

/// Lays rows out as a plain table: columns padded to their widest cell and separated by two
/// spaces, no trailing blanks (for `cut`/`awk` users). Written by hand rather than with a
/// table crate: the daemon re-lays out 10,000-row queues many times a second, and comfy-table
/// took ~100 ms for that (measured), which saturated the daemon.
fn layout<'a, S: AsRef<str> + 'a>(rows: impl Iterator<Item = &'a [S; 8]> + Clone) -> String {
    let mut widths: [usize; 8] = HEADER.map(width);
    let mut bytes = 0;
    for row in rows.clone() {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            let cell = cell.as_ref();
            *w = (*w).max(width(cell));
            bytes += cell.len();
        }
    }
    let mut out = String::with_capacity(bytes + widths.iter().sum::<usize>() + 17);
    push_line(&mut out, HEADER.iter().copied(), &widths);
    for row in rows {
        push_line(&mut out, row.iter().map(AsRef::as_ref), &widths);
    }
    out
}

/// A cell's width in characters (as `layout` pads them).
fn width(cell: &str) -> usize {
    if cell.is_ascii() {
        cell.len()
    } else {
        cell.chars().count()
    }
}

/// Appends one line of the table: each cell padded to its column's width plus two spaces,
/// trailing blanks trimmed, a newline.
fn push_line<'a>(out: &mut String, cells: impl Iterator<Item = &'a str>, widths: &[usize; 8]) {
    const SPACES: &str = "                                                                ";
    let start = out.len();
    for (i, cell) in cells.enumerate() {
        out.push_str(cell);
        if i + 1 < widths.len() {
            let mut pad = widths[i].saturating_sub(width(cell)) + 2;
            while pad > 0 {
                let n = pad.min(SPACES.len());
                out.push_str(&SPACES[..n]);
                pad -= n;
            }
        }
    }
    let trimmed = out[start..].trim_end().len();
    out.truncate(start + trimmed);
    out.push('\n');
}

/// One row's cells: borrowed from the table they were cut from where they could be,
/// owned where they were made.
pub type Cells<'a> = [Cow<'a, str>; 8];

/// The rows of a table [`layout`] made (the `queue` file), each cut into its 8 cells at the
/// header's column starts (so a cell may hold spaces). `None` when the header is not ours.
/// The cells of an ASCII line are slices of `text` (a 10,000-row table is cut without
/// allocating a cell).
pub fn parse_table(text: &str) -> Option<Vec<Cells<'_>>> {
    let mut lines = text.lines();
    let header: Vec<char> = lines.next()?.chars().collect();
    let mut starts = [0usize; 8];
    let mut from = 0;
    for (i, h) in HEADER.iter().enumerate() {
        let h: Vec<char> = h.chars().collect();
        let at = (from..header.len().saturating_sub(h.len() - 1))
            .find(|&k| header[k..k + h.len()] == h[..])?;
        starts[i] = at;
        from = at + h.len();
    }
    if starts[0] != 0 {
        return None;
    }
    let mut rows = Vec::new();
    for line in lines {
        let end = |i: usize, len: usize| starts.get(i + 1).map_or(len, |&e| e.min(len));
        if line.is_ascii() {
            // Character and byte offsets agree: slice the line itself.
            let len = line.len();
            rows.push(std::array::from_fn(|i| {
                Cow::Borrowed(line[starts[i].min(len)..end(i, len)].trim())
            }));
        } else {
            let chars: Vec<char> = line.chars().collect();
            let len = chars.len();
            rows.push(std::array::from_fn(|i| {
                let cell: String = chars[starts[i].min(len)..end(i, len)].iter().collect();
                Cow::Owned(cell.trim().to_string())
            }));
        }
    }
    Some(rows)
}

/// Turns the absolute times of `queue` file rows into relative ones, as `skyspool queue`
/// shows them. Only for rows whose cells cannot have changed since the file was written
/// (ended jobs, and pending jobs still linked from `pending/`). Each distinct time is read
/// once: jobs submitted together share their second.
pub struct Relative<'a> {
    now: DateTime<Utc>,
    seen: std::collections::HashMap<&'a str, Option<String>>,
}

impl<'a> Relative<'a> {
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            now,
            seen: std::collections::HashMap::new(),
        }
    }

    /// `cells` with its SUBMITTED and STARTED cells relative to `now`.
    pub fn cells(&mut self, mut cells: Cells<'a>) -> Cells<'a> {
        let now = self.now;
        let relative =
            |cell: &str| parse_local(cell).map(|t| format_time(Some(t), now, TimeStyle::Relative));
        for cell in &mut cells[3..5] {
            let shown = match *cell {
                Cow::Borrowed(text) => self
                    .seen
                    .entry(text)
                    .or_insert_with(|| relative(text))
                    .clone(),
                // (Cut from a non-ASCII line, so not remembered by its text's lifetime.)
                Cow::Owned(ref text) => relative(text),
            };
            if let Some(shown) = shown {
                *cell = Cow::Owned(shown);
            }
        }
        cells
    }
}

/// `YYYY-MM-DD HH:MM:SS` in local time (what [`TimeStyle::Absolute`] writes), read by
/// position: a 10,000-row table has 20,000 of them.
fn parse_local(cell: &str) -> Option<DateTime<Utc>> {
    let b = cell.as_bytes();
    if b.len() != 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b' ' || b[13] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let date = chrono::NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    let naive = date.and_hms_opt(num(11..13)?, num(14..16)?, num(17..19)?)?;
    naive
        .and_local_timezone(Local)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
}

/// Lays out rows given newest first.
pub fn render_rows<S: AsRef<str>>(rows: &[[S; 8]]) -> String {
    layout(rows.iter())
}

/// The table: newest job first, columns as `sky queue` prints them.
pub fn render(jobs: &[&JobInfo], now: DateTime<Utc>, style: TimeStyle) -> String {
    let rows: Vec<[String; 8]> = jobs
        .iter()
        .rev()
        .map(|j| row_cells(j, now, style))
        .collect();
    render_rows(&rows)
}

/// The `queue` file's rows, kept per job so that a re-render after a change formats only
/// the jobs that changed (absolute times do not depend on when the table is rendered).
#[derive(Debug)]
pub struct QueueCache {
    rows: std::collections::BTreeMap<crate::scheduler::JobId, CachedRow>,
    /// Per column, how many rows have a cell of each width: a column's width is the largest
    /// (or its header's), kept as rows change without looking at every row.
    counts: [std::collections::BTreeMap<usize, usize>; 8],
    /// The widths the cached lines are laid out with.
    widths: [usize; 8],
    /// The bytes of all cached lines.
    len: usize,
}

impl Default for QueueCache {
    fn default() -> Self {
        QueueCache {
            rows: Default::default(),
            counts: Default::default(),
            widths: HEADER.map(width),
            len: 0,
        }
    }
}

/// A job's line as laid out with [`QueueCache::widths`], and the widths of its cells (which
/// find the cells in the line again: the cells are not kept twice).
#[derive(Debug)]
struct CachedRow {
    widths: [usize; 8],
    line: String,
}

impl CachedRow {
    /// The cells of the line, it being laid out with `layout`.
    fn cells<'a>(&'a self, layout: &[usize; 8]) -> [&'a str; 8] {
        let line = self.line.trim_end_matches('\n');
        let mut at = 0;
        std::array::from_fn(|i| {
            let (from, to) = (at, at + self.widths[i]);
            at += layout[i] + 2;
            if line.is_ascii() {
                line.get(from.min(line.len())..to.min(line.len()))
                    .unwrap_or("")
            } else {
                let byte = |c: usize| line.char_indices().nth(c).map_or(line.len(), |(b, _)| b);
                &line[byte(from)..byte(to)]
            }
        })
    }
}

impl QueueCache {
    pub fn update(&mut self, job: &JobInfo) {
        let cells = row_cells(job, Utc::now(), TimeStyle::Absolute);
        let widths = cells.each_ref().map(|c| width(c));
        if let Some(old) = self.rows.remove(&job.id) {
            self.len -= old.line.len();
            for (count, w) in self.counts.iter_mut().zip(old.widths) {
                if let Some(n) = count.get_mut(&w) {
                    *n -= 1;
                    if *n == 0 {
                        count.remove(&w);
                    }
                }
            }
        }
        for (count, w) in self.counts.iter_mut().zip(widths) {
            *count.entry(w).or_default() += 1;
        }
        let mut row = CachedRow {
            widths,
            line: String::new(),
        };
        let table: [usize; 8] = std::array::from_fn(|i| {
            let header = width(HEADER[i]);
            self.counts[i]
                .last_key_value()
                .map_or(header, |(w, _)| (*w).max(header))
        });
        if table != self.widths {
            // A column got wider or narrower: every line is laid out again (rare: the
            // widths of ids, names and statuses settle quickly).
            let old = std::mem::replace(&mut self.widths, table);
            self.len = 0;
            let mut line = String::new();
            for r in self.rows.values_mut() {
                line.clear();
                push_line(&mut line, r.cells(&old).into_iter(), &table);
                r.line.clone_from(&line);
                self.len += r.line.len();
            }
        }
        push_line(
            &mut row.line,
            cells.iter().map(String::as_str),
            &self.widths,
        );
        self.len += row.line.len();
        self.rows.insert(job.id, row);
    }

    /// The whole table, newest job first: the header and the cached lines, copied.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.len + 128);
        push_line(&mut out, HEADER.iter().copied(), &self.widths);
        for row in self.rows.values().rev() {
            out.push_str(&row.line);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Demand, NodeDemand};
    use crate::spool::Status;

    fn job(id: u64, status: Status, started: Option<&str>) -> JobInfo {
        JobInfo {
            id,
            name: format!("job{id}"),
            user: "alice".into(),
            uid: 1000,
            gid: 1000,
            status,
            submitted: "2026-11-28T10:00:00Z".into(),
            started: started.map(str::to_string),
            ended: None,
            resources: "1x[H100:1]".into(),
            demand: Demand {
                num_nodes: 1,
                per_node: NodeDemand::default(),
            },
            num_nodes: 1,
            source: "incoming/x.yaml".into(),
            has_workdir: false,
            placement: vec![],
            exit_codes: vec![],
            reason: None,
        }
    }

    #[test]
    fn newest_first_with_sky_columns() {
        let a = job(1, Status::Succeeded, Some("2026-11-28T10:01:00Z"));
        let b = job(2, Status::Pending, None);
        let now = DateTime::parse_from_rfc3339("2026-11-28T10:10:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let text = render(&[&a, &b], now, TimeStyle::Relative);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID"));
        for col in [
            "NAME",
            "USER",
            "SUBMITTED",
            "STARTED",
            "DURATION",
            "RESOURCES",
            "STATUS",
        ] {
            assert!(lines[0].contains(col), "{col}");
        }
        assert!(lines[1].starts_with('2') && lines[1].contains("PENDING"));
        assert!(lines[2].starts_with('1') && lines[2].contains("9 mins ago"));
        assert!(lines[2].contains("10 mins ago"));
    }

    proptest::proptest! {
        /// The cached table is exactly what laying out every row afresh gives, whatever the
        /// order of updates and however column widths grow and shrink.
        #[test]
        fn cached_table_is_the_fresh_layout(
            updates in proptest::collection::vec((1u64..12, 0usize..30, 0usize..4), 1..40)
        ) {
            let mut cache = QueueCache::default();
            let mut jobs = std::collections::BTreeMap::new();
            for (id, name_len, status) in updates {
                let status = [Status::Pending, Status::Running, Status::Succeeded, Status::FailedDriver][status];
                let mut j = job(id, status, Some("2026-11-28T10:01:00Z"));
                j.name = "n".repeat(name_len) + "é";
                cache.update(&j);
                jobs.insert(id, j);
                let rows: Vec<[String; 8]> = jobs
                    .values()
                    .rev()
                    .map(|j| row_cells(j, Utc::now(), TimeStyle::Absolute))
                    .collect();
                proptest::prop_assert_eq!(cache.text(), render_rows(&rows));
            }
        }
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(5), "5s");
        assert_eq!(format_duration(200), "3m 20s");
        assert_eq!(format_duration(7500), "2h 5m");
        assert_eq!(format_duration(97200), "1d 3h");
    }

    #[test]
    fn table_parses_back_into_its_cells() {
        let mut a = job(1, Status::Succeeded, Some("2026-11-28T10:01:00Z"));
        a.ended = Some("2026-11-28T10:03:20Z".into());
        a.name = "two  spaces, ünïcode".into();
        let b = job(12, Status::Pending, None);
        let now = Utc::now();
        let text = render(&[&a, &b], now, TimeStyle::Absolute);
        let rows = parse_table(&text).expect("our own header");
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0],
            row_cells(&b, now, TimeStyle::Absolute).map(Cow::<str>::Owned)
        );
        assert_eq!(
            rows[1],
            row_cells(&a, now, TimeStyle::Absolute).map(Cow::<str>::Owned)
        );
        let mut relative = Relative::new(now);
        for _ in 0..2 {
            assert_eq!(
                relative.cells(rows[1].clone()),
                row_cells(&a, now, TimeStyle::Relative).map(Cow::<str>::Owned)
            );
        }
        assert!(parse_table("NOT A QUEUE\n1 2 3\n").is_none());
    }

    #[test]
    fn cache_renders_like_render() {
        let a = job(1, Status::Succeeded, Some("2026-11-28T10:01:00Z"));
        let b = job(12, Status::Pending, None);
        let mut c = QueueCache::default();
        c.update(&a);
        c.update(&b);
        assert_eq!(c.text(), render(&[&a, &b], Utc::now(), TimeStyle::Absolute));
        assert!(c.text().lines().all(|l| l == l.trim_end()));
    }
}
