//! The command line, and nothing else: clap types live here and stop here.
//!
//! Every relay flag can also come from a `KVMI_RELAY_*` environment variable so that one
//! systemd `EnvironmentFile=` configures one instance. `config::Config::try_from(RelayArgs)`
//! is the border: nothing past it knows about clap. A switch given through its variable takes
//! 1/0, true/false, yes/no or on/off (checked at the border).

use std::path::PathBuf;

use clap::builder::StringValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// The value parser of the switches (`--kvmi`, `--allow-any-ip`, ...): the text as given,
/// "true" for the bare flag, "false" when absent, or the variable's value. clap's own boolean
/// parser takes only true/false and names the flag, not the variable, in a multi-line error;
/// `config` reads the words systemd users write (1/0, yes/no, on/off) and names both.
fn switch() -> StringValueParser {
    StringValueParser::new()
}

/// Access-controlled relay for one VM's KVMi introspection socket.
///
/// Listens on one endpoint, admits a peer only after checking who it is, dials the other
/// endpoint and moves bytes both ways. KVMi's small messages are copied (one read and one write
/// each); a bulk stream into a UNIX or vsock socket moves through a kernel pipe with splice(2)
/// (see --move). Endpoints: unix:PATH, tcp:IP:PORT, tcp:[IPv6]:PORT, vsock:CID:PORT (connect),
/// vsock:PORT (listen on any local CID).
#[derive(Debug, Parser)]
#[command(name = "kvmi-relay", version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(flatten)]
    pub relay: RelayArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The relay's own flags (also used by `--check`).
