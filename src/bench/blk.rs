//! `pvkit bench blk`: pvkit's vhost-user-blk against qemu-storage-daemon on the same image,
//! driven by libblkio, contenders interleaved (A B A B ...) within every round.

use super::loadgen::{self, LoadResult, Pattern};
use super::median;
use super::process::{ProcessUsage, Spawned};
use pvkit_host_devices::{BackendKind, backend_command};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Options of the block benchmark.
#[derive(clap::Args, Debug)]
pub struct BlkBenchArgs {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Rounds; every round runs every contender once per queue depth and pattern.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Queue depths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
    pub qd: Vec<usize>,
    /// Patterns, comma-separated: randread, randwrite.
    #[arg(long, value_delimiter = ',', default_value = "randread,randwrite")]
    pub patterns: Vec<String>,
    /// Image size in MiB (created in --image-dir, filled with data, removed afterwards).
    #[arg(long, default_value_t = 1024)]
    pub image_mib: u64,
    /// Directory of the image (tmpfs keeps the disk out of the measurement).
    #[arg(long, default_value = "/dev/shm")]
    pub image_dir: PathBuf,
    /// Also compare the null engines (pvkit --engine null vs qemu-storage-daemon null-co).
    #[arg(long)]
    pub null: bool,
    /// Leave qemu-storage-daemon out even when it is installed.
    #[arg(long)]
    pub no_peer: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    Pvkit { null: bool },
    Qsd { null: bool },
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Pvkit { null: false } => "pvkit vhost-user-blk (io_uring)",
            Contender::Pvkit { null: true } => "pvkit vhost-user-blk (null)",
            Contender::Qsd { null: false } => "qemu-storage-daemon (io_uring)",
            Contender::Qsd { null: true } => "qemu-storage-daemon (null-co)",
        }
    }

    fn command(self, image: &Path, size: u64, socket: &Path) -> Command {
        match self {
            Contender::Pvkit { null } => {
                let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pvkit"));
                let mut cmd = backend_command(&exe, BackendKind::Blk);
                cmd.arg("--socket-path").arg(socket);
                if null {
                    cmd.args(["--engine", "null", "--size", &size.to_string()]);
                } else {
                    cmd.arg("--blk-file").arg(image);
                }
                cmd
            }
            Contender::Qsd { null } => {
                let blockdev = if null {
                    format!("driver=null-co,node-name=disk0,size={size}")
                } else {
                    format!("driver=file,node-name=disk0,filename={},aio=io_uring", image.display())
                };
                let mut cmd = Command::new("qemu-storage-daemon");
                cmd.args(["--blockdev", &blockdev, "--export"]).arg(format!(
                    "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=1",
                    socket.display()
                ));
                cmd
            }
        }
    }
}

struct Sample {
    contender: Contender,
    pattern: Pattern,
    qd: usize,
    load: LoadResult,
    usage: ProcessUsage,
}

fn fill_image(path: &Path, bytes: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    for _ in 0..bytes.div_ceil(chunk.len() as u64) {
        file.write_all(&chunk)?;
    }
    file.flush()
}

