//! What the relay tells operators and researchers: a snapshot of the live connections and the
//! totals, rendered as a table for people, JSON for scripts, or Prometheus text for scrapers.
//!
//! Pure functions of a `Snapshot`, so every format is tested without sockets. Latency values are
//! nanoseconds in the snapshot and JSON, microseconds in the table, seconds in Prometheus (its
//! convention). Percentiles come from HDR histograms with 1 % resolution (see `observe::metrics`).

use std::fmt::{self, Write as _};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::datapath::pump::DirStats;
use crate::datapath::side::{DIRECTION_NAMES, SIDE_NAMES};
use crate::escape::Escaped;
use crate::observe::totals::Totals;

/// Prometheus histogram bucket bounds, seconds: 1 µs to 10 s.
pub const PROMETHEUS_BUCKETS_S: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub name: String,
    pub pid: u32,
    pub uptime_s: f64,
    pub listen: String,
    pub connect: String,
    pub live: usize,
    pub max_conns: usize,
    pub totals: Totals,
    pub connections: Vec<ConnSnap>,
    /// Every session since start (or the last reset), live and closed, per direction.
    pub all_sessions: [DirSnap; 2],
    /// `--kvmi`: the VM and the figures per message type (every session since start or reset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvmi: Option<KvmiSnap>,
    /// `--tls-*`: the own certificate's expiry, the refused handshakes by reason and the time
    /// of those that passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSnap>,
}

/// `--tls-*`: what an operator watches.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TlsSnap {
    /// The own certificate's notAfter, seconds since the epoch, and as UTC text.
    pub cert_not_after_unix: u64,
    pub cert_not_after: String,
    /// Every reason, refused handshakes since start (or the last reset).
    pub refused: Vec<(String, u64)>,
    /// Each side that speaks TLS, listen first: the handshakes that passed since start (or the
    /// last reset) and how long they took.
    pub handshakes: Vec<HandshakeSnap>,
}

/// One TLS side's handshakes that passed: from the start of the handshake phase to the peer
/// verified (docs/DESIGN.md, "Latency figures").
#[derive(Debug, Clone, Serialize)]
pub struct HandshakeSnap {
    /// `listen` or `connect` (`SIDE_NAMES`).
    pub side: &'static str,
    pub time_ns: HistSnap,
}

impl HandshakeSnap {
    /// One per side that speaks TLS (`tls[side]`), from the totals' histograms (None: no
    /// handshake has passed since start or reset).
    pub fn of(tls: [bool; 2], times: Option<&[Histogram<u64>; 2]>) -> Vec<HandshakeSnap> {
        (0..2)
            .filter(|&side| tls[side])
            .map(|side| HandshakeSnap {
                side: SIDE_NAMES[side],
                time_ns: times.map_or_else(HistSnap::default, |h| HistSnap::of_time(&h[side])),
            })
            .collect()
    }
}

/// `--kvmi`: which VM the sessions carried and what each message type cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KvmiSnap {
    /// From the VM's handshake (the live session's, else the last one's), already escaped
    /// (printable ASCII only); `-` before any.
    pub vm_name: String,
    pub vm_uuid: String,
    /// One entry per message type seen, commands first, each kind by name.
    pub messages: Vec<MessageSnap>,
}

