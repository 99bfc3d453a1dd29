//! kvmi-relay(1), generated from the clap definition so that it never drifts from `--help`
//! (`kvmi-relay-tools man`; `make man`). clap_mangen renders the name, synopsis, description
//! and every option with its `KVMI_RELAY_*` variable; the sections clap knows nothing about
//! (systemd, files, exit status) follow as fixed roff text.

use std::io::{self, Write};

use clap::CommandFactory;

use kvmi_relay::cli::Cli;

/// Sections after the options: how the relay runs under systemd and where its files live.
const TAIL_ROFF: &str = r#".SH SYSTEMD
One relay serves one VM. The template unit \fBkvmi\-relay@.service\fR runs an instance per VM
(the instance name is the VM name, e.g. \fBkvmi\-relay@one\-7\fR) with \fBType=notify\fR:
the relay sends \fBREADY=1\fR once it listens, \fBSTATUS=\fR with its live sessions when they
change, \fBWATCHDOG=1\fR from its event loop every half \fBWATCHDOG_USEC\fR, and
\fBSTOPPING=1\fR on SIGTERM. \fBExecStartPre=\fR runs \fBkvmi\-relay \-\-check\fR, so a broken
configuration fails before anything is bound, each problem on its own line.
.PP
With \fBkvmi\-relay@.socket\fR the per\-VM socket \fB/run/kvmi/\fR\fIVM\fR\fB.sock\fR is held by
systemd and handed over through \fBLISTEN_FDS\fR; the relay can then be restarted or upgraded
while QEMU keeps dialling the same socket. \fB\-\-listen\fR must name the socket the service
manager passes (\fBKVMI_RELAY_LISTEN=unix:/run/kvmi/\fR\fIVM\fR\fB.sock\fR); a different one is
refused at start\-up. The relay never removes or re\-binds an inherited socket; its mode and group
are the socket unit's \fBSocketMode=\fR and \fBSocketGroup=\fR.
.SH ENVIRONMENT
Every option above can be given as its \fBKVMI_RELAY_\fR variable; a command\-line flag wins.
.TP
\fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR, \fBWATCHDOG_PID\fR
set by systemd for \fBType=notify\fR and \fBWatchdogSec=\fR; without them nothing is sent.
.TP
\fBLISTEN_FDS\fR, \fBLISTEN_PID\fR, \fBLISTEN_FDNAMES\fR
socket activation: exactly one listening socket, for this process, is used instead of binding.
.TP
\fBJOURNAL_STREAM\fR
log lines carry no timestamps (the journal adds its own).
.SH FILES
.TP
\fB/etc/kvmi\-relay/\fR\fIVM\fR\fB.conf\fR
one instance's configuration: \fBKVMI_RELAY_\fR\fINAME\fR\fB=\fR\fIvalue\fR lines, read by
\fBEnvironmentFile=\fR.
.TP
\fB/run/kvmi/\fR\fIVM\fR\fB.sock\fR
the socket QEMU dials, held by \fBkvmi\-relay@\fR\fIVM\fR\fB.socket\fR.
.SH EXIT STATUS
0 after a clean stop (SIGTERM or SIGINT, bytes in flight delivered) or a passing \fB\-\-check\fR;
2 for a bad configuration or a failed start\-up, with one line per problem on standard error.
.SH SEE ALSO
\fBsystemd.service\fR(5), \fBsystemd.socket\fR(5), \fBsd_notify\fR(3), \fBsd_listen_fds\fR(3)
"#;

/// Writes the whole page: clap_mangen's, with the sections above put before VERSION. The
/// subcommands are all hidden test peers; without `help` no SUBCOMMANDS section is left.
pub fn render(w: &mut dyn Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(Cli::command().disable_help_subcommand(true)).manual("kvmi-relay manual");
    let mut page = Vec::new();
    man.render(&mut page)?;
    let page = String::from_utf8(page).map_err(io::Error::other)?;
    let at = page.find("\n.SH VERSION").map_or(page.len(), |i| i + 1);
    w.write_all(&page.as_bytes()[..at])?;
    w.write_all(TAIL_ROFF.as_bytes())?;
    w.write_all(&page.as_bytes()[at..])
}
