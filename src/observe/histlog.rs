//! `--hist-log FILE`: an HdrHistogram interval log of transit and turnaround, per direction.
//!
//! The standard format (`#[StartTime: ...]` header, a legend line, then one line per interval
//! and tag with a base64, DEFLATE-compressed V2 histogram), so HdrHistogram's log tools
//! (HistogramLogProcessor, the plotters that read .hlog) take it as it is. Tags are
//! `<vm>.<direction>.<figure>`, e.g. `one-7.c2l.turnaround`; values are nanoseconds.
//!
//! With `--kvmi` there is also one tag per message type in use, `<vm>.kvmi.<MESSAGE>` (the
//! close line's names: `one-7.kvmi.READ_PHYSICAL`, `one-7.kvmi.EVENT_PAUSE_VCPU`), holding the
//! command → reply or event → reply latency; a type's tag appears with the first interval that
//! saw it and is written in every interval after, empty or not. The names come from the ABI
//! table (and `unknown`), so the number of tags is bounded.
//!
//! Every interval writes all four tags, empty or not, so a reader sees a continuous timeline.
//! Samples of connections that closed during an interval are kept until its end. The file is
//! opened for appending and reopened on SIGHUP (logrotate's `create`/`postrotate` pattern);
//! a new, empty file gets the header again. A symlink at the path, a file owned by another user
//! or anything but a regular file is refused, at start and on reopening.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use crate::datapath::side::DIRECTION_NAMES;
use crate::kvmi::session::{FiguresByType, MessageType};
use crate::observe::metrics::{self, DirMetrics, Figures};

pub struct HistLog {
    path: PathBuf,
    file: File,
    interval: Duration,
    /// Wall-clock start, for the header; `started` is the same moment on the monotonic clock.
    start_wall: SystemTime,
    started: Instant,
    interval_began: Instant,
    /// Samples of connections that closed during the current interval.
    closed: [Figures; 2],
    tag_prefix: String,
    serializer: V2DeflateSerializer,
    /// `--kvmi`: the header says what the per-type tags are.
    kvmi: bool,
    /// `--kvmi`: each message type's samples of the current interval, taken from the sessions'
    /// figures (live ones at the tick, closed ones as they close); a type stays once seen.
    kvmi_types: BTreeMap<MessageType, Histogram<u64>>,
}

impl HistLog {
    /// `kvmi`: the relay runs with `--kvmi` (per message type tags).
    pub fn open(path: &Path, interval: Duration, name: &str, kvmi: bool, now: Instant) -> io::Result<HistLog> {
        let start_wall = SystemTime::now();
        let tag_prefix: String =
            name.chars().map(|c| if c == ',' || c == ' ' || c == '\r' || c == '\n' { '_' } else { c }).collect();
        let mut log = HistLog {
            path: path.to_path_buf(),
            file: open_append(path)?,
            interval,
            start_wall,
            started: now,
            interval_began: now,
            closed: [Figures::default(), Figures::default()],
            tag_prefix,
            serializer: V2DeflateSerializer::new(),
            kvmi,
            kvmi_types: BTreeMap::new(),
        };
        log.header_if_new()?;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When the current interval ends.
    pub fn next_tick(&self) -> Instant {
        self.interval_began + self.interval
    }

    /// Reopens the file (after rotation); a new file gets the header.
    pub fn reopen(&mut self) -> io::Result<()> {
        self.file = open_append(&self.path)?;
        self.header_if_new()
    }

    fn header_if_new(&mut self) -> io::Result<()> {
        if self.file.metadata()?.len() > 0 {
            return Ok(());
        }
        let mut buf = Vec::new();
        let mut builder = IntervalLogWriterBuilder::new();
        builder
            .add_comment("kvmi-relay interval log: transit and turnaround in nanoseconds")
            .add_comment("tags: <vm>.<l2c|c2l>.<transit|turnaround>; l2c = listen side (hypervisor) to connect side");
        if self.kvmi {
            builder.add_comment(
                "tags: <vm>.kvmi.<MESSAGE>: a command's latency to the first byte of its reply, EVENT_<NAME>: an event's to its reply",
            );
        }
        builder
            .with_start_time(self.start_wall)
            .with_base_time(self.start_wall)
            .with_max_value_divisor(1e6)
            .begin_log_with(&mut buf, &mut V2DeflateSerializer::new())?;
        buf.extend_from_slice(
            b"\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n",
        );
        self.file.write_all(&buf)
    }

    /// Keeps a closing connection's samples for the current interval.
    pub fn absorb(&mut self, metrics: &[DirMetrics; 2]) {
        for (d, m) in metrics.iter().enumerate() {
            if let Some(i) = &m.interval {
                self.closed[d].add(&i.transit_ns, &i.turnaround_ns);
            }
        }
    }

    /// Takes the interval samples of a session's per-type figures (resetting them): at a tick
    /// for live sessions, when a session closes, and before `stats --reset` clears them.
    pub fn take_kvmi(&mut self, figures: &mut FiguresByType) {
        for (t, f) in figures.iter_mut() {
            if let Some(i) = &mut f.interval_ns {
                let _ = self.kvmi_types.entry(*t).or_insert_with(metrics::time_histogram).add(&*i);
                i.reset();
            }
        }
    }

    /// Ends the interval: writes the sum of the closed connections' and the live ones' interval
    /// samples (resetting them) under the four tags.
    pub fn tick<'a>(&mut self, now: Instant, live: impl Iterator<Item = &'a mut [DirMetrics; 2]>) -> io::Result<()> {
        let mut sum = std::mem::take(&mut self.closed);
        for metrics in live {
            for (d, m) in metrics.iter_mut().enumerate() {
                if let Some(i) = &mut m.interval {
                    sum[d].add(&i.transit_ns, &i.turnaround_ns);
                    i.reset();
                }
            }
        }
        let start = self.interval_began.saturating_duration_since(self.started);
        let length = now.saturating_duration_since(self.interval_began);
        let mut buf = Vec::new();
        {
            let mut w = IntervalLogWriterBuilder::new()
                .with_max_value_divisor(1e6)
                .begin_log_with(&mut buf, &mut self.serializer)?;
            for (d, figures) in sum.iter().enumerate() {
                for (figure, h) in [("transit", &figures.transit_ns), ("turnaround", &figures.turnaround_ns)] {
                    let tag = format!("{}.{}.{figure}", self.tag_prefix, DIRECTION_NAMES[d]);
                    w.write_histogram(h, start, length, Tag::new(&tag))
                        .map_err(|e| io::Error::other(format!("{e:?}")))?;
                }
            }
            for (t, h) in &mut self.kvmi_types {
                let tag = format!("{}.kvmi.{t}", self.tag_prefix);
                w.write_histogram(h, start, length, Tag::new(&tag)).map_err(|e| io::Error::other(format!("{e:?}")))?;
                h.reset();
            }
        }
        // The builder writes a MaxValueDivisor comment each time; the header already has it.
        let body: Vec<u8> = buf
            .split(|&b| b == b'\n')
            .filter(|l| !l.starts_with(b"#"))
            .flat_map(|l| {
                let mut v = l.to_vec();
                if !v.is_empty() {
                    v.push(b'\n');
                }
                v
            })
            .collect();
        self.file.write_all(&body)?;
        self.interval_began = now;
        Ok(())
    }
}

/// Never through a planted symlink, never into another user's file (`files`).
fn open_append(path: &Path) -> io::Result<File> {
    crate::files::open_append_own(path)
}
