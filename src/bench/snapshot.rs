//! `pvkit bench snapshot`: what saving, restoring and moving a VM costs, for each guest memory
//! size: the snapshot (pause and save; its size on disk), the restore (from `pvkit run`'s
//! start until its vCPUs run), and the downtime of a move to another `pvkit run`, stop-and-copy
//! and pre-copy. Each run soaks the tiny guest on KVM against pvkit's blk and net backends;
//! rounds interleave the sizes.

use super::error::BenchError;
use super::process::Spawned;
use super::recorder::Recorder;
use super::report::ProcessStats;
use pvkit_host_devices::services::client;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Options of the snapshot benchmark.
#[derive(clap::Args, Debug, Clone)]
pub struct SnapshotBenchArgs {
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Guest memory sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    pub memory_mib: Vec<u64>,
    /// MiB of guest memory the guest fills and keeps rewriting (its soak ballast; the rest of
    /// guest memory stays untouched, as in an idle guest).
    #[arg(long, default_value_t = 32)]
    pub touch_mib: u64,
}

/// How long a VM may take to reach its soak (filling its ballast first), or a process to answer.
const WAIT: Duration = Duration::from_secs(300);

/// One round's figures for one size.
struct Figures {
    snapshot_ms: f64,
    save_ms: f64,
    size_mib: f64,
    nonzero_pages: f64,
    restore_ms: f64,
    downtime_ms: f64,
    precopy_downtime_ms: f64,
    precopy_rounds: f64,
    /// The block backend's usage over the round, and the first VM's until its snapshot.
    processes: Vec<ProcessStats>,
}

