//! `pvkit`: one multi-call binary for the whole toolkit.
//!
//! - `pvkit run|ctl|snapshot|demo|bench|stat ...` and `pvkit backend blk|net|console ...`;
//! - invoked as `vhost-user-blk`, `vhost-user-net` or `vhost-user-console` (a symlink, or a
//!   re-execution with that `argv[0]`), it is that backend.

mod bench;
mod cli;
mod ctl;
mod demo;
mod run;
mod snapshot_cmd;
mod software;
mod stat;
mod vm_api;

use std::process::ExitCode;

fn main() -> ExitCode {
    pvkit_host_devices::init_logging();
    let args: Vec<String> = std::env::args().collect();
    if let Some(kind) = args.first().and_then(|a| pvkit_host_devices::BackendKind::from_argv0(a)) {
        return match pvkit_host_devices::run_backend(kind, &args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("{}: {err}", kind.program_name());
                ExitCode::FAILURE
            }
        };
    }
    // The command line behaves like other Unix tools when its output pipe closes (`pvkit
    // demo | head`): it ends quietly instead of panicking on EPIPE. Backends (above) and
    // benchmarks keep SIGPIPE ignored: they talk over sockets, where a peer that goes away is
    // an error to handle, not a kill.
    if !matches!(args.get(1).map(String::as_str), Some("bench" | "backend")) {
        // SAFETY: setting a signal's disposition to its default has no memory effects.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    cli::main(args)
}
