//! `--metrics-textfile DIR`: the instance's Prometheus text as `DIR/<name>.prom`, for
//! node_exporter's textfile collector, so one scrape of the host covers every relay on it.
//!
//! Invariants: a reader never sees a half-written file (written to a temporary name in the
//! same directory, then renamed over the old one); the temporary file is created exclusively
//! and without following a link, so a planted name is refused, never written through; the file
//! is removed when the instance stops (a stopped VM leaves no stale series). The HELP and TYPE
//! lines do not depend on the instance (the VM is a label), so the collector merges the files.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the file is rewritten.
pub const METRICS_TEXTFILE_INTERVAL_S: u64 = 10;

pub struct MetricsFile {
    path: PathBuf,
    tmp: PathBuf,
    next: Instant,
}

/// The file name for an instance: its name with anything but `[A-Za-z0-9._-]` made `_`, so a
/// name cannot reach another directory or hide from the collector's `*.prom` glob.
pub fn file_name(instance: &str) -> String {
    let safe: String =
        instance.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    format!("kvmi-relay-{safe}.prom")
}

impl MetricsFile {
    /// The first write is due at once.
    pub fn new(dir: &Path, instance: &str, now: Instant) -> MetricsFile {
        let name = file_name(instance);
        MetricsFile { path: dir.join(&name), tmp: dir.join(format!(".{name}.tmp")), next: now }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn next_tick(&self) -> Instant {
        self.next
    }

    /// Replaces the file with `text`; the next write is due an interval later.
    pub fn write(&mut self, text: &str, now: Instant) -> io::Result<()> {
        self.next = now + Duration::from_secs(METRICS_TEXTFILE_INTERVAL_S);
        // A temporary file left by a killed instance goes first (unlinking a link removes the link).
        match std::fs::remove_file(&self.tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.tmp)?;
        f.write_all(text.as_bytes())?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path)
    }
}

impl Drop for MetricsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_leave_the_directory_or_the_glob() {
        assert_eq!(file_name("one-7"), "kvmi-relay-one-7.prom");
        assert_eq!(file_name("../etc/x\n"), "kvmi-relay-.._etc_x_.prom");
    }
}
