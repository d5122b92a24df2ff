//! `pvkit bench blk`: pvkit's vhost-user-blk (each engine) against qemu-storage-daemon and any
//! other backend given as a command line, on the same image, driven by libblkio: 4 KiB random
//! and 128 KiB sequential reads and writes, a queue-depth sweep and a queue-count sweep,
//! contenders interleaved (A B A B ...) within every round.

use super::error::BenchError;
use super::loadgen::{self, Pattern};
use super::process::{Spawned, own_usage};
use super::recorder::Recorder;
use super::report::ProcessStats;
use pvkit_host_devices::blk::ImageFormat;
use pvkit_host_devices::{BackendKind, backend_command};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Options of the block benchmark.
#[derive(clap::Args, Debug, Clone)]
pub struct BlkBenchArgs {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Rounds; every round runs every contender once per case.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Queue depths (per queue), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
    pub qd: Vec<usize>,
    /// Queue counts, comma-separated (each backend serves that many queues; libblkio drives
    /// them all from one thread).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub queues: Vec<usize>,
    /// Patterns, comma-separated: randread, randwrite (4 KiB random), read, write (128 KiB
    /// sequential).
    #[arg(long, value_delimiter = ',', default_value = "randread,randwrite,read,write")]
    pub patterns: Vec<String>,
    /// pvkit engines to measure, comma-separated: io_uring, sync, null.
    #[arg(long, value_delimiter = ',', default_value = "io_uring,sync,null")]
    pub engines: Vec<String>,
    /// Another backend, as a command line with `{socket}` (and optionally `{image}`,
    /// `{size}`, `{queues}`) in it; repeatable. Named after its program.
    #[arg(long, value_name = "'COMMAND {socket}'")]
    pub peer: Vec<String>,
    /// Leave qemu-storage-daemon out even when it is installed.
    #[arg(long)]
    pub no_qsd: bool,
    /// Also run each pvkit engine with `--sandbox off`, as a contender of its own (the
    /// sandbox's cost).
    #[arg(long)]
    pub compare_sandbox: bool,
    /// Also run each pvkit engine with its services on, as two contenders of their own:
    /// metrics (`--api-socket`), and metrics plus a rate limit far above the load (their
    /// cost).
    #[arg(long)]
    pub compare_services: bool,
    /// Image size in MiB (created in --image-dir, filled with data, removed afterwards).
    #[arg(long, default_value_t = 1024)]
    pub image_mib: u64,
    /// Directory of the image (tmpfs keeps the disk out of the measurement).
    #[arg(long, default_value = "/dev/shm")]
    pub image_dir: PathBuf,
    /// The image's format: with qcow2 the filled image is converted by qemu-img (every cluster
    /// allocated), pvkit serves it through imago (--engines is ignored) and
    /// qemu-storage-daemon through its qcow2 driver.
    #[arg(long, value_enum, default_value_t = ImageFormat::Raw)]
    pub format: ImageFormat,
    /// Measure on a Ceph RBD image instead: the filled image is imported into this pool (as
    /// pvkit-bench-PID with the layering feature only, removed afterwards), pvkit serves it
    /// with --rbd (--engines is ignored) and qemu-storage-daemon with its rbd driver.
    #[arg(long, value_name = "POOL", requires = "ceph_conf")]
    pub rbd_pool: Option<String>,
    /// The Ceph configuration file, for --rbd-pool.
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: Option<PathBuf>,
}

/// Where the measured disk is.
#[derive(Debug, Clone)]
enum Disk {
    /// A file (raw or qcow2).
    File(PathBuf),
    /// An RBD image: `pool/image`, and the cluster's configuration.
    Rbd(String, PathBuf),
}

impl Disk {
    /// The file, or the image's name, for `{image}` in --peer lines.
    fn name(&self) -> String {
        match self {
            Disk::File(path) => path.display().to_string(),
            Disk::Rbd(spec, _) => spec.clone(),
        }
    }
}

/// Which of its services a pvkit contender runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Services {
    Off,
    Metrics,
    MetricsAndLimit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// An engine, sandboxed or not, with some services.
    Pvkit(String, bool, Services),
    Qsd,
    Peer(String),
}

#[derive(Debug, Clone)]
struct Contender {
    name: String,
    kind: Kind,
}

