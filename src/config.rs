//! The border between the command line and the relay: `Config::try_from(RelayArgs)`.
//!
//! Every value is checked here, before anything is bound or created, and every problem is
//! reported (not only the first) as one line naming the flag and its environment variable.
//! `unknown_variables` checks the environment itself: a `KVMI_RELAY_*` variable that no flag
//! reads is a mistake (a typo in an `EnvironmentFile=`), reported with the known name closest
//! to it. The known names are read from the clap definition, never kept by hand. `--check`
//! runs exactly this and nothing else.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use nix::unistd::{Group, Uid, User};

use crate::access::{self, Policy};
use crate::cli::{KvmiAbiArg, KvmiPolicyArg, KvmiUnknownArg, MoveArg, RelayArgs, SideArg};
use crate::escape::Escaped;
use crate::kvmi;
use crate::net::endpoint::{Endpoint, UNIX_PATH_MAX_BYTES, VSOCK_CID_ANY};
use crate::tls;

/// Smallest and largest pipe size accepted for `--pipe-size`.
const PIPE_SIZE_MIN_BYTES: usize = 4096;
const PIPE_SIZE_MAX_BYTES: usize = 16 << 20;

/// How the directions move bytes (`--move`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveMode {
    /// Into a TCP socket copies: on loopback a spliced TCP segment carries at most 17 pipe
    /// pages, while copies let TCP build segments several times that size; the per-segment
    /// cost (wake-ups, softirq) then dominates (docs/BENCHMARKS.md, bulk). Into UNIX and vsock
    /// sockets copy-then-splice: messages copy (one system call fewer each), bulk splices.
    Auto,
    /// splice in both directions.
    Splice,
    /// copies only.
    Copy,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Endpoint,
    pub connect: Endpoint,
    pub policy: Policy,
    /// Mode bits of the listening UNIX socket file.
    pub socket_mode: u32,
    pub socket_gid: Option<u32>,
    pub max_conns: usize,
    /// `--replace-after-ms`: with `max_conns` sessions live a newly admitted peer is served and
    /// the oldest session closed this long after (unless it ends first); None: refused.
    pub replace_after: Option<Duration>,
    pub connect_timeout: Duration,
    /// Keepalive and user timeout of every TCP socket (`--tcp-keepalive-s`, `--tcp-user-timeout-ms`).
    pub tcp: TcpLiveness,
    pub pipe_size_bytes: usize,
    /// Ceiling of a pipe's growth (`--pipe-size-max`).
    pub pipe_size_max_bytes: usize,
    pub move_mode: MoveMode,
    /// Ceiling of a copy buffer's growth (`--copy-buffer-max`).
    pub copy_buffer_max_bytes: usize,
    pub poll_window: Duration,
    pub busy_poll_us: u32,
    pub cpu: Option<usize>,
    pub shutdown_timeout: Duration,
    pub log_level: Option<String>,
    /// The VM this instance serves, for logs and metrics.
    pub name: String,
    /// Control socket path (`--control`).
    pub control: Option<PathBuf>,
    /// HdrHistogram interval log (`--hist-log`) and its interval.
    pub hist_log: Option<PathBuf>,
    pub hist_interval: Duration,
    /// `--metrics-textfile`: the directory node_exporter's textfile collector reads.
    pub metrics_textfile: Option<PathBuf>,
    /// `--kvmi`: the session speaks KVMi (None: bytes move uninspected).
    pub kvmi: Option<KvmiConfig>,
    /// `--tls-*`: mutual TLS on the TCP endpoint(s) (None: plain TCP).
    pub tls: Option<TlsConfig>,
}

/// What `--tls-*` say, loaded and checked (the files are read here, at the border, so that
/// `--check` and start-up refuse the same things).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub settings: tls::Settings,
    pub loaded: tls::Loaded,
    pub handshake_timeout: Duration,
}

/// How a TCP peer that vanished without FIN or reset is noticed. Both None: the kernel's
/// defaults (no keepalive; retransmissions for about 15 minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpLiveness {
    /// Silence before the first keepalive probe.
    pub keepalive_idle: Option<Duration>,
    /// TCP_USER_TIMEOUT: unacknowledged data (or probes) for this long closes the connection.
    pub user_timeout: Option<Duration>,
}

/// Keepalive probes after the idle time, and the gap between them.
pub const TCP_KEEPALIVE_PROBES: u32 = 3;
pub const TCP_KEEPALIVE_INTERVAL_S: u64 = 5;

/// What `--kvmi` and its refinements say.
#[derive(Debug, Clone)]
pub struct KvmiConfig {
    pub abi: kvmi::abi::Abi,
    pub vm_uuid: Option<[u8; 16]>,
    pub vm_name: Option<Vec<u8>>,
    /// Which socket index carries QEMU (`side::LISTEN_SIDE` or `side::CONNECT_SIDE`).
    pub hypervisor_side: usize,
    pub policy: kvmi::policy::Policy,
}

/// One problem with one flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub flag: &'static str,
    pub env: &'static str,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The problem quotes the operator's value: escaped, so it cannot forge a line.
        write!(f, "{} ({}): {}", self.flag, self.env, Escaped(&self.problem))
    }
}

/// Every problem found, one per line.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

struct Problems(Vec<ConfigError>);

impl Problems {
    fn add(&mut self, flag: &'static str, env: &'static str, problem: impl Into<String>) {
        self.0.push(ConfigError { flag, env, problem: problem.into() });
    }
}

/// The clap definition, built once: where flag and variable names come from.
fn command() -> &'static clap::Command {
    static COMMAND: OnceLock<clap::Command> = OnceLock::new();
    COMMAND.get_or_init(<crate::cli::Cli as clap::CommandFactory>::command)
}

