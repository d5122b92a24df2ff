//! `pvkit bench`: paravirtual I/O benchmarks that compare contenders side by side in one run.

pub mod blk;
pub mod console;
pub mod doorbell;
pub mod guest;
mod loadgen;
pub mod net;
mod process;

/// Benchmark scenarios.
#[derive(clap::Subcommand, Debug)]
pub enum Scenario {
    /// 4 KiB random reads and writes through libblkio: pvkit vhost-user-blk vs qemu-storage-daemon.
    Blk(blk::BlkBenchArgs),
    /// Frames per second into vhost-user-net --sink vs DPDK's net_vhost, DPDK testpmd generating.
    Net(net::NetBenchArgs),
    /// The whole stack: the tiny guest on KVM (port doorbells, MMIO notify) and the software
    /// guest driving pvkit's three backends.
    Guest(guest::GuestBenchArgs),
    /// Inside the tiny guest on KVM: the cost of a kick per doorbell mechanism and of a
    /// request round trip.
    Doorbell(doorbell::DoorbellBenchArgs),
    /// Guest-to-host throughput through one vhost-user-console port.
    Console(console::ConsoleBenchArgs),
}

/// The median of `values` (sorted in place; the upper middle for an even count, 0 when empty).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The full path of `program` on `PATH`, if it is there.
pub fn find_program(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// Runs a scenario.
pub fn run(scenario: &Scenario) -> Result<(), String> {
    match scenario {
        Scenario::Blk(args) => blk::run(args),
        Scenario::Console(args) => console::run(args),
        Scenario::Net(args) => net::run(args),
        Scenario::Guest(args) => guest::run(args),
        Scenario::Doorbell(args) => doorbell::run(args),
    }
}