#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// Endpoint to listen on: unix:PATH, tcp:IP:PORT, tcp:[IPv6]:PORT, vsock:PORT or vsock:CID:PORT.
    #[arg(long, env = "KVMI_RELAY_LISTEN", value_name = "ENDPOINT")]
    pub listen: Option<String>,

    /// Endpoint to dial for each admitted peer: unix:PATH, tcp:IP:PORT, vsock:CID:PORT.
    #[arg(long, env = "KVMI_RELAY_CONNECT", value_name = "ENDPOINT")]
    pub connect: Option<String>,

    /// UNIX listener: admit peers whose SO_PEERCRED uid is one of these (names or numbers, comma-separated).
    #[arg(long, env = "KVMI_RELAY_ALLOW_UID", value_name = "USER", value_delimiter = ',')]
    pub allow_uid: Vec<String>,

    /// UNIX listener: admit peers whose SO_PEERCRED gid is one of these (names or numbers, comma-separated).
    #[arg(long, env = "KVMI_RELAY_ALLOW_GID", value_name = "GROUP", value_delimiter = ',')]
    pub allow_gid: Vec<String>,

    /// TCP listener: admit peers whose source address is inside one of these CIDRs (comma-separated).
    #[arg(long, env = "KVMI_RELAY_ALLOW_IP", value_name = "CIDR", value_delimiter = ',')]
    pub allow_ip: Vec<String>,

    /// vsock listener: admit peers with one of these CIDs (comma-separated).
    #[arg(long, env = "KVMI_RELAY_ALLOW_CID", value_name = "CID", value_delimiter = ',')]
    pub allow_cid: Vec<String>,

    /// TCP listener: admit any source address (an explicit opt-out of --allow-ip).
    #[arg(long, env = "KVMI_RELAY_ALLOW_ANY_IP", action = ArgAction::SetTrue, value_parser = switch())]
    pub allow_any_ip: String,

    /// vsock listener: admit any CID (an explicit opt-out of --allow-cid).
    #[arg(long, env = "KVMI_RELAY_ALLOW_ANY_CID", action = ArgAction::SetTrue, value_parser = switch())]
    pub allow_any_cid: String,

    /// Mode of the listening UNIX socket file (octal; world-writable modes are refused).
    #[arg(long, env = "KVMI_RELAY_SOCKET_MODE", value_name = "OCTAL", default_value = "0660")]
    pub socket_mode: String,

    /// Group owning the listening UNIX socket file (name or number).
    #[arg(long, env = "KVMI_RELAY_SOCKET_GROUP", value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Most sessions relayed at once; one more is refused and logged.
    #[arg(long, env = "KVMI_RELAY_MAX_CONNS", value_name = "N", default_value = "1")]
    pub max_conns: String,

    /// Hand over instead of refusing: with --max-conns sessions live, admit one more peer anyway
    /// and close the oldest session MS ms later unless it ends first (0: at once). For the
    /// monitor host's relay across a migration: the destination hypervisor is served while the
    /// source's session is still closing. Unset: the peer is refused.
    #[arg(long, env = "KVMI_RELAY_REPLACE_AFTER_MS", value_name = "MS")]
    pub replace_after_ms: Option<String>,

    /// How long dialling the far side may take before the admitted peer is closed.
    #[arg(long, env = "KVMI_RELAY_CONNECT_TIMEOUT_MS", value_name = "MS", default_value = "5000")]
    pub connect_timeout_ms: String,

    /// TCP keepalive on every TCP socket the relay owns: seconds of silence before the first
    /// probe (then 3 probes 5 s apart); 0 = off. With the default a peer that vanished without
    /// FIN or reset (power loss, a partition) frees its session, and a --max-conns slot, within
    /// 30 s.
    #[arg(long, env = "KVMI_RELAY_TCP_KEEPALIVE_S", value_name = "SECONDS", default_value = "15")]
    pub tcp_keepalive_s: String,

    /// TCP_USER_TIMEOUT on every TCP socket the relay owns: how long sent data (or keepalive
    /// probes) may stay unacknowledged before the connection is given up; 0 = the kernel's
    /// retransmission limit (about 15 minutes).
    #[arg(long, env = "KVMI_RELAY_TCP_USER_TIMEOUT_MS", value_name = "MS", default_value = "30000")]
    pub tcp_user_timeout_ms: String,

    /// Mutual TLS 1.3 on the TCP endpoint (listen or connect, whichever is tcp:): this relay's
    /// certificate chain (PEM). Needs --tls-key and --tls-ca.
    #[arg(long, env = "KVMI_RELAY_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<String>,

    /// The private key of --tls-cert (PEM; readable by the owner and at most its group).
    #[arg(long, env = "KVMI_RELAY_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<String>,

    /// The CA (PEM) that must have signed the peer's certificate; a TLS listener requires a
    /// client certificate, a TLS dialler verifies the server's.
    #[arg(long, env = "KVMI_RELAY_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<String>,

    /// The TLS peer must carry one of these DNS or URI SANs (e.g. a SPIFFE id; comma-separated).
    /// Checked after the CA's chain; replaces the dialler's check of the dialled address.
    #[arg(long, env = "KVMI_RELAY_TLS_PEER_NAME", value_name = "NAME", value_delimiter = ',')]
    pub tls_peer_name: Vec<String>,

    /// The TLS peer's key must have one of these SubjectPublicKeyInfo SHA-256 hashes, written
    /// sha256:BASE64 as in RFC 7469 (comma-separated).
    #[arg(long, env = "KVMI_RELAY_TLS_PEER_SPKI", value_name = "PIN", value_delimiter = ',')]
    pub tls_peer_spki: Vec<String>,

    /// How long a TLS handshake may take before the peer is closed (so a silent peer never
    /// holds a --max-conns slot); nothing is dialled or forwarded before it passed.
    #[arg(long, env = "KVMI_RELAY_TLS_HANDSHAKE_TIMEOUT_MS", value_name = "MS", default_value = "5000")]
    pub tls_handshake_timeout_ms: String,

    /// Kernel pipe size per direction in bytes, to start with (F_SETPIPE_SZ; the kernel's answer
    /// is used). Also where copy buffers into TCP start; --move auto's message buffer into UNIX
    /// and vsock is 16 KiB, or this if smaller.
    #[arg(long, env = "KVMI_RELAY_PIPE_SIZE", value_name = "BYTES", default_value = "65536")]
    pub pipe_size: String,

    /// Largest pipe per direction in bytes. A pipe doubles each time a splice fills it (bulk),
    /// up to this, while the kernel allows (fs.pipe-max-size, fs.pipe-user-pages-soft); messages
    /// never grow it.
    #[arg(long, env = "KVMI_RELAY_PIPE_SIZE_MAX", value_name = "BYTES", default_value = "1048576")]
    pub pipe_size_max: String,

    /// How bytes move: auto = copies into TCP (faster there, docs/BENCHMARKS.md), and into UNIX
    /// and vsock copies for messages and splice for bulk (docs/DESIGN.md); splice = splice
    /// everywhere from the first byte; copy = copies only. Splice falls back to copies per
    /// direction where the sockets refuse it.
    #[arg(long, env = "KVMI_RELAY_MOVE", value_name = "HOW", default_value = "auto")]
    pub r#move: MoveArg,

    /// Largest copy buffer per direction in bytes. Copy buffers into TCP start at --pipe-size and
    /// double each time a read fills them (bulk), up to this; messages never grow them.
    #[arg(long, env = "KVMI_RELAY_COPY_BUFFER_MAX", value_name = "BYTES", default_value = "262144")]
    pub copy_buffer_max: String,

    /// Keep polling (yielding the CPU between polls) for this long after the last activity
    /// before sleeping; 0 = always sleep. The default halves the relay's added round trip on
    /// the benchmarks (docs/BENCHMARKS.md) for up to this much CPU per message while traffic flows.
    /// When the yields keep losing the CPU to busy threads (a loaded host), polling stops for
    /// 10 ms to 1 s at a time (counted as poll window suspensions in `stats`).
    #[arg(long, env = "KVMI_RELAY_POLL_WINDOW_US", value_name = "US", default_value = "50")]
    pub poll_window_us: String,

    /// Set SO_BUSY_POLL on the relay's sockets (microseconds; 0 = off).
    #[arg(long, env = "KVMI_RELAY_BUSY_POLL_US", value_name = "US", default_value = "0")]
    pub busy_poll_us: String,

    /// Pin the relay to this CPU.
    #[arg(long, env = "KVMI_RELAY_CPU", value_name = "CPU")]
    pub cpu: Option<String>,

    /// How long SIGTERM/SIGINT waits for bytes in flight to be delivered and both peers to end
    /// their side; sessions still open then end as `aborted`.
    #[arg(long, env = "KVMI_RELAY_SHUTDOWN_TIMEOUT_MS", value_name = "MS", default_value = "3000")]
    pub shutdown_timeout_ms: String,

    /// Log level (error, warn, info, debug, trace); RUST_LOG is used when unset.
    #[arg(long, env = "KVMI_RELAY_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Name used in logs and metrics (the VM), e.g. one-7.
    #[arg(long, env = "KVMI_RELAY_NAME", value_name = "NAME")]
    pub name: Option<String>,

    /// Control socket (UNIX, mode 0600, only the relay's own uid and root): `kvmi-relay stats PATH`,
    /// or HTTP `GET /metrics` (`curl --unix-socket PATH http://localhost/metrics`).
    #[arg(long, env = "KVMI_RELAY_CONTROL", value_name = "PATH")]
    pub control: Option<String>,

    /// Write an HdrHistogram interval log of transit and turnaround here (reopened on SIGHUP).
    #[arg(long, env = "KVMI_RELAY_HIST_LOG", value_name = "FILE")]
    pub hist_log: Option<String>,

    /// Seconds per interval in the --hist-log file.
    #[arg(long, env = "KVMI_RELAY_HIST_INTERVAL", value_name = "SECONDS", default_value = "10")]
    pub hist_interval: String,

    /// Write this instance's Prometheus text to DIR/kvmi-relay-<name>.prom every 10 s (for
    /// node_exporter's textfile collector: one scrape for every relay on the host); removed on stop.
    #[arg(long, env = "KVMI_RELAY_METRICS_TEXTFILE", value_name = "DIR")]
    pub metrics_textfile: Option<String>,

    /// Speak KVMi: read QEMU's handshake before dialling (VM pinning), frame messages, apply
    /// --kvmi-policy, deliver whole messages to the introspector, time each message type.
    /// Without it the relay moves bytes without looking at them.
    #[arg(long, env = "KVMI_RELAY_KVMI", action = ArgAction::SetTrue, value_parser = switch())]
    pub kvmi: String,

    /// With --kvmi: admit only the VM whose handshake carries this UUID (8-4-4-4-12 hex).
    #[arg(long, env = "KVMI_RELAY_KVMI_VM_UUID", value_name = "UUID")]
    pub kvmi_vm_uuid: Option<String>,

    /// With --kvmi: admit only the VM whose handshake carries this name (QEMU's -name).
    #[arg(long, env = "KVMI_RELAY_KVMI_VM_NAME", value_name = "NAME")]
    pub kvmi_vm_name: Option<String>,

    /// With --kvmi: which socket carries QEMU. listen: the hypervisor host's relay, and a monitor
    /// host's relay behind TCP; connect: a relay whose dialled socket leads to QEMU.
    #[arg(long, env = "KVMI_RELAY_KVMI_HYPERVISOR_SIDE", value_name = "SIDE", default_value = "listen")]
    pub kvmi_hypervisor_side: SideArg,

    /// With --kvmi: full = every command passes; read-only = reads and execution control pass,
    /// commands that write guest state (and GET_MAP_TOKEN) get the relay's own EPERM reply,
    /// event replies that would change state are replaced by a plain CONTINUE.
    #[arg(long, env = "KVMI_RELAY_KVMI_POLICY", value_name = "POLICY", default_value = "full")]
    pub kvmi_policy: KvmiPolicyArg,

    /// With --kvmi: commands let through whatever --kvmi-policy says (names, comma-separated).
    #[arg(long, env = "KVMI_RELAY_KVMI_ALLOW", value_name = "COMMAND", value_delimiter = ',')]
    pub kvmi_allow: Vec<String>,

    /// With --kvmi: commands answered with EPERM whatever --kvmi-policy says (names, comma-separated).
    #[arg(long, env = "KVMI_RELAY_KVMI_DENY", value_name = "COMMAND", value_delimiter = ',')]
    pub kvmi_deny: Vec<String>,

    /// With --kvmi: a command id the ABI table does not know: refuse (close the session) or pass.
    #[arg(long, env = "KVMI_RELAY_KVMI_UNKNOWN", value_name = "WHAT", default_value = "refuse")]
    pub kvmi_unknown: KvmiUnknownArg,

    /// With --kvmi: the message numbering spoken (v7: libkvmi and the kvmi-v7 kernel/QEMU).
    #[arg(long, env = "KVMI_RELAY_KVMI_ABI", value_name = "ABI", default_value = "v7")]
    pub kvmi_abi: KvmiAbiArg,

    /// Validate the configuration exactly as start-up would, report every problem, bind nothing.
    #[arg(long, action = ArgAction::SetTrue)]
    pub check: bool,
}

