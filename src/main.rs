//! `kvmi-relay`: the daemon (and its `stats` client): parse, validate, serve. Start-up problems
//! (unknown `KVMI_RELAY_*` variables among them) end here as one line each on stderr and exit
//! code 2; a clean stop (SIGTERM/SIGINT) exits 0.
//! Test peers, the demo and the man page are the separate package `kvmi-relay-tools` (tools/).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use kvmi_relay::cli::{Cli, Command};
use kvmi_relay::config::{self, Config};
use kvmi_relay::escape::Escaped;
use kvmi_relay::observe::control::StatsFormat;

/// Exit code for bad input and failed start-up (as clap uses for usage errors).
const EXIT_BAD_START: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("kvmi-relay: {}", usage_line(&e));
            return ExitCode::from(EXIT_BAD_START);
        }
    };
    let code = match cli.command {
        Some(Command::Stats(a)) => {
            let format = match (a.json, a.prometheus, a.reset) {
                (_, _, true) => StatsFormat::Reset,
                (true, _, _) => StatsFormat::Json,
                (_, true, _) => StatsFormat::Prometheus,
                _ => StatsFormat::Text,
            };
            kvmi_relay::observe::control::stats(&a.path, format)
        }
        None => return relay(cli),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn relay(cli: Cli) -> ExitCode {
    let check = cli.relay.check;
    // A variable no flag reads is a typo the relay would otherwise silently run without.
    let unknown = config::unknown_variables(std::env::vars_os().map(|(name, _)| name));
    for u in &unknown {
        eprintln!("kvmi-relay: {u}");
    }
    let cfg = match Config::try_from(cli.relay) {
        Ok(c) if unknown.is_empty() => c,
        Ok(_) => return ExitCode::from(EXIT_BAD_START),
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("kvmi-relay: {e}");
            }
            return ExitCode::from(EXIT_BAD_START);
        }
    };
    if check {
        println!(
            "kvmi-relay: configuration ok: listen {} → connect {} ({}); {}",
            Escaped(&cfg.listen),
            Escaped(&cfg.connect),
            Escaped(&cfg.name),
            cfg.policy.admits(cfg.listen.kind())
        );
        return ExitCode::SUCCESS;
    }
    kvmi_relay::init_logging(cfg.log_level.as_deref());
    match kvmi_relay::serve(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvmi-relay: {e}");
            ExitCode::from(EXIT_BAD_START)
        }
    }
}

/// A usage error as one line with every outside character escaped: clap quotes what was typed
/// verbatim (a newline in a value would start a line of its own) and spreads one problem over
/// several lines with a usage reminder.
fn usage_line(e: &clap::Error) -> String {
    let get = |kind| {
        e.get(kind).map(|v| match v {
            ContextValue::String(s) => s.clone(),
            ContextValue::Strings(v) => v.join(", "),
            other => other.to_string(),
        })
    };
    let arg = get(ContextKind::InvalidArg).unwrap_or_default();
    match (e.kind(), get(ContextKind::InvalidValue)) {
        (ErrorKind::InvalidValue, Some(value)) if value.is_empty() => format!("{}: needs a value", Escaped(&arg)),
        (ErrorKind::InvalidValue, Some(value)) => {
            let valid = get(ContextKind::ValidValue).filter(|v| !v.is_empty());
            let valid = valid.map(|v| format!(" (one of {v})")).unwrap_or_default();
            format!("{}: invalid value '{}'{valid}", Escaped(&arg), Escaped(&value))
        }
        (ErrorKind::UnknownArgument, _) => {
            let hint = get(ContextKind::SuggestedArg).map(|s| format!("; did you mean {s}?")).unwrap_or_default();
            format!("unknown argument '{}'{}", Escaped(&arg), Escaped(&hint))
        }
        (ErrorKind::InvalidSubcommand, _) => {
            let what = get(ContextKind::InvalidSubcommand).unwrap_or_default();
            format!("unknown subcommand '{}' (the one subcommand is stats)", Escaped(&what))
        }
        _ => {
            // clap's text without its usage reminder, its lines joined.
            let text = e.render().to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            let joined = lines.join("; ");
            Escaped(joined.strip_prefix("error: ").unwrap_or(&joined)).to_string()
        }
    }
}
