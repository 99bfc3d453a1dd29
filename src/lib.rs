//! kvmi-relay: an access-controlled relay for one VM's KVMi introspection socket.
//!
//! Where things are:
//! - bytes move in `datapath/` (`pump.rs`: one pump per direction, its bytes in a `store.rs`
//!   buffer or pipe, copy or splice decided by `policy.rs`, a pure function; driven by `conn.rs`,
//!   one session's state machine); `relay/` is the event loop, the only poller user
//!   (`relay/operator.rs` serves the control socket, snapshots and the interval log from it,
//!   `relay/service.rs` talks to systemd);
//! - peers come from `net/` (endpoints, the listener gathering identities, the dial); access is
//!   decided in `access.rs` (pure functions);
//! - what is observed is `observe/` (histograms, export, interval log, control protocol);
//! - the protocol layers between a connection and its pump: `kvmi/` (pure) and `tls/`;
//! - `unsafe` lives in `sys.rs` only (the crate denies `unsafe_code`; `sys` alone is allowed);
//! - the command line stops at `cli.rs`; `config.rs` is the border to everything else.
//!
//! The fake KVMi peers, test peers, demo and man-page generator are the `kvmi-relay-tools`
//! package (`tools/`), which depends on this library; nothing here depends on it.

#![deny(unsafe_code)]

pub mod access;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod error;
pub mod escape;
pub mod files;
pub mod kvmi;
pub mod net;
pub mod observe;
pub mod relay;
#[allow(unsafe_code)]
pub mod sys;
pub mod tls;

use std::io::IsTerminal;

use crate::config::Config;
use crate::error::StartError;

/// Sets up `tracing` on stderr: level from `--log-level`, else RUST_LOG, else info. Under
/// systemd (JOURNAL_STREAM set) the journal stamps lines itself, so no timestamps are printed.
///
/// The filter is `tracing_subscriber`'s `Targets` (a level, or `target=level,...`), not
/// `EnvFilter`: same syntax for what an operator sets here, without the regex engine that
/// `EnvFilter` links in (~30 % of the binary's text, resident in every relay).
pub fn init_logging(level: Option<&str>) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;

    // `level` was checked by the configuration. RUST_LOG is nobody's typed-in flag: when it is
    // not a filter this relay understands, it is ignored rather than allowed to silence the relay.
    let text =
        level.map(str::to_owned).or_else(|| std::env::var("RUST_LOG").ok().filter(|l| config::log_filter_is_valid(l)));
    let filter = text
        .and_then(|t| t.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    // Every field and message goes through `escape`: no value can start a line of its own.
    let layer = tracing_subscriber::fmt::layer()
        .fmt_fields(escape::EscapedFields)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        registry.with(layer.without_time()).try_init()
    } else {
        registry.with(layer).try_init()
    };
}

/// Everything start-up does after the configuration is valid: bind, set up the loop, run.
pub fn serve(cfg: Config) -> Result<(), StartError> {
    sys::ignore_sigpipe().map_err(StartError::SigPipe)?;
    sys::return_big_buffers_to_the_kernel();
    if let Some(cpu) = cfg.cpu {
        sys::pin_this_thread(cpu).map_err(|source| StartError::Pin { cpu, source })?;
    }
    // A socket the service manager holds (socket activation) is used instead of binding one.
    let listener = match relay::service::inherited_listener(&cfg)? {
        Some(l) => l,
        None => net::listener::Listener::bind(&cfg)?,
    };
    let (name, listen, bound, connect, max_conns) = (
        cfg.name.clone(),
        cfg.listen.to_string(),
        listener.bound().to_string(),
        cfg.connect.to_string(),
        cfg.max_conns,
    );
    if let Some(t) = &cfg.tls {
        for w in &t.loaded.warnings {
            tracing::warn!(file = %w, "tls: accepted with a warning");
        }
        let own = &t.loaded.own;
        tracing::info!(own = %own, not_after = %tls::utc_text(own.not_after), "tls: mutual TLS 1.3 on the tcp: endpoint");
        if let Some(left) = tls::expiry_warning(own, std::time::SystemTime::now()) {
            tracing::warn!(
                days_left = left.as_secs() / 86_400,
                not_after = %tls::utc_text(own.not_after),
                "tls: the relay's own certificate expires soon; renew it"
            );
        }
    }
    // Signal handlers exist once `new` returns: "listening" comes after, so whoever waits for it
    // (a test, an operator) may stop the relay with SIGTERM and have it clean up.
    let mut relay = relay::Relay::new(cfg, listener)?;
    tracing::info!(%name, %listen, %bound, %connect, max_conns, "listening");
    relay.run()
}
