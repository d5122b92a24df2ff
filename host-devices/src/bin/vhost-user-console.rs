//! The `vhost-user-console` backend program.

fn main() {
    pvkit_host_devices::init_logging();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(err) = pvkit_host_devices::run_backend(pvkit_host_devices::BackendKind::Console, &args) {
        eprintln!("vhost-user-console: {err}");
        std::process::exit(1);
    }
}
