//! Where peers come from and where the far side is: the endpoint syntax (`endpoint`), the
//! listening socket with the identity of every peer it accepts (`listener`), whether a socket
//! file is live, asked of the kernel (`unix_diag`), the one dial toward the far side
//! (`dial`), and what every TCP socket is set to (`tcp`: no Nagle, keepalive, user timeout). Nothing here decides who gets in (that is `access`) or moves a
//! session's bytes (that is `datapath`).

pub mod dial;
pub mod endpoint;
pub mod listener;
pub mod tcp;
pub mod unix_diag;