/// One message type's figures.
#[derive(Debug, Clone, Serialize)]
pub struct MessageSnap {
    /// `command` or `event`.
    pub kind: &'static str,
    /// The ABI table's name, or `unknown`: a bounded set, safe as a metric label.
    pub message: &'static str,
    /// Commands forwarded, or events forwarded.
    pub count: u64,
    /// Requests and replies, or events and replies.
    pub bytes: u64,
    /// Commands the relay answered with EPERM, or event replies it replaced.
    pub denied: u64,
    /// Command → first byte of its reply, or event → its reply.
    pub latency_ns: HistSnap,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnSnap {
    pub id: u64,
    pub peer: String,
    pub age_s: f64,
    pub directions: [DirSnap; 2],
    /// `--kvmi`: this session's VM and its figures per message type so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvmi: Option<KvmiSnap>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DirSnap {
    pub direction: &'static str,
    pub bytes: u64,
    pub splice_bytes: u64,
    pub copy_bytes: u64,
    pub chunks: u64,
    pub high_water_bytes: usize,
    pub transit_ns: HistSnap,
    pub turnaround_ns: HistSnap,
    pub chunk_bytes: HistSnap,
}

impl DirSnap {
    /// One direction's figures: of one session, or of many folded together.
    pub fn of(
        d: usize,
        stats: &DirStats,
        transit: &Histogram<u64>,
        turnaround: &Histogram<u64>,
        chunks: &Histogram<u64>,
    ) -> DirSnap {
        DirSnap {
            direction: DIRECTION_NAMES[d],
            bytes: stats.bytes,
            splice_bytes: stats.splice_bytes,
            copy_bytes: stats.copy_bytes,
            chunks: stats.chunks,
            high_water_bytes: stats.high_water_bytes,
            transit_ns: HistSnap::of_time(transit),
            turnaround_ns: HistSnap::of_time(turnaround),
            chunk_bytes: HistSnap::of(chunks),
        }
    }
}

/// As a log line's fields: `l2c_bytes=… l2c_splice_bytes=… l2c_copy_bytes=… l2c_chunks=…
/// l2c_high_water=… l2c_transit_us=p50/p90/p99/p99.9/max l2c_turnaround_us=…` (`-` for a
/// histogram with no samples). A session's close line and its `live` line print this.
impl fmt::Display for DirSnap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.direction;
        write!(
            f,
            "{d}_bytes={} {d}_splice_bytes={} {d}_copy_bytes={} {d}_chunks={} {d}_high_water={} {d}_transit_us={} {d}_turnaround_us={}",
            self.bytes,
            self.splice_bytes,
            self.copy_bytes,
            self.chunks,
            self.high_water_bytes,
            PercentilesUs(&self.transit_ns),
            PercentilesUs(&self.turnaround_ns)
        )
    }
}

/// Both directions, l2c first, as log fields.
pub struct Directions<'a>(pub &'a [DirSnap; 2]);

impl fmt::Display for Directions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0[0], self.0[1])
    }
}

/// A session's close line, after `closed `: how it ended (`end="finished"`), how long it
/// lasted, both directions (`Directions`), then the VM it was pinned to and, with `--kvmi`, its
/// messages by type (`-` when there is none).
pub struct Closed<'a> {
    pub end: &'static str,
    pub duration_ms: u64,
    pub directions: &'a [DirSnap; 2],
    pub vm_name: &'a str,
    pub vm_uuid: &'a str,
    pub kvmi_messages: &'a str,
}

impl fmt::Display for Closed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "end=\"{}\" duration_ms={} {} vm_name={} vm_uuid={} kvmi_messages={}",
            self.end,
            self.duration_ms,
            Directions(self.directions),
            self.vm_name,
            self.vm_uuid,
            self.kvmi_messages
        )
    }
}

/// A nanosecond histogram's p50/p90/p99/p99.9/max in µs, or `-` when it has no samples.
struct PercentilesUs<'a>(&'a HistSnap);

impl fmt::Display for PercentilesUs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = self.0;
        if h.count == 0 {
            return f.write_str("-");
        }
        let us = |v: u64| v as f64 / 1000.0;
        write!(f, "{:.1}/{:.1}/{:.1}/{:.1}/{:.1}", us(h.p50), us(h.p90), us(h.p99), us(h.p999), us(h.max))
    }
}

/// A histogram's summary, and its cumulative Prometheus buckets.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HistSnap {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    /// Cumulative counts at each of `PROMETHEUS_BUCKETS_S` (time histograms only).
    #[serde(skip)]
    pub buckets: Vec<u64>,
}

impl HistSnap {
    pub fn of(h: &Histogram<u64>) -> HistSnap {
        if h.is_empty() {
            return HistSnap::default();
        }
        HistSnap {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            buckets: Vec::new(),
        }
    }

    /// With cumulative bucket counts for a nanosecond histogram.
    pub fn of_time(h: &Histogram<u64>) -> HistSnap {
        let mut s = HistSnap::of(h);
        s.buckets = PROMETHEUS_BUCKETS_S.iter().map(|&le| h.count_between(0, (le * 1e9) as u64)).collect();
        s
    }
}