fn wait_until(what: &str, done: &dyn Fn() -> bool) -> Result<(), BenchError> {
    let deadline = Instant::now() + WAIT;
    while !done() {
        if Instant::now() > deadline {
            return Err(BenchError::Measurement(format!("{what} within {WAIT:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `PUT path` with `body` on the VM API at `api`; the reply's JSON.
fn put(api: &Path, path: &str, body: &serde_json::Value) -> Result<serde_json::Value, BenchError> {
    let reply = client::unix(api, "PUT", path, &body.to_string())
        .map_err(|e| BenchError::Measurement(format!("PUT {path} on {}: {e}", api.display())))?;
    if !(200..300).contains(&reply.status) {
        return Err(BenchError::Measurement(format!("PUT {path}: HTTP {}: {}", reply.status, reply.body)));
    }
    Ok(reply.json())
}

fn number(value: &serde_json::Value, key: &str) -> Result<f64, BenchError> {
    value[key].as_f64().ok_or_else(|| BenchError::Measurement(format!("no {key} in {value}")))
}

/// A `pvkit run` with an API socket; `args` say what it runs.
fn start_vm(dir: &Path, name: &str, args: &[&str], wait_for: &Path) -> Result<Spawned, BenchError> {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pvkit"));
    let mut cmd = Command::new(exe);
    cmd.arg("run").args(["--timeout", "600", "--api-socket"]).arg(dir.join(format!("{name}.api")));
    cmd.arg("--serial").arg(dir.join(format!("{name}.serial"))).args(args);
    Spawned::start(name, &mut cmd, wait_for, &dir.join(format!("{name}.log")))
}

/// One round for a guest of `memory_mib` MiB that fills `touch_mib` MiB.
fn one_round(dir: &Path, memory_mib: u64, touch_mib: u64) -> Result<Figures, BenchError> {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pvkit"));
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .map_err(BenchError::io(format!("cannot create {}", disk.display())))?;
    let (blk, net) = (dir.join("blk.sock"), dir.join("net.sock"));
    let mut blk_cmd = Command::new(&exe);
    blk_cmd.args(["backend", "blk", "--blk-file"]).arg(&disk).arg("--socket-path").arg(&blk);
    let blk_backend = Spawned::start("vhost-user-blk", &mut blk_cmd, &blk, &dir.join("blk.log"))?;
    let blk_before = blk_backend.usage()?;
    let mut net_cmd = Command::new(&exe);
    net_cmd.args(["backend", "net", "--loopback", "--socket-path"]).arg(&net);
    let _net = Spawned::start("vhost-user-net", &mut net_cmd, &net, &dir.join("net.log"))?;

    let memory = format!("{memory_mib}M");
    let (blk_arg, net_arg) = (blk.display().to_string(), net.display().to_string());
    let cmdline = format!("pvkit.mode=soak pvkit.soak_iterations=100000000 pvkit.soak_touch_mib={touch_mib}");
    let soak = ["--cmdline", cmdline.as_str()];
    let first_args = [&["--memory", &memory, "--blk", &blk_arg, "--net", &net_arg][..], &soak].concat();
    let first = start_vm(dir, "first", &first_args, &dir.join("first.api"))?;
    let first_before = first.usage()?;
    let serial = dir.join("first.serial");
    wait_until("the guest did not reach soak iteration 10", &|| {
        std::fs::read_to_string(&serial).is_ok_and(|s| s.contains("PVKIT-SOAK 10"))
    })?;
    let snapshot_dir = dir.join("snapshot");
    let asked = Instant::now();
    let saved = put(&dir.join("first.api"), "/vm/snapshot", &serde_json::json!({ "dir": snapshot_dir }))?;
    let snapshot_ms = asked.elapsed().as_secs_f64() * 1000.0;
    let first_usage = first.usage()?.since(&first_before);
    put(&dir.join("first.api"), "/vm/shutdown", &serde_json::json!({}))?;
    drop(first);

    let snapshot_arg = snapshot_dir.display().to_string();
    let restored = start_vm(dir, "restored", &["--restore", &snapshot_arg], &dir.join("restored.api"))?;
    let log = dir.join("restored.log");
    let restore_line = || {
        std::fs::read_to_string(&log)
            .ok()?
            .lines()
            .find_map(|l| l.split("the vCPUs run ").nth(1)?.split(" ms").next()?.parse::<f64>().ok())
    };
    wait_until("the restored VM did not say when it ran", &|| restore_line().is_some())?;
    let restore_ms = restore_line().unwrap_or(0.0);

    let (moved, moved_vm) = move_vm(dir, "restored", "moved", false)?;
    drop(restored);
    let (precopy, live_vm) = move_vm(dir, "moved", "moved-live", true)?;
    drop(moved_vm);
    put(&dir.join("moved-live.api"), "/vm/shutdown", &serde_json::json!({}))?;
    drop(live_vm);
    Ok(Figures {
        snapshot_ms,
        save_ms: number(&saved, "save_ms")?,
        size_mib: number(&saved, "bytes_on_disk")? / f64::from(1u32 << 20),
        nonzero_pages: number(&saved, "nonzero_pages")?,
        restore_ms,
        downtime_ms: number(&moved, "downtime_ms")?,
        precopy_downtime_ms: number(&precopy, "downtime_ms")?,
        precopy_rounds: number(&precopy, "rounds")?,
        processes: vec![
            ProcessStats::new("backend", &blk_backend.usage()?.since(&blk_before)),
            ProcessStats::new("vmm", &first_usage),
        ],
    })
}

/// Moves the VM served on `from`.api to a new `pvkit run --incoming` named `to`; the report
/// and the destination's process.
fn move_vm(dir: &Path, from: &str, to: &str, live: bool) -> Result<(serde_json::Value, Spawned), BenchError> {
    let incoming = dir.join(format!("{to}.incoming"));
    let incoming_arg = incoming.display().to_string();
    let destination = start_vm(dir, to, &["--incoming", &incoming_arg], &incoming)?;
    let report =
        put(&dir.join(format!("{from}.api")), "/vm/migrate", &serde_json::json!({ "socket": incoming, "live": live }))?;
    Ok((report, destination))
}

/// Runs the benchmark into `rec`.
pub fn run(args: &SnapshotBenchArgs, rec: &mut Recorder) -> Result<(), BenchError> {
    if args.rounds == 0 || args.memory_mib.is_empty() {
        return Err(BenchError::Options("--rounds and --memory-mib must not be empty or zero".into()));
    }
    if !pvkit_vmm_glue::kvm_usable() {
        return Err(BenchError::Measurement(
            "the snapshot benchmark runs VMs on KVM, and /dev/kvm is not usable here".into(),
        ));
    }
    rec.begin("snapshot", format!("{args:?}"), args.rounds * args.memory_mib.len());
    rec.note(format!(
        "pvkit bench snapshot: the tiny guest soaking on KVM against pvkit's blk and net backends, {} MiB of it filled and rewritten, {} round(s), sizes interleaved",
        args.touch_mib, args.rounds
    ));
    rec.note("snapshot: PUT /vm/snapshot (pause, quiesce, save) as the client sees it; restore: from pvkit run's start until its vCPUs run; downtime: from the pause until the destination's vCPUs run.");
    for round in 0..args.rounds {
        for &mib in &args.memory_mib {
            rec.step(format!("round {}: {mib} MiB", round + 1));
            let dir = std::env::temp_dir().join(format!("pvkit-bench-snapshot-{}-{mib}-{round}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(BenchError::io(format!("cannot create {}", dir.display())))?;
            let figures = one_round(&dir, mib, args.touch_mib);
            let _ = std::fs::remove_dir_all(&dir);
            record(rec, round, mib, &figures?);
        }
    }
    rec.ran(format!("{} size(s)", args.memory_mib.len()));
    Ok(())
}

/// A case: its name, unit, value and extra readings.
type Case<'a> = (&'a str, &'a str, f64, Vec<(&'a str, f64)>);

fn record(rec: &mut Recorder, round: usize, mib: u64, f: &Figures) {
    let contender = format!("{mib} MiB guest");
    let cases: [Case; 5] = [
        ("snapshot (pause + save)", "ms", f.snapshot_ms, vec![("save_ms", f.save_ms)]),
        ("snapshot size on disk", "MiB", f.size_mib, vec![("nonzero_pages", f.nonzero_pages)]),
        ("restore until the vCPUs run", "ms", f.restore_ms, vec![]),
        ("move, stop-and-copy: downtime", "ms", f.downtime_ms, vec![]),
        ("move, pre-copy: downtime", "ms", f.precopy_downtime_ms, vec![("rounds", f.precopy_rounds)]),
    ];
    for (case, metric, value, extra) in cases {
        let mut sample = rec.sample(case, contender.clone(), round);
        sample.group = "snapshot, restore, move".into();
        sample.x_label = "operation".into();
        (sample.metric, sample.value, sample.higher_is_better) = (metric.into(), value, false);
        sample.extra.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
        sample.processes.clone_from(&f.processes);
        rec.push(sample);
    }
}
