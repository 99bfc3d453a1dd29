//! The command line and the environment (`KVMI_RELAY_*`, what a systemd `EnvironmentFile=`
//! sets), through clap and `Config::try_from`, as start-up and `--check` run them: never a
//! panic; a refusal is one line per problem, each naming its flag and variable, with no
//! control character anywhere (an outside value cannot forge a line); an accepted
//! configuration's endpoints print back to what they were parsed from and its allow-list is
//! canonical. Input: one word per line, or `KVMI_RELAY_NAME=value` to set that variable; NUL
//! bytes are dropped (neither argv nor the environment can hold one).
#![no_main]
use clap::{CommandFactory, Parser};
use kvmi_relay::access::{canonical_net, parse_rule};
use kvmi_relay::cli::Cli;
use kvmi_relay::config::Config;
use kvmi_relay::net::endpoint::Endpoint;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// (--flag, VARIABLE) of every relay argument.
fn flags() -> &'static [(String, Option<String>)] {
    static FLAGS: OnceLock<Vec<(String, Option<String>)>> = OnceLock::new();
    FLAGS.get_or_init(|| {
        Cli::command()
            .get_arguments()
            .filter_map(|a| {
                Some((format!("--{}", a.get_long()?), a.get_env().and_then(|e| e.to_str()).map(String::from)))
            })
            .collect()
    })
}

// Input: one word per line; a line `KVMI_RELAY_NAME=value` sets that variable instead.
fuzz_target!(|data: &[u8]| {
    let flags = flags();
    let text = String::from_utf8_lossy(data).replace('\0', "");
    let mut argv = vec!["kvmi-relay".to_string()];
    let mut env = Vec::new();
    for line in text.split('\n') {
        match line.split_once('=') {
            Some((var, val)) if var.starts_with("KVMI_RELAY_") && !var.is_empty() => {
                env.push((var.to_string(), val.to_string()));
            }
            _ => argv.push(line.to_string()),
        }
    }
    for (var, val) in &env {
        // SAFETY: the fuzz target runs on one thread; nothing else reads the environment.
        unsafe { std::env::set_var(var, val) };
    }
    let parsed = Cli::try_parse_from(&argv);
    for (var, _) in &env {
        // SAFETY: as above.
        unsafe { std::env::remove_var(var) };
    }
    let Ok(cli) = parsed else { return };
    if cli.command.is_some() {
        return;
    }
    match Config::try_from(cli.relay) {
        Err(errors) => {
            let text = errors.to_string();
            let lines: Vec<&str> = text.split('\n').collect();
            assert_eq!(lines.len(), errors.0.len(), "{argv:?} {env:?}: {text:?}");
            for (line, e) in lines.iter().zip(&errors.0) {
                assert!(!line.chars().any(char::is_control), "{argv:?} {env:?}: control character in {line:?}");
                assert!(line.starts_with(&format!("{} ({}): ", e.flag, e.env)), "{line:?}");
                assert!(flags.iter().any(|(f, v)| f == e.flag && v.as_deref() == Some(e.env)), "{line:?}");
            }
        }
        Ok(cfg) => {
            for ep in [&cfg.listen, &cfg.connect] {
                assert_eq!(Endpoint::parse(&ep.to_string()).as_ref(), Ok(ep));
            }
            for net in &cfg.policy.nets {
                assert_eq!(canonical_net(*net), *net);
                assert_eq!(parse_rule(&net.to_string()), Some(*net));
            }
        }
    }
});