/// The table a person reads.
pub fn text(s: &Snapshot) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "kvmi-relay {}: {} -> {}  (pid {}, up {:.0} s, {}/{} sessions)",
        Escaped(&s.name),
        Escaped(&s.listen),
        Escaped(&s.connect),
        s.pid,
        s.uptime_s,
        s.live,
        s.max_conns
    );
    let t = &s.totals;
    let _ = writeln!(
        o,
        "peers: {} admitted, {} refused by policy, {} refused (--max-conns), {} dial failures, {} failed, {} replaced, {} closed",
        t.admitted, t.refused_access, t.refused_busy, t.dial_failed, t.failed, t.replaced, t.closed
    );
    if t.control_refused > 0 {
        let by: Vec<String> = crate::observe::totals::Refusal::ALL
            .iter()
            .zip(t.control_refusals)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{n} {}", r.as_str()))
            .collect();
        let _ = writeln!(o, "control socket: {} clients turned away ({})", t.control_refused, by.join(", "));
    }
    if t.control_evicted > 0 {
        let _ = writeln!(o, "control socket: {} silent clients evicted for newcomers", t.control_evicted);
    }
    if let Some(tls) = &s.tls {
        let refused: Vec<String> =
            tls.refused.iter().filter(|(_, n)| *n > 0).map(|(r, n)| format!("{n} {r}")).collect();
        let refused = if refused.is_empty() { "none".to_string() } else { refused.join(", ") };
        let _ = writeln!(o, "tls: own certificate valid until {}; refused handshakes: {refused}", tls.cert_not_after);
        let passed: Vec<String> =
            tls.handshakes.iter().map(|h| format!("{} side {}", h.side, pcts_us(&h.time_ns))).collect();
        let _ = writeln!(o, "tls handshakes in µs as p50/p90/p99/p99.9/max (count): {}", passed.join("; "));
    }
    let _ = writeln!(o, "latency in µs as p50/p90/p99/p99.9/max (count)");
    let _ = writeln!(
        o,
        "\n{:<6} {:<34} {:>8} {:<4} {:>12} {:>7} {:<36} {:<36}",
        "conn", "peer", "age", "dir", "bytes", "splice", "transit (relay)", "turnaround (far side)"
    );
    let row = |o: &mut String, id: &str, peer: &str, age: &str, d: &DirSnap| {
        let splice = if d.bytes == 0 {
            "-".to_string()
        } else {
            format!("{:.0}%", 100.0 * d.splice_bytes as f64 / d.bytes as f64)
        };
        let _ = writeln!(
            o,
            "{:<6} {:<34} {:>8} {:<4} {:>12} {:>7} {:<36} {:<36}",
            id,
            peer,
            age,
            d.direction,
            d.bytes,
            splice,
            pcts_us(&d.transit_ns),
            pcts_us(&d.turnaround_ns)
        );
    };
    for c in &s.connections {
        row(&mut o, &c.id.to_string(), &c.peer, &format!("{:.1}s", c.age_s), &c.directions[0]);
        row(&mut o, "", "", "", &c.directions[1]);
    }
    if s.connections.is_empty() {
        let _ = writeln!(o, "(no live sessions)");
    }
    row(&mut o, "all", "every session since start or reset", "", &s.all_sessions[0]);
    row(&mut o, "", "", "", &s.all_sessions[1]);
    for c in &s.connections {
        if let Some(k) = &c.kvmi {
            kvmi_text(&mut o, &format!("session {}", c.id), k);
        }
    }
    if let Some(k) = &s.kvmi {
        kvmi_text(&mut o, "every session since start or reset", k);
    }
    o
}

fn kvmi_text(o: &mut String, whose: &str, k: &KvmiSnap) {
    let _ = writeln!(o, "\nKVMi: vm {} ({}); {whose}; latency: command -> reply, event -> reply", k.vm_name, k.vm_uuid);
    let _ = writeln!(
        o,
        "{:<7} {:<26} {:>10} {:>8} {:>12} {:<36}",
        "kind", "message", "count", "denied", "bytes", "latency"
    );
    for m in &k.messages {
        let _ = writeln!(
            o,
            "{:<7} {:<26} {:>10} {:>8} {:>12} {:<36}",
            m.kind,
            m.message,
            m.count,
            m.denied,
            m.bytes,
            pcts_us(&m.latency_ns)
        );
    }
    if k.messages.is_empty() {
        let _ = writeln!(o, "(no KVMi messages yet)");
    }
}

fn pcts_us(h: &HistSnap) -> String {
    if h.count == 0 {
        return "-".into();
    }
    format!("{} ({})", PercentilesUs(h), h.count)
}

pub fn json(s: &Snapshot) -> String {
    serde_json::to_string_pretty(s).expect("a snapshot always serializes") + "\n"
}

