//! The service manager's protocols, and nothing else: readiness, status, stopping and watchdog
//! (`sd_notify`, through `NOTIFY_SOCKET`) and socket activation (`LISTEN_FDS`).
//!
//! Both protocols come from the `sd-notify` crate; this file decides when to speak them.
//! Invariants:
//! - `READY=1` is sent once, from the event loop's first turn: the listener is listening (or
//!   held since before we started) and registered, so a peer dialling now is served.
//! - `STATUS=` is sent only when what it reports changes (live sessions, admitted, refused),
//!   at most once per loop turn, never on every turn.
//! - `WATCHDOG=1` is sent by the loop itself when a ping is due; the loop wakes up for it
//!   (`Notifier::next_deadline`). A loop that stops turning stops pinging, and the service
//!   manager restarts it. Pings go out every half `WATCHDOG_USEC`, as sd_watchdog_enabled(3) asks.
//! - Without `NOTIFY_SOCKET` every call is a no-op: the relay runs the same outside systemd.
//! - An inherited socket is used as it is: never bound again, never chmod'ed or chown'ed (the
//!   socket unit owns mode and group), and its file is never removed by the relay. It must be
//!   the one `--listen` names, so one configuration file means the same with or without the
//!   socket unit, and a disagreement fails start-up instead of serving an unexpected endpoint.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use socket2::{Domain, Socket, Type};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::error::ActivationError;
use crate::net::endpoint::{Endpoint, VSOCK_CID_ANY};
use crate::net::listener::Listener;
use crate::observe::totals::Totals;

/// What `STATUS=` reports; sent again only when one of these changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Sessions being relayed now.
    pub live: usize,
    /// `--max-conns`.
    pub max_conns: usize,
    pub admitted: u64,
    /// Refused by the access policy or because `--max-conns` sessions were running.
    pub refused: u64,
}

impl Status {
    pub fn new(live: usize, max_conns: usize, totals: &Totals) -> Status {
        Status { live, max_conns, admitted: totals.admitted, refused: totals.refused_access + totals.refused_busy }
    }

    fn line(&self) -> String {
        format!(
            "{}/{} sessions live; {} admitted, {} refused since start",
            self.live, self.max_conns, self.admitted, self.refused
        )
    }
}

/// Talks to the service manager through `NOTIFY_SOCKET`, driven by the event loop.
#[derive(Debug)]
pub struct Notifier {
    /// Whether `NOTIFY_SOCKET` is set; without it nothing is sent.
    enabled: bool,
    /// How often to ping: half of `WATCHDOG_USEC`, or `None` without a watchdog.
    watchdog_every: Option<Duration>,
    /// When the next `WATCHDOG=1` is due.
    next_ping: Option<Instant>,
    /// What the last `STATUS=` said.
    last_status: Option<Status>,
    /// A failed send is logged once, not on every ping.
    warned: bool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (a watchdog meant for another
    /// process is ignored).
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty());
        let watchdog_every = sd_notify::watchdog_enabled().filter(|d| !d.is_zero()).map(|d| d / 2);
        Notifier { enabled, watchdog_every, next_ping: None, last_status: None, warned: false }
    }

    /// The loop must wake up by then to ping the watchdog.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_ping
    }

    /// Sends `READY=1` with the first status, and starts the watchdog clock.
    pub fn ready(&mut self, now: Instant, status: Status) {
        if let Some(every) = self.watchdog_every {
            info!(every_ms = every.as_millis() as u64, "watchdog pings on");
            self.next_ping = Some(now + every);
        }
        if !self.enabled {
            return;
        }
        let line = status.line();
        self.send(&[NotifyState::Ready, NotifyState::Status(&line)]);
        self.last_status = Some(status);
    }

    /// Called once per loop turn: pings the watchdog when due, reports a changed status.
    pub fn turn(&mut self, now: Instant, status: Status) {
        if self.next_ping.is_some_and(|t| now >= t) {
            self.next_ping = self.watchdog_every.map(|every| now + every);
            if self.enabled {
                self.send(&[NotifyState::Watchdog]);
            }
        }
        if self.enabled && self.last_status.is_some_and(|s| s != status) {
            let line = status.line();
            self.send(&[NotifyState::Status(&line)]);
            self.last_status = Some(status);
        }
    }

    /// Sends `STOPPING=1`: the relay accepts no more peers and is draining.
    pub fn stopping(&mut self, live: usize) {
        if self.enabled {
            let line = format!("stopping: draining {live} sessions");
            self.send(&[NotifyState::Stopping, NotifyState::Status(&line)]);
        }
    }

    fn send(&mut self, states: &[NotifyState<'_>]) {
        match sd_notify::notify(states) {
            Ok(()) => debug!(states = ?states, "notified the service manager"),
            // The relay serves on without the service manager's bookkeeping: worth one
            // warning, not one per watchdog ping.
            Err(e) if !self.warned => {
                self.warned = true;
                warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET); carrying on");
            }
            Err(_) => {}
        }
    }
}