/// How the data path moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MoveArg {
    /// copies into TCP sockets; into UNIX and vsock sockets copies for messages, and splice(2)
    /// through a kernel pipe from the first read that fills a 16 KiB buffer (bulk).
    Auto,
    /// splice(2) through a kernel pipe in both directions.
    Splice,
    /// read/write copies only (splice forced off).
    Copy,
}

/// Which socket carries QEMU (`--kvmi-hypervisor-side`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SideArg {
    Listen,
    Connect,
}

/// `--kvmi-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvmiPolicyArg {
    Full,
    ReadOnly,
}

/// `--kvmi-unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvmiUnknownArg {
    Refuse,
    Pass,
}

/// `--kvmi-abi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvmiAbiArg {
    V7,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Live connections and their latency percentiles from a relay's control socket.
    Stats(StatsArgs),
}

/// `kvmi-relay stats PATH`: live connections and their percentiles from a relay's control socket.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// The relay's control socket (its --control PATH).
    pub path: PathBuf,
    /// JSON for scripts.
    #[arg(long, conflicts_with_all = ["prometheus", "reset"])]
    pub json: bool,
    /// Prometheus text exposition format (for node_exporter's textfile collector or a scraper).
    #[arg(long, conflicts_with = "reset")]
    pub prometheus: bool,
    /// Zero the counters and histograms instead.
    #[arg(long)]
    pub reset: bool,
}
