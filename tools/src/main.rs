//! `kvmi-relay-tools`: what the test suite, the benches, the test guests, `make demo` and
//! `make man` need besides the relay: the fake KVMi peers, the test peers, the demo and the man
//! page (the library beside this file). Kept out of `kvmi-relay` so that the daemon that holds a
//! VM's introspection socket carries no test code. Never installed.

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kvmi_relay_tools::peers::cli as peers;

/// Test peers, fake KVMi peers, the demo and the man page of kvmi-relay (not installed).
#[derive(Debug, Parser)]
#[command(name = "kvmi-relay-tools", version)]
struct ToolsCli {
    #[command(subcommand)]
    command: Tool,
}

#[derive(Debug, Subcommand)]
enum Tool {
    /// Fake hypervisor (QEMU+KVM side of KVMi): dials ENDPOINT, sends the handshake, serves commands.
    FakeHypervisor(peers::FakeHypervisorArgs),
    /// Fake introspector (libkvmi side): listens on ENDPOINT, runs a passive and an active burst.
    FakeIntrospector(peers::FakeIntrospectorArgs),
    /// Test peers for the test suite, benches and the guest: bulk, echo, ping-pong.
    Peer(peers::PeerArgs),
    /// The network flavor end to end on this machine: fake hypervisor → relay → TCP → relay →
    /// fake introspector (runs the `kvmi-relay` next to this binary).
    Demo(kvmi_relay_tools::demo::DemoArgs),
    /// Writes the kvmi-relay(1) man page, generated from the relay's flag definitions, to stdout
    /// (`make man`).
    Man,
}

fn main() -> ExitCode {
    let code = match ToolsCli::parse().command {
        Tool::FakeHypervisor(a) => peers::fake_hypervisor(a),
        Tool::FakeIntrospector(a) => peers::fake_introspector(a),
        Tool::Peer(a) => peers::peer(a),
        Tool::Demo(a) => kvmi_relay_tools::demo::run(a),
        Tool::Man => match kvmi_relay_tools::manpage::render(&mut std::io::stdout().lock()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("kvmi-relay-tools: cannot write the man page: {e}");
                1
            }
        },
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