/// The listening socket the service manager passed (LISTEN_FDS, for this process per
/// LISTEN_PID), checked against `--listen`; `None` when nothing was passed.
pub fn inherited_listener(cfg: &Config) -> Result<Option<Listener>, ActivationError> {
    let passed: Vec<(i32, String)> = sd_notify::listen_fds_with_names().map_err(ActivationError::Env)?.collect();
    let (fd, name) = match passed.as_slice() {
        [] => return Ok(None),
        [one] => one.clone(),
        many => {
            let names = many.iter().map(|(fd, n)| format!("fd {fd} {n}")).collect::<Vec<_>>().join(", ");
            return Err(ActivationError::TooMany { count: many.len(), names });
        }
    };
    let owned = crate::sys::adopt_inherited_fd(fd).map_err(|source| ActivationError::Adopt {
        fd,
        name: name.clone(),
        source,
    })?;
    let socket = Socket::from(owned);
    let listening = socket.r#type().is_ok_and(|t| t == Type::STREAM) && socket.is_listener().unwrap_or(false);
    if !listening {
        return Err(ActivationError::NotListening { fd, name });
    }
    let actual = local_endpoint(&socket).map_err(|source| ActivationError::Adopt { fd, name: name.clone(), source })?;
    if !same_endpoint(&cfg.listen, &actual) {
        return Err(ActivationError::Mismatch {
            listen: cfg.listen.to_string(),
            name,
            actual: actual.map_or_else(|| "an address of another family".into(), |e| e.to_string()),
        });
    }
    if let Endpoint::Unix(path) = &cfg.listen {
        warn_if_access_differs(cfg, path);
    }
    let listener =
        Listener::adopt(socket).map_err(|source| ActivationError::Adopt { fd, name: name.clone(), source })?;
    info!(fd, name = %name, listen = %cfg.listen, "using the socket the service manager passed");
    Ok(Some(listener))
}

/// The endpoint an inherited socket is bound to, in `--listen` terms (`None`: a family the
/// relay does not serve).
fn local_endpoint(socket: &Socket) -> io::Result<Option<Endpoint>> {
    let addr = socket.local_addr()?;
    Ok(match addr.domain() {
        Domain::UNIX => addr.as_pathname().map(|p| Endpoint::Unix(p.to_path_buf())),
        Domain::IPV4 | Domain::IPV6 => addr.as_socket().map(Endpoint::Tcp),
        Domain::VSOCK => addr.as_vsock_address().map(|(cid, port)| Endpoint::Vsock { cid, port }),
        _ => None,
    })
}

