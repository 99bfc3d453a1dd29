//! Start-up errors: one variant per failing operation, each naming the flag or path at fault
//! and carrying the OS error. Paths and endpoints are outside values, printed `Escaped` (one
//! line each, whatever they hold). Per-connection errors never come here: the event loop logs
//! them, closes that connection and keeps serving.

use std::io;
use std::path::PathBuf;

use crate::config::ConfigErrors;
use crate::escape::Escaped;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Activation(#[from] ActivationError),
    #[error("{}: {} is a live socket (something still answers there); refusing to replace it", Escaped(endpoint), Escaped(path.display()))]
    LiveSocket { endpoint: String, path: PathBuf },
    #[error("{}: cannot tell whether {} is still in use: {source}", Escaped(endpoint), Escaped(path.display()))]
    ProbeSocket { endpoint: String, path: PathBuf, source: io::Error },
    #[error("{}: {} exists and is not a socket; refusing to replace it", Escaped(endpoint), Escaped(path.display()))]
    NotASocket { endpoint: String, path: PathBuf },
    #[error("{}: cannot remove the stale socket {}: {source}", Escaped(endpoint), Escaped(path.display()))]
    RemoveStale { endpoint: String, path: PathBuf, source: io::Error },
    #[error("{}: cannot create the socket: {source}", Escaped(endpoint))]
    Socket { endpoint: String, source: io::Error },
    #[error("{}: cannot bind: {source}", Escaped(endpoint))]
    Bind { endpoint: String, source: io::Error },
    #[error("{}: cannot listen: {source}", Escaped(endpoint))]
    Listen { endpoint: String, source: io::Error },
    #[error("{}: {}: {source}", Escaped(endpoint), Escaped(path.display()))]
    Replaced { endpoint: String, path: PathBuf, source: io::Error },
    #[error("{}: {} came out {got:04o}, more open than {mode:04o} (--socket-mode; a default ACL on its directory overrides the umask)", Escaped(endpoint), Escaped(path.display()))]
    Mode { endpoint: String, mode: u32, got: u32, path: PathBuf },
    #[error("{}: cannot chown {} to group {gid} (--socket-group): {source}", Escaped(endpoint), Escaped(path.display()))]
    Chown { endpoint: String, gid: u32, path: PathBuf, source: io::Error },
    #[error("--hist-log {}: cannot open: {source}", Escaped(path.display()))]
    HistLog { path: PathBuf, source: io::Error },
    #[error("--cpu {cpu}: cannot pin the relay to it: {source}")]
    Pin { cpu: usize, source: io::Error },
    #[error("cannot create the event loop: {0}")]
    Poll(io::Error),
    #[error("cannot install the signal handlers: {0}")]
    Signals(io::Error),
    #[error("cannot ignore SIGPIPE: {0}")]
    SigPipe(io::Error),
    #[error("event loop failed: {0}")]
    Loop(io::Error),
}

/// Socket activation failures: each names what the service manager passed and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: cannot read LISTEN_FDS/LISTEN_FDNAMES: {0}")]
    Env(io::Error),
    #[error(
        "socket activation: the service manager passed {count} sockets ({}); one relay serves exactly one, \
         so its socket unit must have one ListenStream=",
        Escaped(names)
    )]
    TooMany { count: usize, names: String },
    #[error("socket activation: cannot take over fd {fd} ({}): {source}", Escaped(name))]
    Adopt { fd: i32, name: String, source: io::Error },
    #[error("socket activation: fd {fd} ({}) is not a listening stream socket", Escaped(name))]
    NotListening { fd: i32, name: String },
    #[error(
        "--listen {} (KVMI_RELAY_LISTEN): the service manager passed {} listening on {}; \
         make KVMI_RELAY_LISTEN and the socket unit's ListenStream= name the same endpoint",
        Escaped(listen),
        Escaped(name),
        Escaped(actual)
    )]
    Mismatch { listen: String, name: String, actual: String },
}