/// `("--flag", "KVMI_RELAY_VAR")` for a field of `RelayArgs`, read from the clap definition
/// itself, so a message can never name a flag or variable the command line does not have.
fn names(id: &str) -> (&'static str, &'static str) {
    static NAMES: OnceLock<Vec<(String, String, &'static str)>> = OnceLock::new();
    let all = NAMES.get_or_init(|| {
        command()
            .get_arguments()
            .filter_map(|a| {
                let long = a.get_long()?;
                let env = a.get_env()?.to_str()?;
                Some((a.get_id().as_str().to_string(), format!("--{long}"), env))
            })
            .collect()
    });
    all.iter()
        .find(|(i, ..)| i == id)
        .map(|(_, flag, env)| (flag.as_str(), *env))
        .unwrap_or_else(|| panic!("probable bug: '{id}' is not a relay flag with an environment variable"))
}

/// What a variable's name starts with when it is meant for the relay. Matched ignoring case, so
/// that a lower-case `kvmi_relay_max_conns` (which no flag reads either) is caught too.
const VARIABLE_PREFIX: &str = "KVMI_RELAY_";

/// Every variable some flag reads, the relay's and its subcommands', from the clap definition.
pub fn known_variables() -> &'static [&'static str] {
    static KNOWN: OnceLock<Vec<&'static str>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        fn walk(cmd: &'static clap::Command, out: &mut Vec<&'static str>) {
            out.extend(cmd.get_arguments().filter_map(|a| a.get_env()?.to_str()));
            for sub in cmd.get_subcommands() {
                walk(sub, out);
            }
        }
        let mut all = Vec::new();
        walk(command(), &mut all);
        all.sort_unstable();
        all.dedup();
        all
    })
}

/// A `KVMI_RELAY_*` variable in the environment that no flag reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownVariable {
    /// As found (lossily decoded; escaped when printed).
    pub name: String,
    /// The known variable with the fewest edits to it.
    pub closest: &'static str,
}

impl fmt::Display for UnknownVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: no flag reads this variable; did you mean {}?", Escaped(&self.name), self.closest)
    }
}

/// The variables among `names` (the environment's) that look meant for the relay and are not
/// known, in the order given.
pub fn unknown_variables(names: impl IntoIterator<Item = OsString>) -> Vec<UnknownVariable> {
    let known = known_variables();
    names
        .into_iter()
        .filter_map(|n| {
            let name = n.to_string_lossy().into_owned();
            let meant = name.get(..VARIABLE_PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(VARIABLE_PREFIX));
            if !meant || known.contains(&name.as_str()) {
                return None;
            }
            let upper = name.to_ascii_uppercase();
            let closest = known.iter().copied().min_by_key(|k| edit_distance(&upper, k))?;
            Some(UnknownVariable { name, closest })
        })
        .collect()
}

/// Levenshtein distance in characters: insertions, deletions and substitutions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A switch (`--kvmi`, `--allow-any-ip`, ...): "true" or "false" from the command line, or its
/// variable's value, which takes the words systemd users write, in any case. Empty means off,
/// as an empty `KVMI_RELAY_KVMI=` line in an environment file reads. None: not a switch value
/// (reported), so that checks depending on it stay quiet rather than report a consequence.
fn switch(p: &mut Problems, (flag, env): (&'static str, &'static str), text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" | "" => Some(false),
        _ => {
            p.add(flag, env, format!("'{text}' is not one of 1/0, true/false, yes/no, on/off"));
            None
        }
    }
}

macro_rules! problem {
    ($p:expr, $f:ident, $($arg:tt)*) => {{
        let (flag, env) = names(stringify!($f));
        $p.add(flag, env, format!($($arg)*));
    }};
}

fn number<T: std::str::FromStr>(p: &mut Problems, (flag, env): (&'static str, &'static str), text: &str) -> Option<T> {
    match text.trim().parse::<T>() {
        Ok(v) => Some(v),
        Err(_) => {
            p.add(flag, env, format!("'{text}' is not a valid number"));
            None
        }
    }
}

/// A pipe or copy-buffer size: a number of bytes in PIPE_SIZE_MIN_BYTES..=PIPE_SIZE_MAX_BYTES.
fn store_size(p: &mut Problems, names: (&'static str, &'static str), text: &str) -> usize {
    let bytes = number::<usize>(p, names, text).unwrap_or(PIPE_SIZE_MIN_BYTES);
    if !(PIPE_SIZE_MIN_BYTES..=PIPE_SIZE_MAX_BYTES).contains(&bytes) {
        p.add(names.0, names.1, format!("{bytes} is outside {PIPE_SIZE_MIN_BYTES}..={PIPE_SIZE_MAX_BYTES}"));
    }
    bytes
}

fn resolve_uid(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    match User::from_name(name) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!("unknown user '{name}'")),
        Err(e) => Err(format!("cannot look up user '{name}': {e}")),
    }
}

fn resolve_gid(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    match Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("unknown group '{name}'")),
        Err(e) => Err(format!("cannot look up group '{name}': {e}")),
    }
}

/// Values given as a comma list through the environment may carry spaces and empty items.
fn items(list: &[String]) -> impl Iterator<Item = &str> {
    list.iter().map(|s| s.trim()).filter(|s| !s.is_empty())
}

impl TryFrom<RelayArgs> for Config {
    type Error = ConfigErrors;