/// Escapes a Prometheus label value: backslash, double quote and newline.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The Prometheus text exposition format (version 0.0.4).
pub fn prometheus(s: &Snapshot) -> String {
    let vm = label(&s.name);
    let mut o = String::new();
    let _ = writeln!(o, "# HELP kvmi_relay_sessions Sessions being relayed now.");
    let _ = writeln!(o, "# TYPE kvmi_relay_sessions gauge");
    let _ = writeln!(o, "kvmi_relay_sessions{{vm=\"{vm}\"}} {}", s.live);
    let _ = writeln!(o, "# HELP kvmi_relay_max_sessions The --max-conns limit.");
    let _ = writeln!(o, "# TYPE kvmi_relay_max_sessions gauge");
    let _ = writeln!(o, "kvmi_relay_max_sessions{{vm=\"{vm}\"}} {}", s.max_conns);
    let _ = writeln!(o, "# HELP kvmi_relay_peers_total Peers accepted on the listener, by what became of them.");
    let _ = writeln!(o, "# TYPE kvmi_relay_peers_total counter");
    let t = &s.totals;
    for (outcome, n) in [
        ("admitted", t.admitted),
        ("refused_policy", t.refused_access),
        ("refused_busy", t.refused_busy),
        ("dial_failed", t.dial_failed),
    ] {
        let _ = writeln!(o, "kvmi_relay_peers_total{{vm=\"{vm}\",outcome=\"{outcome}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP kvmi_relay_sessions_replaced_total Sessions closed for a newer one admitted over --max-conns (--replace-after-ms)."
    );
    let _ = writeln!(o, "# TYPE kvmi_relay_sessions_replaced_total counter");
    let _ = writeln!(o, "kvmi_relay_sessions_replaced_total{{vm=\"{vm}\"}} {}", t.replaced);
    let _ = writeln!(
        o,
        "# HELP kvmi_relay_control_refused_total Control-socket clients turned away, by reason (uid: not the relay's uid nor root; busy: too many at once; no_identity: SO_PEERCRED failed; setup: the socket could not be set up)."
    );
    let _ = writeln!(o, "# TYPE kvmi_relay_control_refused_total counter");
    for (r, n) in crate::observe::totals::Refusal::ALL.iter().zip(t.control_refusals) {
        let _ = writeln!(o, "kvmi_relay_control_refused_total{{vm=\"{vm}\",reason=\"{}\"}} {n}", r.as_str());
    }
    let _ = writeln!(
        o,
        "# HELP kvmi_relay_control_evicted_total Control-socket clients closed before they asked anything, to serve a newcomer while every slot was taken."
    );
    let _ = writeln!(o, "# TYPE kvmi_relay_control_evicted_total counter");
    let _ = writeln!(o, "kvmi_relay_control_evicted_total{{vm=\"{vm}\"}} {}", t.control_evicted);
    let _ = writeln!(o, "# HELP kvmi_relay_sessions_failed_total Sessions torn down by an error (reset, broken pipe).");
    let _ = writeln!(o, "# TYPE kvmi_relay_sessions_failed_total counter");
    let _ = writeln!(o, "kvmi_relay_sessions_failed_total{{vm=\"{vm}\"}} {}", t.failed);
    let _ = writeln!(
        o,
        "# HELP kvmi_relay_poll_window_suspensions_total Poll window suspended: its yields kept losing the CPU to another thread."
    );
    let _ = writeln!(o, "# TYPE kvmi_relay_poll_window_suspensions_total counter");
    let _ = writeln!(o, "kvmi_relay_poll_window_suspensions_total{{vm=\"{vm}\"}} {}", t.poll_window_suspensions);
    let _ = writeln!(o, "# HELP kvmi_relay_bytes_total Bytes delivered, per direction and per way they moved.");
    let _ = writeln!(o, "# TYPE kvmi_relay_bytes_total counter");
    for d in &s.all_sessions {
        for (strategy, n) in [("splice", d.splice_bytes), ("copy", d.copy_bytes)] {
            let _ = writeln!(
                o,
                "kvmi_relay_bytes_total{{vm=\"{vm}\",direction=\"{}\",strategy=\"{strategy}\"}} {n}",
                d.direction
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP kvmi_relay_latency_seconds transit: time bytes spend in the relay; turnaround: the far side's response time as the relay sees it."
    );
    let _ = writeln!(o, "# TYPE kvmi_relay_latency_seconds histogram");
    for d in &s.all_sessions {
        for (figure, h) in [("transit", &d.transit_ns), ("turnaround", &d.turnaround_ns)] {
            let labels = format!("vm=\"{vm}\",direction=\"{}\",figure=\"{figure}\"", d.direction);
            histogram_samples(&mut o, "kvmi_relay_latency_seconds", &labels, h);
        }
    }
    if let Some(tls) = &s.tls {
        let _ = writeln!(
            o,
            "# HELP kvmi_relay_tls_cert_not_after_seconds The relay's own certificate's notAfter (Unix time)."
        );
        let _ = writeln!(o, "# TYPE kvmi_relay_tls_cert_not_after_seconds gauge");
        let _ = writeln!(o, "kvmi_relay_tls_cert_not_after_seconds{{vm=\"{vm}\"}} {}", tls.cert_not_after_unix);
        let _ = writeln!(o, "# HELP kvmi_relay_tls_refused_total TLS handshakes refused, by reason.");
        let _ = writeln!(o, "# TYPE kvmi_relay_tls_refused_total counter");
        for (reason, n) in &tls.refused {
            let _ = writeln!(o, "kvmi_relay_tls_refused_total{{vm=\"{vm}\",reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "# HELP kvmi_relay_tls_handshake_seconds TLS handshakes that passed, per side: from the start of the handshake to the peer verified."
        );
        let _ = writeln!(o, "# TYPE kvmi_relay_tls_handshake_seconds histogram");
        for h in &tls.handshakes {
            let labels = format!("vm=\"{vm}\",side=\"{}\"", h.side);
            histogram_samples(&mut o, "kvmi_relay_tls_handshake_seconds", &labels, &h.time_ns);
        }
    }
    if let Some(k) = &s.kvmi {
        kvmi_prometheus(&mut o, &vm, t, k);
    }
    o
}

/// `--kvmi` families; `message` takes only the ABI table's names and `unknown`.
fn kvmi_prometheus(o: &mut String, vm: &str, t: &Totals, k: &KvmiSnap) {
    let _ = writeln!(
        o,
        "# HELP kvmi_relay_kvmi_refused_handshakes_total VM handshakes refused (wrong VM, bad size, none in time)."
    );
    let _ = writeln!(o, "# TYPE kvmi_relay_kvmi_refused_handshakes_total counter");
    let _ = writeln!(o, "kvmi_relay_kvmi_refused_handshakes_total{{vm=\"{vm}\"}} {}", t.refused_handshake);
    let _ = writeln!(o, "# HELP kvmi_relay_kvmi_malformed_total Sessions closed for a malformed KVMi stream.");
    let _ = writeln!(o, "# TYPE kvmi_relay_kvmi_malformed_total counter");
    let _ = writeln!(o, "kvmi_relay_kvmi_malformed_total{{vm=\"{vm}\"}} {}", t.kvmi_malformed);
    let ident = format!("vm=\"{vm}\",vm_name=\"{}\",vm_uuid=\"{}\"", label(&k.vm_name), label(&k.vm_uuid));
    let per = |m: &MessageSnap| format!("{ident},kind=\"{}\",message=\"{}\"", m.kind, label(m.message));
    for (family, help, value) in [
        (
            "kvmi_relay_kvmi_messages_total",
            "KVMi commands or events forwarded, per message type.",
            (|m: &MessageSnap| m.count) as fn(&MessageSnap) -> u64,
        ),
        (
            "kvmi_relay_kvmi_denied_total",
            "Commands answered by the relay (EPERM) or event replies it replaced, per message type.",
            |m| m.denied,
        ),
        ("kvmi_relay_kvmi_bytes_total", "Bytes of KVMi messages and their replies, per message type.", |m| m.bytes),
    ] {
        let _ = writeln!(o, "# HELP {family} {help}");
        let _ = writeln!(o, "# TYPE {family} counter");
        for m in &k.messages {
            let _ = writeln!(o, "{family}{{{}}} {}", per(m), value(m));
        }
    }
    let _ = writeln!(
        o,
        "# HELP kvmi_relay_kvmi_latency_seconds Command to the first byte of its reply, or event to its reply (the vCPU stood still), as the relay saw it."
    );
    let _ = writeln!(o, "# TYPE kvmi_relay_kvmi_latency_seconds histogram");
    for m in &k.messages {
        histogram_samples(o, "kvmi_relay_kvmi_latency_seconds", &per(m), &m.latency_ns);
    }
}

/// One series of a histogram family in seconds from a nanosecond `HistSnap`: its cumulative
/// buckets at `PROMETHEUS_BUCKETS_S`, `+Inf`, sum and count.
fn histogram_samples(o: &mut String, family: &str, labels: &str, h: &HistSnap) {
    for (i, le) in PROMETHEUS_BUCKETS_S.iter().enumerate() {
        let n = h.buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(o, "{family}_bucket{{{labels},le=\"{le:e}\"}} {n}");
    }
    let _ = writeln!(o, "{family}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(o, "{family}_sum{{{labels}}} {:e}", h.mean * h.count as f64 / 1e9);
    let _ = writeln!(o, "{family}_count{{{labels}}} {}", h.count);
}

/// Checks text against the exposition-format grammar as far as a scraper relies on it: metric
/// and label names, label syntax and escaping, numeric values, one TYPE per family given before
/// its samples, and histogram buckets rising in bound and in count. The unit tests' quick check;
/// the integration tests run `promtool check metrics` on the real output.
#[cfg(test)]
fn lint_prometheus(text: &str) -> Result<(), String> {
    let name_ok = |n: &str| {
        let mut c = n.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    };
    let mut typed = std::collections::HashMap::new();
    let mut last_bucket: Option<(String, f64, u64)> = None;
    for line in text.lines() {
        let bad = |why: &str| Err(format!("{why}: {line}"));
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if !name_ok(rest.split(' ').next().unwrap_or("")) {
                return bad("HELP for a bad name");
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split(' ');
            let (n, t) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
            if !name_ok(n) || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                return bad("bad TYPE line");
            }
            if typed.insert(n.to_string(), t.to_string()).is_some() {
                return bad("TYPE given twice");
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else { return bad("no value") };
        let value: f64 = match value.parse() {
            Ok(v) => v,
            Err(_) => return bad("value is not a number"),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => match l.strip_suffix('}') {
                Some(l) => (n, l),
                None => return bad("unclosed labels"),
            },
            None => (series, ""),
        };
        if !name_ok(name) {
            return bad("bad metric name");
        }
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        if !typed.contains_key(name) && !typed.contains_key(family) {
            return bad("sample before its TYPE");
        }
        let mut rest = labels;
        let mut le = None;
        let mut others = String::new();
        while !rest.is_empty() {
            let Some((k, after)) = rest.split_once("=\"") else { return bad("label syntax") };
            if !name_ok(k) {
                return bad("bad label name");
            }
            let b = after.as_bytes();
            let mut end = 0;
            while end < b.len() && b[end] != b'"' {
                end += if b[end] == b'\\' { 2 } else { 1 };
            }
            if end >= b.len() {
                return bad("unterminated label value");
            }
            if k == "le" {
                le = Some(&after[..end]);
            } else {
                others.push_str(&rest[..k.len() + 2 + end + 1]);
            }
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        if name.ends_with("_bucket") {
            let Some(le) = le else { return bad("bucket without le") };
            let bound =
                if le == "+Inf" { f64::INFINITY } else { le.parse::<f64>().map_err(|_| format!("bad le: {line}"))? };
            let key = format!("{family}{{{others}}}");
            if let Some((k, b, c)) = &last_bucket {
                if *k == key && !(bound > *b && value as u64 >= *c) {
                    return bad("buckets must rise in bound and count");
                }
            }
            last_bucket = Some((key, bound, value as u64));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::metrics::time_histogram;

    fn dir(name: &'static str, samples_ns: &[u64]) -> DirSnap {
        let mut h = time_histogram();
        for &v in samples_ns {
            h.record(v).unwrap();
        }
        DirSnap {
            direction: name,
            bytes: 100,
            splice_bytes: 100,
            copy_bytes: 0,
            chunks: 2,
            high_water_bytes: 64,
            transit_ns: HistSnap::of_time(&h),
            turnaround_ns: HistSnap::of_time(&h),
            chunk_bytes: HistSnap::default(),
        }
    }

    pub(crate) fn sample() -> Snapshot {
        Snapshot {
            name: "one-\"7\"".into(),
            pid: 42,
            uptime_s: 3.0,
            listen: "unix:/run/kvmi/one-7.sock".into(),
            connect: "tcp:203.0.113.9:7".into(),
            live: 1,
            max_conns: 1,
            totals: Totals { admitted: 3, refused_access: 2, ..Totals::default() },
            connections: vec![ConnSnap {
                id: 1,
                peer: "unix pid=1 uid=0 gid=0".into(),
                age_s: 1.5,
                directions: [dir("l2c", &[5_000, 7_000, 2_000_000]), dir("c2l", &[])],
                kvmi: None,
            }],
            all_sessions: [dir("l2c", &[5_000, 7_000, 2_000_000]), dir("c2l", &[])],
            kvmi: None,
            tls: None,
        }
    }

    fn with_kvmi() -> Snapshot {
        let mut h = time_histogram();
        h.record(30_000).unwrap();
        let msg = |kind, message, count, denied| MessageSnap {
            kind,
            message,
            count,
            bytes: 4136 * count,
            denied,
            latency_ns: HistSnap::of_time(&h),
        };
        Snapshot {
            kvmi: Some(KvmiSnap {
                vm_name: "one-\\x1b\"7".into(),
                vm_uuid: "6b766d69-2d72-656c-6179-2d66616b6521".into(),
                messages: vec![
                    msg("command", "READ_PHYSICAL", 3, 0),
                    msg("command", "WRITE_PHYSICAL", 0, 2),
                    msg("event", "PAUSE_VCPU", 1, 0),
                ],
            }),
            ..sample()
        }
    }

    #[test]
    fn the_close_line_is_one_key_value_field_per_figure() {
        let dirs = [dir("l2c", &[1000, 2000]), dir("c2l", &[])];
        let closed = Closed {
            end: "finished",
            duration_ms: 7,
            directions: &dirs,
            vm_name: "one-7",
            vm_uuid: "-",
            kvmi_messages: "-",
        };
        let line = closed.to_string();
        assert!(line.starts_with("end=\"finished\" duration_ms=7 l2c_bytes=100 l2c_splice_bytes=100 "), "{line}");
        let fields: Vec<(&str, &str)> = line.split(' ').map(|kv| kv.split_once('=').expect(kv)).collect();
        let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
        for d in ["l2c", "c2l"] {
            for k in ["bytes", "splice_bytes", "copy_bytes", "chunks", "high_water", "transit_us", "turnaround_us"] {
                assert_eq!(keys.iter().filter(|&&key| key == format!("{d}_{k}")).count(), 1, "{d}_{k} once: {line}");
            }
        }
        let value = |k: &str| fields.iter().find(|(key, _)| *key == k).unwrap().1;
        assert_eq!(value("l2c_transit_us"), "1.0/2.0/2.0/2.0/2.0");
        assert_eq!(value("c2l_turnaround_us"), "-", "no samples, no numbers");
        assert_eq!(value("vm_name"), "one-7");
        // The live line is the directions alone, the same fields.
        assert!(line.contains(&Directions(&dirs).to_string()));
    }

    #[test]
    fn text_names_every_connection_and_figure() {
        let t = text(&sample());
        assert!(t.contains("unix pid=1 uid=0 gid=0"), "{t}");
        assert!(t.contains("l2c") && t.contains("c2l"));
        assert!(t.contains("2 refused by policy"));
        assert!(t.contains("(3)"), "sample counts are shown: {t}");
    }

    #[test]
    fn text_escapes_the_names_an_operator_chose() {
        let mut s = sample();
        s.name = "vm\nkvmi-relay fake: \x1b[2J".into();
        s.listen = "unix:/run/a\rb.sock".into();
        let t = text(&s);
        assert!(t.lines().next().unwrap().contains("vm\\nkvmi-relay fake: \\u{1b}[2J"), "{t}");
        assert!(t.contains("unix:/run/a\\rb.sock"), "{t}");
        assert!(!t.lines().any(|l| l.chars().any(char::is_control)), "{t}");
    }

    #[test]
    fn json_round_trips_through_a_parser() {
        let v: serde_json::Value = serde_json::from_str(&json(&sample())).unwrap();
        assert_eq!(v["connections"][0]["directions"][0]["transit_ns"]["count"], 3);
        assert_eq!(v["totals"]["refused_access"], 2);
    }

    #[test]
    fn the_lint_catches_what_a_scraper_would_choke_on() {
        assert!(lint_prometheus("# TYPE a counter\na 1\n").is_ok());
        assert!(lint_prometheus("a 1\n").is_err(), "sample before TYPE");
        assert!(lint_prometheus("# TYPE a counter\na{b=\"1} 1\n").is_err(), "unterminated label");
        assert!(lint_prometheus("# TYPE 1a counter\n").is_err(), "bad name");
        let falling = "# TYPE h histogram\nh_bucket{le=\"1\"} 5\nh_bucket{le=\"2\"} 4\n";
        assert!(lint_prometheus(falling).is_err(), "falling bucket counts");
    }

    #[test]
    fn kvmi_figures_appear_in_every_format() {
        let s = with_kvmi();
        let t = text(&s);
        assert!(t.contains("6b766d69-2d72-656c-6179-2d66616b6521"), "{t}");
        assert!(
            t.lines().any(|l| l.starts_with("command") && l.contains("WRITE_PHYSICAL") && l.contains(" 2 ")),
            "{t}"
        );
        let v: serde_json::Value = serde_json::from_str(&json(&s)).unwrap();
        assert_eq!(v["kvmi"]["messages"][1]["message"], "WRITE_PHYSICAL");
        assert_eq!(v["kvmi"]["messages"][1]["denied"], 2);
        assert_eq!(v["kvmi"]["messages"][2]["kind"], "event");
        let p = prometheus(&s);
        lint_prometheus(&p).unwrap();
        assert!(p.contains("kvmi_relay_kvmi_denied_total{vm=\"one-\\\"7\\\"\",vm_name=\"one-\\\\x1b\\\"7\",vm_uuid=\"6b766d69-2d72-656c-6179-2d66616b6521\",kind=\"command\",message=\"WRITE_PHYSICAL\"} 2"), "{p}");
        assert!(p.contains("kind=\"event\",message=\"PAUSE_VCPU\",le=\"5e-5\"} 1"), "{p}");
        // Without --kvmi none of it.
        assert!(!prometheus(&sample()).contains("kvmi_relay_kvmi_"));
        assert!(json(&sample()).find("\"kvmi\"").is_none());
    }

    #[test]
    fn tls_handshake_times_appear_in_every_format() {
        let mut times = [time_histogram(), time_histogram()];
        for v in [900_000, 1_100_000, 30_000_000] {
            times[0].record(v).unwrap();
        }
        let s = Snapshot {
            tls: Some(TlsSnap {
                cert_not_after_unix: 4_070_908_800,
                cert_not_after: "2099-01-01 00:00:00 UTC".into(),
                refused: vec![("not_tls".into(), 1)],
                // A listener speaking TLS, dialling plain: no connect side.
                handshakes: HandshakeSnap::of([true, false], Some(&times)),
            }),
            ..sample()
        };
        let t = text(&s);
        let line = t.lines().find(|l| l.starts_with("tls handshakes in µs")).unwrap_or_else(|| panic!("{t}"));
        assert!(line.ends_with(": listen side 1105.9/30015.5/30015.5/30015.5/30015.5 (3)"), "{line}");
        assert!(!t.contains("connect side"), "{t}");
        let v: serde_json::Value = serde_json::from_str(&json(&s)).unwrap();
        assert_eq!(v["tls"]["handshakes"][0]["side"], "listen");
        assert_eq!(v["tls"]["handshakes"][0]["time_ns"]["count"], 3);
        assert_eq!(v["tls"]["handshakes"].as_array().unwrap().len(), 1);
        let p = prometheus(&s);
        lint_prometheus(&p).unwrap();
        let series = "kvmi_relay_tls_handshake_seconds_bucket{vm=\"one-\\\"7\\\"\",side=\"listen\"";
        assert!(p.contains(&format!("{series},le=\"1e-3\"}} 1")), "{p}");
        assert!(p.contains(&format!("{series},le=\"5e-2\"}} 3")), "{p}");
        assert!(p.contains("kvmi_relay_tls_handshake_seconds_count{vm=\"one-\\\"7\\\"\",side=\"listen\"} 3"), "{p}");
        assert!(!p.contains("side=\"connect\""), "{p}");
        // Before any handshake passed: the family is there, at zero.
        let none = Snapshot {
            tls: Some(TlsSnap { handshakes: HandshakeSnap::of([true, true], None), ..TlsSnap::default() }),
            ..sample()
        };
        let p = prometheus(&none);
        lint_prometheus(&p).unwrap();
        assert!(p.contains("kvmi_relay_tls_handshake_seconds_count{vm=\"one-\\\"7\\\"\",side=\"connect\"} 0"), "{p}");
        assert!(text(&none).contains("listen side -; connect side -"), "{}", text(&none));
    }

    #[test]
    fn prometheus_follows_the_exposition_grammar() {
        let p = prometheus(&sample());
        lint_prometheus(&p).unwrap();
        assert!(p.contains("vm=\"one-\\\"7\\\"\""), "label values are escaped: {p}");
        assert!(p.contains(
            "kvmi_relay_latency_seconds_bucket{vm=\"one-\\\"7\\\"\",direction=\"l2c\",figure=\"transit\",le=\"1e-5\"} 2"
        ));
        assert!(p.contains("direction=\"l2c\",figure=\"transit\",le=\"+Inf\"} 3"));
    }
}