/// Whether the socket bound at `actual` is the one `--listen` names. UNIX paths are compared by
/// the file they lead to, so `/run/kvmi/x.sock` and a symlinked spelling of it agree.
fn same_endpoint(listen: &Endpoint, actual: &Option<Endpoint>) -> bool {
    match (listen, actual) {
        (Endpoint::Unix(want), Some(Endpoint::Unix(got))) => want == got || same_file(want, got),
        (Endpoint::Tcp(want), Some(Endpoint::Tcp(got))) => want == got,
        (Endpoint::Vsock { cid: want_cid, port: want_port }, Some(Endpoint::Vsock { cid, port })) => {
            want_port == port && (*want_cid == VSOCK_CID_ANY || want_cid == cid)
        }
        _ => false,
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The socket unit sets mode and group (`SocketMode=`, `SocketGroup=`); the relay changes
/// neither, but says so when the configuration expects something else.
fn warn_if_access_differs(cfg: &Config, path: &PathBuf) {
    let Ok(meta) = std::fs::metadata(path) else { return };
    let mode = meta.mode() & 0o777;
    if mode != cfg.socket_mode {
        warn!(
            path = %path.display(),
            file_mode = format_args!("{mode:04o}"),
            socket_mode = format_args!("{:04o}", cfg.socket_mode),
            "inherited socket file's mode differs from --socket-mode; the socket unit's SocketMode= applies"
        );
    }
    if let Some(gid) = cfg.socket_gid {
        if meta.gid() != gid {
            warn!(
                path = %path.display(),
                file_gid = meta.gid(),
                socket_gid = gid,
                "inherited socket file's group differs from --socket-group; the socket unit's SocketGroup= applies"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn totals(admitted: u64, refused_access: u64, refused_busy: u64) -> Totals {
        Totals { admitted, refused_access, refused_busy, ..Totals::default() }
    }

    #[test]
    fn status_line_says_live_of_max_and_counts() {
        let s = Status::new(1, 2, &totals(5, 2, 1));
        assert_eq!(s.line(), "1/2 sessions live; 5 admitted, 3 refused since start");
    }

    #[test]
    fn endpoints_agree_only_when_they_name_the_same_socket() {
        let tcp: SocketAddr = "127.0.0.1:7".parse().unwrap();
        assert!(same_endpoint(&Endpoint::Tcp(tcp), &Some(Endpoint::Tcp(tcp))));
        assert!(!same_endpoint(&Endpoint::Tcp(tcp), &Some(Endpoint::Tcp("127.0.0.1:8".parse().unwrap()))));
        let any = Endpoint::Vsock { cid: VSOCK_CID_ANY, port: 9 };
        assert!(same_endpoint(&any, &Some(Endpoint::Vsock { cid: 3, port: 9 })));
        assert!(!same_endpoint(&Endpoint::Vsock { cid: 4, port: 9 }, &Some(Endpoint::Vsock { cid: 3, port: 9 })));
        let unix = Endpoint::Unix("/run/kvmi/one-7.sock".into());
        assert!(same_endpoint(&unix, &Some(Endpoint::Unix("/run/kvmi/one-7.sock".into()))));
        assert!(!same_endpoint(&unix, &Some(Endpoint::Unix("/run/kvmi/one-8.sock".into()))));
        assert!(!same_endpoint(&unix, &Some(Endpoint::Tcp(tcp))));
        assert!(!same_endpoint(&unix, &None));
    }

    #[test]
    fn without_notify_socket_nothing_is_due_but_the_watchdog_clock() {
        let mut n = Notifier {
            enabled: false,
            watchdog_every: Some(Duration::from_millis(50)),
            next_ping: None,
            last_status: None,
            warned: false,
        };
        let t0 = Instant::now();
        n.ready(t0, Status::new(0, 1, &Totals::default()));
        assert_eq!(n.next_deadline(), Some(t0 + Duration::from_millis(50)));
        n.turn(t0 + Duration::from_millis(60), Status::new(0, 1, &Totals::default()));
        assert_eq!(n.next_deadline(), Some(t0 + Duration::from_millis(110)));
    }
}