impl Contender {
    fn command(
        &self,
        disk: &Disk,
        format: ImageFormat,
        size: u64,
        socket: &Path,
        queues: usize,
    ) -> Result<Command, BenchError> {
        Ok(match &self.kind {
            Kind::Pvkit(engine, sandboxed, services) => {
                let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pvkit"));
                let mut cmd = backend_command(&exe, BackendKind::Blk);
                cmd.arg("--socket-path").arg(socket).args(["--num-queues", &queues.to_string()]);
                if !sandboxed {
                    cmd.args(["--sandbox", "off"]);
                }
                if *services != Services::Off {
                    cmd.arg("--api-socket").arg(socket.with_extension("api"));
                }
                if *services == Services::MetricsAndLimit {
                    cmd.args(["--limit", "all:ops=1G,bw=1000G"]);
                }
                match (engine.as_str(), disk) {
                    ("null", _) => cmd.args(["--engine", "null", "--size", &size.to_string()]),
                    (_, Disk::Rbd(spec, conf)) => cmd.args(["--rbd", spec, "--ceph-conf"]).arg(conf),
                    ("qcow2", Disk::File(image)) => cmd.args(["--format", "qcow2"]).arg("--blk-file").arg(image),
                    (engine, Disk::File(image)) => cmd.args(["--engine", engine]).arg("--blk-file").arg(image),
                };
                cmd
            }
            Kind::Qsd => {
                let mut cmd = Command::new("qemu-storage-daemon");
                match (disk, format) {
                    (Disk::Rbd(spec, conf), _) => {
                        let (pool, image) = spec.split_once('/').unwrap_or((spec, ""));
                        let node =
                            format!("driver=rbd,node-name=disk0,pool={pool},image={image},conf={}", conf.display());
                        cmd.args(["--blockdev", &node])
                    }
                    (Disk::File(image), ImageFormat::Raw) => {
                        let node = format!("driver=file,node-name=disk0,filename={},aio=io_uring", image.display());
                        cmd.args(["--blockdev", &node])
                    }
                    (Disk::File(image), ImageFormat::Qcow2) => cmd.args([
                        "--blockdev",
                        &format!("driver=file,node-name=file0,filename={},aio=io_uring", image.display()),
                        "--blockdev",
                        "driver=qcow2,node-name=disk0,file=file0",
                    ]),
                };
                cmd.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                    socket.display()
                ));
                cmd
            }
            Kind::Peer(template) => {
                let line = template
                    .replace("{socket}", &socket.display().to_string())
                    .replace("{image}", &disk.name())
                    .replace("{size}", &size.to_string())
                    .replace("{queues}", &queues.to_string());
                let words = shell_words(&line)?;
                let (program, args) =
                    words.split_first().ok_or_else(|| BenchError::Options("--peer: empty command".into()))?;
                let mut cmd = Command::new(program);
                cmd.args(args);
                cmd
            }
        })
    }
}

/// Splits a command line into words: whitespace separates, single and double quotes group.
fn shell_words(line: &str) -> Result<Vec<String>, BenchError> {
    let (mut words, mut word, mut quote, mut in_word) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(BenchError::Options(format!("--peer: unbalanced quote in {line:?}")));
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
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

/// The filled raw image `raw` in `format`: itself, or a qcow2 conversion by qemu-img (the raw
/// file is removed, to spare the image directory's room).
fn image_in_format(raw: &Path, format: ImageFormat) -> Result<PathBuf, BenchError> {
    if format == ImageFormat::Raw {
        return Ok(raw.to_path_buf());
    }
    let qcow2 = raw.with_extension("qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(&qcow2)
        .output()
        .map_err(BenchError::io("cannot run qemu-img (needed for --format qcow2)".to_string()))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(BenchError::Measurement(format!("qemu-img convert to qcow2 failed: {why}")));
    }
    let _ = std::fs::remove_file(raw);
    Ok(qcow2)
}

/// The disk the contenders serve, made from the filled raw image `raw`: the file in the asked
/// format, or an RBD image imported from it (the raw file is removed then).
fn disk_for(args: &BlkBenchArgs, raw: &Path) -> Result<Disk, BenchError> {
    let (Some(pool), Some(conf)) = (&args.rbd_pool, &args.ceph_conf) else {
        return image_in_format(raw, args.format).map(Disk::File);
    };
    let spec = format!("{pool}/pvkit-bench-{}", std::process::id());
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        // Without exclusive-lock: the contenders are processes started in turn on one image,
        // and each would wait for the last one's lock to be broken.
        .args(["import", "--no-progress", "--image-feature", "layering"])
        .arg(raw)
        .arg(&spec)
        .output()
        .map_err(BenchError::io("cannot run rbd (needed for --rbd-pool)".to_string()))?;
    let _ = std::fs::remove_file(raw);
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(BenchError::Measurement(format!("rbd import into {spec} failed: {why}")));
    }
    Ok(Disk::Rbd(spec, conf.clone()))
}

