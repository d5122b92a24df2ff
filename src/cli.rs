//! The `pvkit` command line.

use clap::{Parser, Subcommand};
use pvkit_host_devices::BackendKind;
use std::process::ExitCode;

/// The tiny guest kernel, built for x86_64-unknown-none by build.rs.
pub static TINY_GUEST_ELF: &[u8] = include_bytes!(env!("PVKIT_TINY_GUEST_ELF"));

#[derive(Parser, Debug)]
#[command(
    name = "pvkit",
    version,
    about = "Paravirtualization toolkit: vhost-user backends, guest drivers, a KVM VMM and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what this build of pvkit contains and check the machine it runs on.
    Demo,
    /// Boot a guest on KVM with vhost-user backends attached over virtio-mmio.
    Run(crate::run::RunArgs),
    /// Run a benchmark (contenders interleaved, medians and ratios).
    Bench {
        #[command(subcommand)]
        scenario: crate::bench::Scenario,
    },
    /// Run one device backend (the same as invoking pvkit as vhost-user-blk, -net or -console).
    Backend {
        /// blk, net or console.
        kind: String,
        /// Arguments for the backend.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub fn main(args: Vec<String>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::Demo => demo(),
        Command::Run(args) => crate::run::run(args),
        Command::Bench { scenario } => match crate::bench::run(&scenario) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("pvkit bench: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Backend { kind, args } => {
            match BackendKind::from_name(&kind).and_then(|k| pvkit_host_devices::run_backend(k, &args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("pvkit backend: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn demo() -> ExitCode {
    println!("pvkit {}: what this build contains", env!("CARGO_PKG_VERSION"));
    let row = |name: &str, what: &str, state: &str| println!("  {name:<20} {what:<66} {state}");
    row("protocol", "wire formats and ABI (virtio-blk/-net/-console, mmio, split ring)", "ready");
    row("tiny guest", &format!("embedded x86_64-unknown-none ELF, {} bytes", TINY_GUEST_ELF.len()), "built");
    row("vhost-user-blk", "vhost-user block backend (io_uring, sync and null engines)", "built");
    row("vhost-user-console", "vhost-user console backend (multiport, SIZE, EMERG_WRITE)", "built");
    row("vhost-user-net", "vhost-user net backend (tap, switch, sink, loopback; MRG_RXBUF, MQ)", "built");
    row("vmm-glue", "host-side vhost-user frontend and driver (used by pvkit bench)", "built");
    row("", "KVM VMM, virtio-mmio transport, software guest", "not built yet");
    println!();
    let kvm = if pvkit_vmm_glue::kvm_usable() { "usable" } else { "not usable" };
    let flavour = if pvkit_vmm_glue::kvm_is_pvm() { " (PVM-based: guests poll, no interrupts)" } else { "" };
    println!("machine: /dev/kvm {kvm}{flavour}");
    println!();
    println!("The demo boots the tiny guest against all three backends once the VMM is built; until");
    println!("then it reports the parts above and exits 0. `pvkit bench blk`, `pvkit bench net` and");
    println!("`pvkit bench console` measure the backends.");
    ExitCode::SUCCESS
}
