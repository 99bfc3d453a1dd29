//! Where peers come from and where the far side is: the endpoint syntax (`endpoint`), the
//! listening socket with the identity of every peer it accepts (`listener`), whether a socket
//! file is live, asked of the kernel (`unix_diag`), and the one dial toward the far side
//! (`dial`). Nothing here decides who gets in (that is `access`) or moves a
//! session's bytes (that is `datapath`).

pub mod dial;
pub mod endpoint;
pub mod listener;
pub mod unix_diag;