fn contenders(args: &BlkBenchArgs) -> Result<Vec<Contender>, BenchError> {
    let mut list = Vec::new();
    let (qcow2, rbd) = ([String::from("qcow2")], [String::from("rbd")]);
    let engines = match (&args.rbd_pool, args.format) {
        (Some(_), _) => &rbd[..],
        (None, ImageFormat::Qcow2) => &qcow2[..],
        (None, ImageFormat::Raw) => &args.engines[..],
    };
    for engine in engines {
        if !["io_uring", "sync", "null", "qcow2", "rbd"].contains(&engine.as_str()) {
            return Err(BenchError::Options(format!("unknown engine '{engine}' (io_uring, sync, null)")));
        }
        list.push(Contender {
            name: format!("pvkit vhost-user-blk ({engine})"),
            kind: Kind::Pvkit(engine.clone(), true, Services::Off),
        });
        if args.compare_sandbox {
            let name = format!("pvkit vhost-user-blk ({engine}, sandbox off)");
            list.push(Contender { name, kind: Kind::Pvkit(engine.clone(), false, Services::Off) });
        }
        if args.compare_services {
            for (what, services) in [("metrics", Services::Metrics), ("metrics + limit", Services::MetricsAndLimit)] {
                let name = format!("pvkit vhost-user-blk ({engine}, {what})");
                list.push(Contender { name, kind: Kind::Pvkit(engine.clone(), true, services) });
            }
        }
    }
    if !args.no_qsd {
        if super::find_program("qemu-storage-daemon").is_some() {
            let name = match (&args.rbd_pool, args.format) {
                (Some(_), _) => "qemu-storage-daemon (rbd)",
                (None, ImageFormat::Raw) => "qemu-storage-daemon (io_uring)",
                (None, ImageFormat::Qcow2) => "qemu-storage-daemon (qcow2, io_uring)",
            };
            list.push(Contender { name: name.into(), kind: Kind::Qsd });
        } else {
            eprintln!("note: qemu-storage-daemon is not installed; it is left out");
        }
    }
    for template in &args.peer {
        if !template.contains("{socket}") {
            return Err(BenchError::Options(format!("--peer {template:?} has no {{socket}} in it")));
        }
        let program = shell_words(template)?
            .first()
            .cloned()
            .ok_or_else(|| BenchError::Options("--peer: empty command".into()))?;
        let name = Path::new(&program).file_name().map_or(program.clone(), |n| n.to_string_lossy().into_owned());
        // Two peers of one program (the same daemon with other options) stay apart.
        let same = list.iter().filter(|c| c.name.starts_with(&format!("{name} (--peer"))).count();
        let name = if same == 0 { format!("{name} (--peer)") } else { format!("{name} (--peer #{})", same + 1) };
        list.push(Contender { name, kind: Kind::Peer(template.clone()) });
    }
    if list.is_empty() {
        return Err(BenchError::Options("nothing to measure: no engines and no peers".into()));
    }
    Ok(list)
}

