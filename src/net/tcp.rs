//! What every TCP socket the relay owns is set to, accepted or dialled: no Nagle delay (KVMi's
//! small messages are request/reply), urgent data inline (SO_OOBINLINE), and a way to notice a peer that vanished without FIN or
//! reset (power loss, a partition). Without the latter an idle session would hold its
//! `--max-conns` slot for hours and turn away the next hypervisor after a migration or restart.
//!
//! Keepalive finds the silence of an idle session; TCP_USER_TIMEOUT bounds how long sent data
//! (and, since Linux 4.x, unanswered probes) may stay unacknowledged, which keepalive alone does
//! not when data is outstanding.

use std::io;

use socket2::{Socket, TcpKeepalive};

use crate::config::{TCP_KEEPALIVE_INTERVAL_S, TCP_KEEPALIVE_PROBES, TcpLiveness};

pub fn tune(s: &Socket, live: &TcpLiveness) -> io::Result<()> {
    s.set_tcp_nodelay(true)?;
    // Urgent data stays in the stream, in order: the relay carries bytes, and a byte taken out
    // of band would be lost (and would break "a short read means the queue is empty").
    s.set_out_of_band_inline(true)?;
    if let Some(idle) = live.keepalive_idle {
        let ka = TcpKeepalive::new()
            .with_time(idle)
            .with_interval(std::time::Duration::from_secs(TCP_KEEPALIVE_INTERVAL_S))
            .with_retries(TCP_KEEPALIVE_PROBES);
        s.set_tcp_keepalive(&ka)?;
    }
    if let Some(t) = live.user_timeout {
        s.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}