    fn try_from(a: RelayArgs) -> Result<Config, ConfigErrors> {
        let mut p = Problems(Vec::new());
        let allow_any_ip = switch(&mut p, names("allow_any_ip"), &a.allow_any_ip);
        let allow_any_cid = switch(&mut p, names("allow_any_cid"), &a.allow_any_cid);
        let kvmi_on = switch(&mut p, names("kvmi"), &a.kvmi);

        let listen = listen_endpoint(&mut p, &a);
        let connect = connect_endpoint(&mut p, &a);

        let policy = access_policy(&mut p, &a, listen.as_ref(), allow_any_ip, allow_any_cid);

        let (socket_mode, socket_gid) = socket_permissions(&mut p, &a);

        let max_conns = number::<usize>(&mut p, names("max_conns"), &a.max_conns).unwrap_or(1);
        if max_conns == 0 {
            problem!(p, max_conns, "must be at least 1");
        }
        let replace_after = a.replace_after_ms.as_deref().and_then(|ms| {
            let ms = number::<u64>(&mut p, names("replace_after_ms"), ms)?;
            if ms > 3_600_000 {
                problem!(p, replace_after_ms, "{ms} ms is more than an hour; a migration's source closes within 60 s");
            }
            Some(Duration::from_millis(ms))
        });
        let connect_timeout_ms = number::<u64>(&mut p, names("connect_timeout_ms"), &a.connect_timeout_ms).unwrap_or(1);
        if connect_timeout_ms == 0 {
            problem!(p, connect_timeout_ms, "must be at least 1");
        }
        let keepalive_s = number::<u64>(&mut p, names("tcp_keepalive_s"), &a.tcp_keepalive_s).unwrap_or(0);
        if keepalive_s > i32::MAX as u64 {
            problem!(p, tcp_keepalive_s, "{keepalive_s} s is beyond what the kernel takes (TCP_KEEPIDLE)");
        }
        let user_timeout_ms = number::<u64>(&mut p, names("tcp_user_timeout_ms"), &a.tcp_user_timeout_ms).unwrap_or(0);
        if user_timeout_ms > u32::MAX as u64 {
            problem!(p, tcp_user_timeout_ms, "{user_timeout_ms} ms is beyond what the kernel takes (TCP_USER_TIMEOUT)");
        }
        let tcp = TcpLiveness {
            keepalive_idle: (keepalive_s > 0).then(|| Duration::from_secs(keepalive_s)),
            user_timeout: (user_timeout_ms > 0).then(|| Duration::from_millis(user_timeout_ms)),
        };
        let pipe_size_bytes = store_size(&mut p, names("pipe_size"), &a.pipe_size);
        let pipe_size_max_bytes = store_size(&mut p, names("pipe_size_max"), &a.pipe_size_max);
        let copy_buffer_max_bytes = store_size(&mut p, names("copy_buffer_max"), &a.copy_buffer_max);
        let poll_window_us = number::<u64>(&mut p, names("poll_window_us"), &a.poll_window_us).unwrap_or(0);
        if poll_window_us > 1_000_000 {
            problem!(p, poll_window_us, "{poll_window_us} µs is more than a second of spinning; at most 1000000");
        }
        let busy_poll_us = number::<u32>(&mut p, names("busy_poll_us"), &a.busy_poll_us).unwrap_or(0);
        let cpu = a.cpu.as_deref().and_then(|c| number::<usize>(&mut p, names("cpu"), c));
        if let Some(c) = cpu {
            if !Path::new(&format!("/sys/devices/system/cpu/cpu{c}")).exists() {
                problem!(p, cpu, "CPU {c} does not exist on this machine");
            }
        }
        let shutdown_timeout_ms =
            number::<u64>(&mut p, names("shutdown_timeout_ms"), &a.shutdown_timeout_ms).unwrap_or(0);
        // An empty value (`KVMI_RELAY_LOG_LEVEL=` in an environment file) means unset.
        let log_level = a.log_level.clone().filter(|l| !l.trim().is_empty());
        if let Some(level) = &log_level {
            if !log_filter_is_valid(level) {
                problem!(
                    p,
                    log_level,
                    "'{level}' is not a level (off, error, warn, info, debug, trace) or target=level list"
                );
            }
        }

        let (control, hist_log, metrics_textfile) = observer_paths(&mut p, &a, listen.as_ref());
        let hist_interval = match a.hist_interval.trim().parse::<f64>() {
            Ok(s) if (0.01..=86_400.0).contains(&s) => Duration::from_secs_f64(s),
            _ => {
                problem!(p, hist_interval, "'{}' is not a number of seconds between 0.01 and 86400", a.hist_interval);
                Duration::from_secs(10)
            }
        };

        // A malformed KVMI_RELAY_KVMI is taken as meant on: its refinements are then checked
        // rather than each reported as needing --kvmi.
        let kvmi = kvmi_config(&mut p, &a, kvmi_on.unwrap_or(true));
        let tls = tls_config(&mut p, &a, listen.as_ref(), connect.as_ref());

        if !p.0.is_empty() {
            return Err(ConfigErrors(p.0));
        }
        let (Some(listen), Some(connect)) = (listen, connect) else {
            unreachable!("a missing endpoint is always recorded as a problem");
        };
        let name = a.name.clone().unwrap_or_else(|| default_name(&listen));
        Ok(Config {
            listen,
            connect,
            policy,
            socket_mode,
            socket_gid,
            max_conns,
            replace_after,
            connect_timeout: Duration::from_millis(connect_timeout_ms),
            tcp,
            pipe_size_bytes,
            pipe_size_max_bytes,
            // KVMi sessions look at every header: the bytes pass through user space anyway.
            move_mode: match a.r#move {
                _ if kvmi.is_some() => MoveMode::Copy,
                MoveArg::Auto => MoveMode::Auto,
                MoveArg::Splice => MoveMode::Splice,
                MoveArg::Copy => MoveMode::Copy,
            },
            copy_buffer_max_bytes,
            poll_window: Duration::from_micros(poll_window_us),
            busy_poll_us,
            cpu,
            shutdown_timeout: Duration::from_millis(shutdown_timeout_ms),
            log_level,
            name,
            control,
            hist_log,
            hist_interval,
            metrics_textfile,
            kvmi,
            tls,
        })
    }
}

