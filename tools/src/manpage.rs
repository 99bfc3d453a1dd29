//! kvmi-relay(1), generated from the clap definition so that it never drifts from `--help`
//! (`kvmi-relay-tools man`; `make man`). clap_mangen renders the name, synopsis, description
//! and every option with its `KVMI_RELAY_*` variable; the `stats` command's section is made
//! here from its clap definition too (clap_mangen would only point to a page per subcommand);
//! the sections clap knows nothing about (signals, systemd, files, exit status) follow as
//! fixed roff text.

use std::io::{self, Write};

use clap::CommandFactory;

use kvmi_relay::cli::Cli;

/// Sections after the options: how the relay runs under systemd and where its files live.
const TAIL_ROFF: &str = r#".SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
stop: the listener closes (a socket file the relay bound is removed), no new peer is admitted,
and every live session is drained: bytes in flight are delivered and both peers are asked to end
their side. Sessions still open after \fB\-\-shutdown\-timeout\-ms\fR end as \fBaborted\fR (a TCP
peer sees a reset). The last line is \fBstopped\fR with the life counters.
.TP
\fBSIGHUP\fR
reopen the \fB\-\-hist\-log\fR file (after logrotate moved it) and re\-read \fB\-\-tls\-cert\fR,
\fB\-\-tls\-key\fR and \fB\-\-tls\-ca\fR with start\-up's checks: new sessions use the new files,
live ones keep theirs, and files that no longer pass leave the configuration in force. Nothing
else is re\-read.
.TP
\fBSIGUSR1\fR
log the life counters (live sessions' bytes included) on one line, then one line per live
session with its bytes and latency percentiles.
.SH SYSTEMD
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
one instance's configuration, written by the operator: \fBKVMI_RELAY_\fR\fINAME\fR\fB=\fR\fIvalue\fR
lines, read by \fBEnvironmentFile=\fR.
.TP
\fB/run/kvmi/\fR\fIVM\fR\fB.sock\fR
the socket QEMU dials, held by \fBkvmi\-relay@\fR\fIVM\fR\fB.socket\fR.
.TP
\fB/run/kvmi/\fR\fIVM\fR\fB/control\fR
the instance's control socket under the unit (\fB\-\-control\fR), for \fBkvmi\-relay stats\fR.
.TP
\fB/var/log/kvmi\-relay/\fR\fIVM\fR\fB.hlog\fR
where the unit lets an interval log (\fB\-\-hist\-log\fR) be written.
.TP
\fB/usr/lib/sysusers.d/kvmi\-relay.conf\fR
the static \fBkvmi\-relay\fR user and group the unit runs as.
.SH EXIT STATUS
0 after a clean stop (SIGTERM or SIGINT, bytes in flight delivered) or a passing \fB\-\-check\fR;
2 for a bad configuration or a failed start\-up, with one line per problem on standard error.
\fBkvmi\-relay stats\fR exits 0 with the answer, 1 with one line on standard error when the
path is not a relay's control socket, refuses the caller or does not answer.
.SH SEE ALSO
\fBsystemd.service\fR(5), \fBsystemd.socket\fR(5), \fBsd_notify\fR(3), \fBsd_listen_fds\fR(3)
"#;

/// Writes the whole page: clap_mangen's sections for the relay, a STATS section for the one
/// subcommand, then the fixed sections above and the version.
pub fn render(w: &mut dyn Write) -> io::Result<()> {
    let cmd = Cli::command().disable_help_subcommand(true);
    let man = clap_mangen::Man::new(cmd.clone()).manual("kvmi-relay manual");
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    let stats = cmd.find_subcommand("stats").ok_or_else(|| io::Error::other("no stats subcommand"))?;
    w.write_all(stats_roff(stats).as_bytes())?;
    w.write_all(TAIL_ROFF.as_bytes())?;
    man.render_version_section(w)
}

/// `.SH STATS`: what `kvmi-relay stats` does and each of its arguments, from clap.
fn stats_roff(stats: &clap::Command) -> String {
    let mut o = String::from(".SH STATS\n.B kvmi\\-relay stats\n");
    let (positional, flags): (Vec<_>, Vec<_>) =
        stats.get_arguments().filter(|a| !a.is_hide_set()).partition(|a| a.is_positional());
    for a in &positional {
        o += &format!("\\fI{}\\fR\n", roff_text(&a.get_id().to_string().to_uppercase()));
    }
    let names: Vec<String> =
        flags.iter().filter_map(|a| a.get_long()).map(|l| format!("\\fB\\-\\-{}\\fR", roff_text(l))).collect();
    o += &format!("[{}]\n.PP\n", names.join(" | "));
    let about = stats.get_about().map(|s| s.to_string()).unwrap_or_default();
    o += &roff_text(about.trim_end_matches('.'));
    o += ". A control client sends nothing until the relay has greeted it, so aimed at a data socket it puts no byte into a VM's session and says the path is not a control socket (exit 1).\n";
    for a in positional.iter().chain(&flags) {
        let name = match a.get_long() {
            Some(l) => format!("\\fB\\-\\-{}\\fR", roff_text(l)),
            None => format!("\\fI{}\\fR", roff_text(&a.get_id().to_string().to_uppercase())),
        };
        let help = a.get_long_help().or(a.get_help()).map(|s| s.to_string()).unwrap_or_default();
        o += &format!(".TP\n{name}\n{}\n", roff_text(&help));
    }
    o
}

/// Text as roff prints it: backslashes and hyphens escaped, no line starting with a control
/// character.
fn roff_text(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    s.lines()
        .map(|l| if l.starts_with(['.', '\'']) { format!("\\&{l}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> String {
        let mut out = Vec::new();
        render(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_page_says_what_the_relay_does_and_documents_stats_and_signals() {
        let p = page();
        assert!(!p.contains("zero\\-copy") && !p.contains("zero-copy"), "messages are copied by design");
        assert!(!p.contains("kvmi\\-relay\\-stats"), "there is no kvmi-relay-stats(1)");
        let stats = &p[p.find(".SH STATS").expect("a STATS section")..];
        for flag in ["json", "prometheus", "reset"] {
            assert!(stats.contains(&format!("\\fB\\-\\-{flag}\\fR")), "stats --{flag} documented");
        }
        let signals = &p[p.find(".SH SIGNALS").expect("a SIGNALS section")..];
        for sig in ["SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1"] {
            assert!(signals.contains(sig), "{sig} documented");
        }
        for section in
            ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "STATS", "SIGNALS", "FILES", "EXIT STATUS", "VERSION"]
        {
            assert_eq!(
                p.matches(&format!("\n.SH {section}")).count() + usize::from(p.starts_with(&format!(".SH {section}"))),
                1,
                "one {section} section"
            );
        }
        assert!(p.contains("KVMI_RELAY_METRICS_TEXTFILE"), "every option with its variable");
    }

    #[test]
    fn roff_text_keeps_help_from_becoming_requests() {
        assert_eq!(roff_text("a-b \\x"), "a\\-b \\ex");
        assert_eq!(roff_text(".SH x\n'y"), "\\&.SH x\n\\&'y");
    }
}