/// Runs the benchmark and prints its table; returns an error message on failure.
pub fn run(args: &BlkBenchArgs) -> Result<(), String> {
    let patterns = args
        .patterns
        .iter()
        .map(|p| match p.as_str() {
            "randread" => Ok(Pattern::RandRead),
            "randwrite" => Ok(Pattern::RandWrite),
            other => Err(format!("unknown pattern '{other}' (randread, randwrite)")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if args.qd.iter().any(|&qd| qd == 0 || qd > 1024) {
        return Err("queue depths must be between 1 and 1024".into());
    }
    if args.rounds == 0 || !args.seconds.is_finite() || args.seconds <= 0.0 {
        return Err("--rounds and --seconds must be positive".into());
    }
    let have_qsd = !args.no_peer && super::find_program("qemu-storage-daemon").is_some();
    let mut contenders = vec![Contender::Pvkit { null: false }];
    if have_qsd {
        contenders.push(Contender::Qsd { null: false });
    } else if !args.no_peer {
        eprintln!("note: qemu-storage-daemon is not installed; measuring pvkit alone");
    }
    if args.null {
        contenders.push(Contender::Pvkit { null: true });
        if have_qsd {
            contenders.push(Contender::Qsd { null: true });
        }
    }
    let work = tempfile_dir(&args.image_dir)?;
    let image = work.join("bench.img");
    let size = args.image_mib << 20;
    eprintln!("preparing a {} MiB image in {}", args.image_mib, work.display());
    fill_image(&image, size).map_err(|e| format!("cannot write {}: {e}", image.display()))?;
    let duration = Duration::from_secs_f64(args.seconds);
    let total = args.rounds * args.qd.len() * patterns.len() * contenders.len();
    let mut samples = Vec::new();
    let result = (|| {
        for round in 0..args.rounds {
            for &pattern in &patterns {
                for &qd in &args.qd {
                    for &contender in &contenders {
                        eprintln!(
                            "[{}/{total}] round {} {} qd {qd}: {}",
                            samples.len() + 1,
                            round + 1,
                            pattern.name(),
                            contender.name()
                        );
                        let socket = work.join("blk.sock");
                        let mut cmd = contender.command(&image, size, &socket);
                        let log = work.join("backend.log");
                        let child = Spawned::start(contender.name(), &mut cmd, &socket, &log)?;
                        let before = child.usage()?;
                        let load = loadgen::run(&socket, pattern, qd, duration).map_err(|e| {
                            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
                            let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
                            let tail: Vec<&str> = tail.into_iter().rev().collect();
                            format!(
                                "{} {} qd {qd}: {e}\nbackend log:\n{}",
                                contender.name(),
                                pattern.name(),
                                tail.join("\n")
                            )
                        })?;
                        let usage = child.usage()?.since(&before);
                        child.stop();
                        samples.push(Sample { contender, pattern, qd, load, usage });
                    }
                }
            }
        }
        Ok::<(), String>(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result?;
    print_table(args, &contenders, &patterns, &samples);
    Ok(())
}

fn tempfile_dir(base: &Path) -> Result<PathBuf, String> {
    let dir = base.join(format!("pvkit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn print_table(args: &BlkBenchArgs, contenders: &[Contender], patterns: &[Pattern], samples: &[Sample]) {
    println!(
        "pvkit bench blk: 4 KiB random I/O, 1 queue, libblkio virtio-blk-vhost-user as the frontend, {} MiB image in {}, {} round(s) of {} s, interleaved",
        args.image_mib,
        args.image_dir.display(),
        args.rounds,
        args.seconds
    );
    for &pattern in patterns {
        for &qd in &args.qd {
            println!("\n{} QD {qd}", pattern.name());
            println!(
                "  {:<34} {:>10} {:>21} {:>9} {:>7} {:>6} {:>9}",
                "backend", "IOPS", "(min - max)", "lat p50", "ratio", "CPU", "peak RSS"
            );
            let mut first = None;
            for &contender in contenders {
                let group: Vec<&Sample> =
                    samples.iter().filter(|s| s.contender == contender && s.pattern == pattern && s.qd == qd).collect();
                if group.is_empty() {
                    continue;
                }
                let mut iops: Vec<f64> = group.iter().map(|s| s.load.iops).collect();
                let med = median(&mut iops);
                let (min, max) = (iops[0], iops[iops.len() - 1]);
                let mut lat: Vec<f64> = group.iter().map(|s| s.load.median_latency.as_secs_f64() * 1e6).collect();
                let mut cpu: Vec<f64> = group.iter().map(|s| s.usage.cpu_fraction() * 100.0).collect();
                let rss = group.iter().map(|s| s.usage.peak_rss_kib).max().unwrap_or(0);
                let base = *first.get_or_insert(med);
                println!(
                    "  {:<34} {:>10.0} {:>10.0} - {:>8.0} {:>6.0} µs {:>7.2} {:>5.0}% {:>6} MiB",
                    contender.name(),
                    med,
                    min,
                    max,
                    median(&mut lat),
                    if base > 0.0 { med / base } else { 0.0 },
                    median(&mut cpu),
                    rss / 1024
                );
            }
        }
    }
    println!(
        "\nratio: median IOPS relative to the first backend listed; CPU: the backend process's CPU time over wall time"
    );
}