/// `--listen`: the endpoint, and for a UNIX socket a parent directory that exists and no
/// file in its place that is not a socket.
fn listen_endpoint(p: &mut Problems, a: &RelayArgs) -> Option<Endpoint> {
    let listen = match a.listen.as_deref() {
        None => {
            problem!(p, listen, "missing: say where to listen (unix:PATH, tcp:IP:PORT, vsock:PORT)");
            None
        }
        Some(text) => match Endpoint::parse(text) {
            Ok(ep) => Some(ep),
            Err(e) => {
                problem!(p, listen, "{e}");
                None
            }
        },
    };
    if let Some(Endpoint::Unix(path)) = &listen {
        let parent = parent_of(path);
        if !parent.is_dir() {
            problem!(p, listen, "parent directory {} of the socket does not exist", parent.display());
        } else if path.exists() && !is_socket(path) {
            problem!(p, listen, "{} exists and is not a socket; refusing to replace it", path.display());
        }
    }
    listen
}

/// `--connect`: an endpoint a peer can be dialled at (a vsock CID, a TCP address and port).
fn connect_endpoint(p: &mut Problems, a: &RelayArgs) -> Option<Endpoint> {
    match a.connect.as_deref() {
        None => {
            problem!(p, connect, "missing: say where to dial (unix:PATH, tcp:IP:PORT, vsock:CID:PORT)");
            None
        }
        Some(text) => match Endpoint::parse(text) {
            Ok(Endpoint::Vsock { cid: VSOCK_CID_ANY, .. }) => {
                problem!(p, connect, "'{text}' has no CID; dialling vsock needs vsock:CID:PORT");
                None
            }
            Ok(Endpoint::Tcp(addr)) if addr.ip().is_unspecified() || addr.port() == 0 => {
                problem!(p, connect, "'{text}' is not an address a peer can be dialled at");
                None
            }
            Ok(ep) => Some(ep),
            Err(e) => {
                problem!(p, connect, "{e}");
                None
            }
        },
    }
}

/// The allow-lists (`--allow-uid/-gid/-ip/-cid`, `--allow-any-ip/-cid`), parsed and judged
/// against the listener they guard.
fn access_policy(
    p: &mut Problems,
    a: &RelayArgs,
    listen: Option<&Endpoint>,
    allow_any_ip: Option<bool>,
    allow_any_cid: Option<bool>,
) -> Policy {
    let mut policy = Policy::default();
    for u in items(&a.allow_uid) {
        match resolve_uid(u) {
            Ok(uid) => policy.uids.push(uid),
            Err(e) => problem!(p, allow_uid, "{e}"),
        }
    }
    for g in items(&a.allow_gid) {
        match resolve_gid(g) {
            Ok(gid) => policy.gids.push(gid),
            Err(e) => problem!(p, allow_gid, "{e}"),
        }
    }
    for n in items(&a.allow_ip) {
        match access::parse_rule(n) {
            Some(net) => policy.nets.push(net),
            None => problem!(p, allow_ip, "'{n}' is not a CIDR like 192.0.2.0/24 or 2001:db8::/32"),
        }
    }
    for c in items(&a.allow_cid) {
        match c.parse::<u32>() {
            Ok(cid) => policy.cids.push(cid),
            Err(_) => problem!(p, allow_cid, "'{c}' is not a vsock CID"),
        }
    }
    policy.any_ip = allow_any_ip == Some(true);
    policy.any_cid = allow_any_cid == Some(true);

    // Allow-lists only mean something for the listener they guard; a rule for another kind
    // is a mistake the operator should hear about, not a silent no-op.
    let kind = listen.map(Endpoint::kind);
    if let Some(kind) = kind {
        if kind != "unix" {
            if !a.allow_uid.is_empty() {
                problem!(p, allow_uid, "only applies to a unix listener, not {kind}");
            }
            if !a.allow_gid.is_empty() {
                problem!(p, allow_gid, "only applies to a unix listener, not {kind}");
            }
            if a.socket_group.is_some() {
                problem!(p, socket_group, "only applies to a unix listener, not {kind}");
            }
        }
        if kind != "tcp" {
            if !a.allow_ip.is_empty() {
                problem!(p, allow_ip, "only applies to a tcp listener, not {kind}");
            }
            if policy.any_ip {
                problem!(p, allow_any_ip, "only applies to a tcp listener, not {kind}");
            }
        }
        if kind != "vsock" {
            if !a.allow_cid.is_empty() {
                problem!(p, allow_cid, "only applies to a vsock listener, not {kind}");
            }
            if policy.any_cid {
                problem!(p, allow_any_cid, "only applies to a vsock listener, not {kind}");
            }
        }
        // "Given" rather than "parsed": a rule that failed to parse was already reported.
        let ip_given = items(&a.allow_ip).next().is_some();
        let cid_given = items(&a.allow_cid).next().is_some();
        match kind {
            "tcp" if !ip_given && allow_any_ip == Some(false) => problem!(
                p,
                allow_ip,
                "a tcp listener needs an allow-list (--allow-ip CIDR), or --allow-any-ip to admit every address"
            ),
            "tcp" if ip_given && policy.any_ip => {
                problem!(p, allow_any_ip, "contradicts --allow-ip; give one or the other")
            }
            "vsock" if !cid_given && allow_any_cid == Some(false) => problem!(
                p,
                allow_cid,
                "a vsock listener needs an allow-list (--allow-cid CID), or --allow-any-cid to admit every CID"
            ),
            "vsock" if cid_given && policy.any_cid => {
                problem!(p, allow_any_cid, "contradicts --allow-cid; give one or the other")
            }
            "unix" if policy.uids.is_empty() && policy.gids.is_empty() => {
                policy.uids.push(Uid::effective().as_raw());
            }
            _ => {}
        }
    }
    policy
}