/// Runs the benchmark into `rec`.
pub fn run(args: &BlkBenchArgs, rec: &mut Recorder) -> Result<(), BenchError> {
    let patterns = args.patterns.iter().map(|p| Pattern::parse(p)).collect::<Result<Vec<_>, _>>()?;
    if args.qd.iter().any(|&qd| qd == 0 || qd > 1024) {
        return Err(BenchError::Options("queue depths must be between 1 and 1024".into()));
    }
    if args.queues.iter().any(|&q| q == 0 || q > 16) {
        return Err(BenchError::Options("queue counts must be between 1 and 16".into()));
    }
    if args.rounds == 0 || !args.seconds.is_finite() || args.seconds <= 0.0 || args.image_mib == 0 {
        return Err(BenchError::Options("--rounds, --seconds and --image-mib must be positive".into()));
    }
    let contenders = contenders(args)?;
    let steps = args.rounds * patterns.len() * args.qd.len() * args.queues.len() * contenders.len();
    rec.begin("blk", format!("{args:?}"), steps);
    rec.note(format!(
        "pvkit bench blk: libblkio virtio-blk-vhost-user as the frontend, {} MiB image in {}, {} round(s) of {} s, contenders interleaved",
        args.image_mib,
        args.image_dir.display(),
        args.rounds,
        args.seconds
    ));
    let work = args.image_dir.join(format!("pvkit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(BenchError::io(format!("cannot create {}", work.display())))?;
    let raw = work.join("bench.img");
    let size = args.image_mib << 20;
    let result = fill_image(&raw, size)
        .map_err(BenchError::io(format!("cannot write {}", raw.display())))
        .and_then(|()| disk_for(args, &raw))
        .and_then(|disk| {
            let measured = measure(args, rec, &patterns, &contenders, &work, &disk, size);
            if let Disk::Rbd(spec, conf) = &disk {
                let _ = Command::new("rbd").arg("-c").arg(conf).args(["rm", "--no-progress", spec]).output();
            }
            measured
        });
    let _ = std::fs::remove_dir_all(&work);
    result?;
    rec.ran(format!("{} contender(s)", contenders.len()));
    Ok(())
}

fn measure(
    args: &BlkBenchArgs,
    rec: &mut Recorder,
    patterns: &[Pattern],
    contenders: &[Contender],
    work: &Path,
    disk: &Disk,
    size: u64,
) -> Result<(), BenchError> {
    let duration = Duration::from_secs_f64(args.seconds);
    for round in 0..args.rounds {
        for &pattern in patterns {
            let kib = pattern.block_size() / 1024;
            for &queues in &args.queues {
                for &qd in &args.qd {
                    let group = format!("{} {kib} KiB, {queues} queue(s)", pattern.name());
                    let case = format!("{} {kib} KiB QD {qd}, {queues} queue(s)", pattern.name());
                    for contender in contenders {
                        rec.step(format!("round {} {case}: {}", round + 1, contender.name));
                        let socket = work.join("blk.sock");
                        let log = work.join("backend.log");
                        let mut cmd = contender.command(disk, args.format, size, &socket, queues)?;
                        let child = Spawned::start(&contender.name, &mut cmd, &socket, &log)?;
                        let (before, own_before) = (child.usage()?, own_usage()?);
                        let load = loadgen::run(&socket, pattern, qd, queues, duration).map_err(|e| {
                            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
                            let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
                            let tail: Vec<&str> = tail.into_iter().rev().collect();
                            BenchError::Measurement(format!(
                                "{} {case}: {e}\nbackend log:\n{}",
                                contender.name,
                                tail.join("\n")
                            ))
                        })?;
                        let (usage, own) = (child.usage()?.since(&before), own_usage()?.since(&own_before));
                        child.stop();
                        let mut sample = rec.sample(&case, &contender.name, round);
                        sample.group = group.clone();
                        sample.x = Some(qd as f64);
                        sample.x_label = "queue depth".into();
                        let mbps = load.bytes_per_second / 1e6;
                        if kib == 4 {
                            (sample.metric, sample.value) = ("IOPS".into(), load.iops);
                            sample.extra.insert("MB/s".into(), mbps);
                        } else {
                            (sample.metric, sample.value) = ("MB/s".into(), mbps);
                            sample.extra.insert("IOPS".into(), load.iops);
                        }
                        sample.extra.insert("lat_p50_us".into(), load.p50.as_secs_f64() * 1e6);
                        sample.extra.insert("lat_p99_us".into(), load.p99.as_secs_f64() * 1e6);
                        if let Some(per_op) = usage.cpu_per_op(load.iops, 1e6) {
                            sample.extra.insert("backend_cpu_us_per_req".into(), per_op);
                        }
                        sample.processes =
                            vec![ProcessStats::new("backend", &usage), ProcessStats::new("libblkio frontend", &own)];
                        rec.push(sample);
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_command_lines_split_like_a_shell() {
        assert_eq!(shell_words("a 'b c' \"d\"  e").unwrap(), ["a", "b c", "d", "e"]);
        assert_eq!(shell_words("x ''").unwrap(), ["x", ""]);
        assert!(shell_words("a 'b").is_err());
    }

    #[test]
    fn two_peers_of_one_program_are_two_contenders() {
        use clap::{Args, FromArgMatches};
        let argv = [
            "blk",
            "--no-qsd",
            "--engines",
            "null",
            "--peer",
            "/usr/bin/qsd --a {socket}",
            "--peer",
            "qsd --b {socket}",
            "--peer",
            "other {socket}",
        ];
        let matches = BlkBenchArgs::augment_args(clap::Command::new("blk")).try_get_matches_from(argv).unwrap();
        let args = BlkBenchArgs::from_arg_matches(&matches).unwrap();
        let names: Vec<String> = contenders(&args).unwrap().into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["pvkit vhost-user-blk (null)", "qsd (--peer)", "qsd (--peer #2)", "other (--peer)"]);
    }
}