/// `--socket-mode` and `--socket-group`: the UNIX socket's mode (never world-writable) and group.
fn socket_permissions(p: &mut Problems, a: &RelayArgs) -> (u32, Option<u32>) {
    let socket_mode = match u32::from_str_radix(a.socket_mode.trim().trim_start_matches("0o"), 8) {
        Ok(m) if m > 0o777 => {
            problem!(p, socket_mode, "'{}' has bits outside 0777", a.socket_mode);
            0
        }
        Ok(m) if m & 0o002 != 0 => {
            problem!(p, socket_mode, "'{}' is world-writable; anyone could introspect the VM", a.socket_mode);
            0
        }
        Ok(m) => m,
        Err(_) => {
            problem!(p, socket_mode, "'{}' is not an octal mode like 0660", a.socket_mode);
            0
        }
    };
    let socket_gid = a.socket_group.as_deref().and_then(|g| match resolve_gid(g.trim()) {
        Ok(gid) => Some(gid),
        Err(e) => {
            problem!(p, socket_group, "{e}");
            None
        }
    });
    (socket_mode, socket_gid)
}

/// What the relay creates for its observers: `--control` (a socket path that fits and replaces
/// no other file), `--hist-log` (a file in an existing directory), `--metrics-textfile` (a
/// directory). All absolute.
fn observer_paths(
    p: &mut Problems,
    a: &RelayArgs,
    listen: Option<&Endpoint>,
) -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
    let control = a.control.as_deref().map(str::trim).filter(|c| !c.is_empty()).map(PathBuf::from);
    if let Some(c) = &control {
        match parent_of(c) {
            _ if c.is_relative() => problem!(p, control, "'{}' is relative; give an absolute path", c.display()),
            _ if c.as_os_str().len() > UNIX_PATH_MAX_BYTES => problem!(
                p,
                control,
                "'{}' is {} bytes, longer than the {UNIX_PATH_MAX_BYTES} a UNIX socket address holds",
                c.display(),
                c.as_os_str().len()
            ),
            _ if c.as_os_str().as_encoded_bytes().ends_with(b"/") => {
                problem!(p, control, "'{}' ends in '/': it names a directory, not a socket file", c.display())
            }
            d if !d.is_dir() => problem!(p, control, "parent directory {} does not exist", d.display()),
            _ if c.exists() && !is_socket(c) => {
                problem!(p, control, "{} exists and is not a socket; refusing to replace it", c.display())
            }
            _ if matches!(listen, Some(Endpoint::Unix(l)) if l == c) => {
                problem!(p, control, "is the same path as --listen")
            }
            _ => {}
        }
    }
    let hist_log = a.hist_log.as_deref().map(str::trim).filter(|c| !c.is_empty()).map(PathBuf::from);
    if let Some(h) = &hist_log {
        let d = parent_of(h);
        if h.is_relative() {
            problem!(p, hist_log, "'{}' is relative; give an absolute path", h.display());
        } else if !d.is_dir() {
            problem!(p, hist_log, "parent directory {} does not exist", d.display());
        } else if h.is_dir() || h.as_os_str().as_encoded_bytes().ends_with(b"/") {
            problem!(p, hist_log, "{} is a directory; name the log file in it", h.display());
        }
    }
    let metrics_textfile = a.metrics_textfile.as_deref().map(str::trim).filter(|c| !c.is_empty()).map(PathBuf::from);
    if let Some(d) = &metrics_textfile {
        if d.is_relative() {
            problem!(p, metrics_textfile, "'{}' is relative; give an absolute path", d.display());
        } else if !d.is_dir() {
            problem!(p, metrics_textfile, "{} is not a directory", d.display());
        }
    }
    (control, hist_log, metrics_textfile)
}

/// `--tls-*`: which TCP ends speak TLS, the pins, and the files loaded and checked as of now.
/// Without an endpoint (already reported) the files are not looked at.
fn tls_config(
    p: &mut Problems,
    a: &RelayArgs,
    listen: Option<&Endpoint>,
    connect: Option<&Endpoint>,
) -> Option<TlsConfig> {
    let text = |v: &Option<String>| v.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(PathBuf::from);
    let (cert, key, ca) = (text(&a.tls_cert), text(&a.tls_key), text(&a.tls_ca));
    let names_given: Vec<&str> = items(&a.tls_peer_name).collect();
    let spki_given: Vec<&str> = items(&a.tls_peer_spki).collect();
    let timeout_ms = number::<u64>(p, names("tls_handshake_timeout_ms"), &a.tls_handshake_timeout_ms).unwrap_or(1);
    if timeout_ms == 0 {
        problem!(p, tls_handshake_timeout_ms, "must be at least 1");
    }
    let any_file = cert.is_some() || key.is_some() || ca.is_some();
    if !any_file {
        for (id, set) in [("tls_peer_name", !names_given.is_empty()), ("tls_peer_spki", !spki_given.is_empty())] {
            if set {
                let (flag, env) = names(id);
                p.add(flag, env, "means something only with --tls-cert, --tls-key and --tls-ca");
            }
        }
        return None;
    }
    let mut pins = tls::Pins::default();
    for n in names_given {
        match tls::parse_name(n) {
            Ok(n) => pins.names.push(n),
            Err(e) => problem!(p, tls_peer_name, "{e}"),
        }
    }
    for s in spki_given {
        match tls::parse_spki(s) {
            Ok(h) => pins.spki.push(h),
            Err(e) => problem!(p, tls_peer_spki, "{e}"),
        }
    }
    for (id, given) in [("tls_cert", &cert), ("tls_key", &key), ("tls_ca", &ca)] {
        if given.is_none() {
            let (flag, env) = names(id);
            p.add(flag, env, "missing: TLS needs --tls-cert, --tls-key and --tls-ca together");
        }
    }
    let (Some(listen), Some(connect)) = (listen, connect) else { return None };
    let roles = tls::Roles { listen: matches!(listen, Endpoint::Tcp(_)), dial: matches!(connect, Endpoint::Tcp(_)) };
    if !roles.listen && !roles.dial {
        problem!(p, tls_cert, "TLS needs a tcp: endpoint (--listen or --connect); neither is one");
        return None;
    }
    let (Some(cert), Some(key), Some(ca)) = (cert, key, ca) else { return None };
    for (id, path) in [("tls_cert", &cert), ("tls_key", &key), ("tls_ca", &ca)] {
        if path.is_relative() {
            let (flag, env) = names(id);
            p.add(flag, env, format!("'{}' is relative; give an absolute path", path.display()));
        }
    }
    let settings = tls::Settings { files: tls::Files { cert, key, ca }, pins, roles };
    match tls::load(&settings, std::time::SystemTime::now()) {
        Ok(loaded) => Some(TlsConfig { settings, loaded, handshake_timeout: Duration::from_millis(timeout_ms) }),
        Err(problems) => {
            for fp in problems {
                let id = match fp.flag {
                    tls::TlsFlag::Cert => "tls_cert",
                    tls::TlsFlag::Key => "tls_key",
                    tls::TlsFlag::Ca => "tls_ca",
                };
                let (flag, env) = names(id);
                p.add(flag, env, fp.to_string());
            }
            None
        }
    }
}

/// `--kvmi` and the flags that only mean something with it.
fn kvmi_config(p: &mut Problems, a: &RelayArgs, on: bool) -> Option<KvmiConfig> {
    if !on {
        let given = [
            ("kvmi_vm_uuid", a.kvmi_vm_uuid.is_some()),
            ("kvmi_vm_name", a.kvmi_vm_name.is_some()),
            ("kvmi_allow", !a.kvmi_allow.is_empty()),
            ("kvmi_deny", !a.kvmi_deny.is_empty()),
            ("kvmi_policy", a.kvmi_policy != KvmiPolicyArg::Full),
        ];
        for (id, set) in given {
            if set {
                let (flag, env) = names(id);
                p.add(flag, env, "means something only with --kvmi (KVMI_RELAY_KVMI)".to_string());
            }
        }
        return None;
    }
    let abi = match a.kvmi_abi {
        KvmiAbiArg::V7 => kvmi::abi::Abi::V7,
    };
    let vm_uuid = a.kvmi_vm_uuid.as_deref().and_then(|t| {
        let u = kvmi::handshake::parse_uuid(t.trim());
        if u.is_none() {
            problem!(p, kvmi_vm_uuid, "'{t}' is not a UUID (32 hex digits, dashes as 8-4-4-4-12)");
        }
        u
    });
    let vm_name = a.kvmi_vm_name.as_deref().and_then(|n| {
        if n.is_empty() || n.len() >= kvmi::handshake::NAME_BYTES || n.contains('\0') {
            problem!(p, kvmi_vm_name, "'{n}' is not a QEMU VM name (1 to 63 bytes, no NUL)");
            None
        } else {
            Some(n.as_bytes().to_vec())
        }
    });
    if a.r#move == MoveArg::Splice {
        let (flag, env) = names("move");
        p.add(flag, env, "splice cannot be used with --kvmi (KVMi sessions copy, to read every header)".to_string());
    }
    let mode = match a.kvmi_policy {
        KvmiPolicyArg::Full => kvmi::policy::Mode::Full,
        KvmiPolicyArg::ReadOnly => kvmi::policy::Mode::ReadOnly,
    };
    let unknown = match a.kvmi_unknown {
        KvmiUnknownArg::Refuse => kvmi::policy::Unknown::Refuse,
        KvmiUnknownArg::Pass => kvmi::policy::Unknown::Pass,
    };
    let policy = match kvmi::policy::Policy::from_names(abi.table(), mode, &a.kvmi_allow, &a.kvmi_deny, unknown) {
        Ok(pol) => pol,
        Err(problems) => {
            for text in problems {
                let (flag, env) =
                    if text.starts_with("--kvmi-deny") { names("kvmi_deny") } else { names("kvmi_allow") };
                p.add(flag, env, text.split_once(": ").map_or(text.clone(), |(_, rest)| rest.to_string()));
            }
            kvmi::policy::Policy { mode, allow: Default::default(), deny: Default::default(), unknown }
        }
    };
    if policy.deny.contains(&kvmi::abi::v7::GET_VERSION) {
        problem!(p, kvmi_deny, "GET_VERSION cannot be denied: libkvmi refuses a session whose GET_VERSION fails");
    }
    Some(KvmiConfig {
        abi,
        vm_uuid,
        vm_name,
        hypervisor_side: match a.kvmi_hypervisor_side {
            SideArg::Listen => crate::datapath::side::LISTEN_SIDE,
            SideArg::Connect => crate::datapath::side::CONNECT_SIDE,
        },
        policy,
    })
}

fn default_name(listen: &Endpoint) -> String {
    match listen {
        Endpoint::Unix(p) => p.file_stem().map_or_else(|| "kvmi".into(), |s| s.to_string_lossy().into_owned()),
        other => other.to_string(),
    }
}

/// The directory a path lives in ("." for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// A level, or `target=level` directives separated by commas. A bare word is also valid syntax
/// for the filter (all levels of that target, nothing else), which turns a misspelt level into
/// silence: refused here.
pub(crate) fn log_filter_is_valid(filter: &str) -> bool {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let every_directive_has_a_level = filter.split(',').all(|d| match d.split_once('=') {
        Some((target, level)) => !target.trim().is_empty() && level.trim().parse::<LevelFilter>().is_ok(),
        None => !d.trim().is_empty() && d.trim().parse::<LevelFilter>().is_ok(),
    });
    every_directive_has_a_level && filter.parse::<Targets>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use ipnet::IpNet;

    fn parse(args: &[&str]) -> Result<Config, ConfigErrors> {
        let mut argv = vec!["kvmi-relay"];
        argv.extend_from_slice(args);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("clap accepts the words");
        Config::try_from(cli.relay)
    }

    fn problems(args: &[&str]) -> Vec<String> {
        parse(args).unwrap_err().0.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn replace_after_is_off_unless_set_and_names_its_flag_when_bad() {
        let base = ["--listen", "tcp:127.0.0.1:7", "--allow-any-ip", "--connect", "unix:/tmp/b"];
        assert_eq!(parse(&base).unwrap().replace_after, None);
        let with = |v: &str| {
            [&base[..], &["--replace-after-ms", v]].concat().iter().map(|s| s.to_string()).collect::<Vec<_>>()
        };
        let args = with("5000");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(parse(&args).unwrap().replace_after, Some(Duration::from_millis(5000)));
        for (bad, says) in [("soon", "is not a valid number"), ("3600001", "more than an hour")] {
            let args = with(bad);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let p = problems(&args);
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(p[0].contains("--replace-after-ms (KVMI_RELAY_REPLACE_AFTER_MS)") && p[0].contains(says), "{p:?}");
        }
    }

    #[test]
    fn network_flavor_both_hosts() {
        let c =
            parse(&["--listen", "unix:/tmp/one-7.sock", "--allow-uid", "0", "--connect", "tcp:203.0.113.9:7"]).unwrap();
        assert_eq!(c.policy.uids, vec![0]);
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.max_conns, 1);
        assert_eq!(c.name, "one-7");
        let m = parse(&["--listen", "tcp:0.0.0.0:7", "--allow-ip", "198.51.100.4/32", "--connect", "unix:/tmp/x.sock"])
            .unwrap();
        assert_eq!(m.policy.nets, vec!["198.51.100.4/32".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn unix_listener_defaults_to_own_uid() {
        let c = parse(&["--listen", "unix:/tmp/a.sock", "--connect", "unix:/tmp/b.sock"]).unwrap();
        assert_eq!(c.policy.uids, vec![Uid::effective().as_raw()]);
    }

    #[test]
    fn tcp_and_vsock_listeners_need_an_allow_list() {
        let e = problems(&["--listen", "tcp:127.0.0.1:7", "--connect", "unix:/tmp/b"]);
        assert!(e[0].starts_with("--allow-ip (KVMI_RELAY_ALLOW_IP): a tcp listener needs"), "{e:?}");
        let e = problems(&["--listen", "vsock:5000", "--connect", "unix:/tmp/b"]);
        assert!(e[0].starts_with("--allow-cid (KVMI_RELAY_ALLOW_CID): a vsock listener needs"), "{e:?}");
        assert!(parse(&["--listen", "tcp:127.0.0.1:7", "--allow-any-ip", "--connect", "unix:/tmp/b"]).is_ok());
        assert!(parse(&["--listen", "vsock:5000", "--allow-any-cid", "--connect", "unix:/tmp/b"]).is_ok());
    }

    #[test]
    fn every_problem_is_reported_with_its_flag() {
        let e = problems(&[
            "--listen",
            "tcp:127.0.0.1:7",
            "--allow-ip",
            "10.0.0.0/33",
            "--connect",
            "vsock:9",
            "--socket-mode",
            "0666",
            "--max-conns",
            "0",
            "--allow-uid",
            "no-such-user-kvmi",
        ]);
        let joined = e.join("\n");
        for needle in [
            "--allow-ip (KVMI_RELAY_ALLOW_IP): '10.0.0.0/33' is not a CIDR",
            "--connect (KVMI_RELAY_CONNECT): 'vsock:9' has no CID",
            "--socket-mode (KVMI_RELAY_SOCKET_MODE): '0666' is world-writable",
            "--max-conns (KVMI_RELAY_MAX_CONNS): must be at least 1",
            "--allow-uid (KVMI_RELAY_ALLOW_UID): unknown user 'no-such-user-kvmi'",
            "--allow-uid (KVMI_RELAY_ALLOW_UID): only applies to a unix listener",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
        }
    }

    #[test]
    fn missing_parent_directory_is_refused() {
        let e = problems(&["--listen", "unix:/nonexistent-kvmi-dir/x.sock", "--connect", "unix:/tmp/b"]);
        assert!(e[0].contains("parent directory /nonexistent-kvmi-dir of the socket does not exist"), "{e:?}");
    }

    #[test]
    fn log_filters_need_a_level_in_every_directive() {
        for ok in
            ["info", "WARN", "off", "kvmi_relay=debug", "kvmi_relay=debug,warn", "kvmi_relay::datapath::pump=trace"]
        {
            assert!(log_filter_is_valid(ok), "{ok}");
        }
        for bad in ["", "infoo", "debgu", "kvmi_relay=loud", "warn,kvmi_relay", "=info"] {
            assert!(!log_filter_is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn every_checked_flag_is_named_from_the_command_line_definition() {
        for id in [
            "listen",
            "connect",
            "allow_uid",
            "allow_gid",
            "allow_ip",
            "allow_cid",
            "allow_any_ip",
            "allow_any_cid",
            "socket_mode",
            "socket_group",
            "max_conns",
            "replace_after_ms",
            "connect_timeout_ms",
            "tcp_keepalive_s",
            "tcp_user_timeout_ms",
            "pipe_size",
            "pipe_size_max",
            "copy_buffer_max",
            "poll_window_us",
            "busy_poll_us",
            "cpu",
            "shutdown_timeout_ms",
            "log_level",
            "control",
            "hist_log",
            "hist_interval",
            "metrics_textfile",
            "kvmi",
            "kvmi_vm_uuid",
            "kvmi_vm_name",
            "kvmi_hypervisor_side",
            "kvmi_policy",
            "kvmi_allow",
            "kvmi_deny",
            "kvmi_unknown",
            "kvmi_abi",
        ] {
            let (flag, env) = names(id);
            assert_eq!(flag, format!("--{}", id.replace('_', "-")));
            assert_eq!(env, format!("KVMI_RELAY_{}", id.to_uppercase()));
        }
    }

    #[test]
    fn tcp_liveness_defaults_free_a_dead_peer_within_a_minute_and_0_means_off() {
        let c = parse(&["--listen", "tcp:127.0.0.1:7", "--allow-any-ip", "--connect", "unix:/tmp/b"]).unwrap();
        let idle = c.tcp.keepalive_idle.expect("keepalive on by default");
        let by_probes = idle + Duration::from_secs(TCP_KEEPALIVE_INTERVAL_S * u64::from(TCP_KEEPALIVE_PROBES));
        assert!(by_probes <= Duration::from_secs(60), "{by_probes:?}");
        assert!(c.tcp.user_timeout.expect("user timeout on by default") <= Duration::from_secs(60));
        let c = parse(&[
            "--listen",
            "tcp:127.0.0.1:7",
            "--allow-any-ip",
            "--connect",
            "unix:/tmp/b",
            "--tcp-keepalive-s",
            "0",
            "--tcp-user-timeout-ms",
            "0",
        ])
        .unwrap();
        assert_eq!(c.tcp, TcpLiveness { keepalive_idle: None, user_timeout: None });
        let e =
            parse(&["--listen", "unix:/tmp/a", "--connect", "unix:/tmp/b", "--tcp-keepalive-s", "soon"]).unwrap_err();
        assert!(e.to_string().contains("--tcp-keepalive-s (KVMI_RELAY_TCP_KEEPALIVE_S)"), "{e}");
    }

    #[test]
    fn an_unknown_variable_names_the_closest_known_one() {
        let env = ["PATH", "KVMI_RELAY_LISTEN", "KVMI_RELAY_ALOW_UID", "kvmi_relay_cpu", "KVMI_RELAYS", "KVMI_RELAY_"];
        let found = unknown_variables(env.map(OsString::from));
        let pairs: Vec<(&str, &str)> = found.iter().map(|u| (u.name.as_str(), u.closest)).collect();
        assert_eq!(pairs[..2], [("KVMI_RELAY_ALOW_UID", "KVMI_RELAY_ALLOW_UID"), ("kvmi_relay_cpu", "KVMI_RELAY_CPU")]);
        assert_eq!(pairs.len(), 3, "KVMI_RELAY_ itself is meant for the relay, KVMI_RELAYS is not: {pairs:?}");
        assert_eq!(
            found[0].to_string(),
            "KVMI_RELAY_ALOW_UID: no flag reads this variable; did you mean KVMI_RELAY_ALLOW_UID?"
        );
    }

    #[test]
    fn every_flag_variable_is_known() {
        let known = known_variables();
        for v in ["KVMI_RELAY_LISTEN", "KVMI_RELAY_KVMI_ABI", "KVMI_RELAY_ALLOW_ANY_CID"] {
            assert!(known.contains(&v), "{v}");
        }
        assert!(unknown_variables(known.iter().map(OsString::from)).is_empty());
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("KVMI_RELAY_ALOW_UID", "KVMI_RELAY_ALLOW_UID"), 1);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn switches_take_what_systemd_users_write() {
        let base = ["--listen", "tcp:127.0.0.1:7", "--connect", "unix:/tmp/b"];
        assert!(parse(&[&base[..], &["--allow-any-ip"]].concat()).unwrap().policy.any_ip);
        let mut p = Problems(Vec::new());
        let n = names("allow_any_ip");
        for (text, on) in
            [("1", true), ("YES", true), ("On", true), ("true", true), ("0", false), ("off", false), ("", false)]
        {
            assert_eq!(switch(&mut p, n, text), Some(on), "{text}");
        }
        assert!(p.0.is_empty());
        assert_eq!(switch(&mut p, n, "maybe"), None);
        assert_eq!(
            p.0[0].to_string(),
            "--allow-any-ip (KVMI_RELAY_ALLOW_ANY_IP): 'maybe' is not one of 1/0, true/false, yes/no, on/off"
        );
    }

    #[test]
    fn a_bare_address_means_that_host() {
        let c = parse(&["--listen", "tcp:[::]:7", "--allow-ip", "127.0.0.2,::1", "--connect", "unix:/tmp/b"]).unwrap();
        assert_eq!(c.policy.nets, vec!["127.0.0.2/32".parse::<IpNet>().unwrap(), "::1/128".parse().unwrap()]);
    }
}
