//! A single-node Ceph cluster on loopback in a directory of its own: one monitor, one manager,
//! one OSD on memstore (in memory), authentication off, pools of size 1. Started in about ten
//! seconds; every daemon is killed and the directory removed when it is dropped.

use crate::{HarnessError, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The programs a cluster needs (Debian's ceph-mon, ceph-mgr, ceph-osd and ceph-common).
pub const PROGRAMS: &[&str] = &["ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd", "monmaptool"];

/// A running cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    daemons: Vec<Child>,
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(HarnessError::io("binding a free port"))?;
    Ok(listener.local_addr().map_err(HarnessError::io("reading a port"))?.port())
}

fn configuration(dir: &Path, fsid: &str, port: u16) -> String {
    let d = dir.display();
    format!(
        "[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
run dir = {d}/run
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
osd objectstore = memstore
memstore device bytes = 2147483648
osd data = {d}/osd/$cluster-$id
mon data = {d}/mon/$cluster-$id
mgr data = {d}/mgr/$cluster-$id
ms bind ipv6 = false
public addr = 127.0.0.1
"
    )
}

impl Cluster {
    /// Starts a cluster and creates the pool `rbd`, initialised for RBD.
    pub fn start() -> Result<Cluster> {
        let dir = tempfile::tempdir().map_err(HarnessError::io("creating the cluster's directory"))?;
        for sub in ["mon", "osd/ceph-0", "mgr/ceph-x", "run", "log"] {
            std::fs::create_dir_all(dir.path().join(sub)).map_err(HarnessError::io(format!("creating {sub}")))?;
        }
        let fsid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .map_err(HarnessError::io("reading a uuid"))?
            .trim()
            .to_string();
        let port = free_port()?;
        let conf = dir.path().join("ceph.conf");
        std::fs::write(&conf, configuration(dir.path(), &fsid, port)).map_err(HarnessError::io("writing ceph.conf"))?;
        let mut cluster = Cluster { dir, daemons: Vec::new() };
        let monmap = cluster.dir.path().join("monmap");
        let address = format!("[v2:127.0.0.1:{port}]");
        cluster.run(
            "monmaptool",
            &["--create", "--addv", "a", &address, "--fsid", &fsid, monmap.to_str().unwrap_or("")],
        )?;
        cluster.ceph_daemon("ceph-mon", &["-i", "a", "--mkfs", "--monmap", monmap.to_str().unwrap_or("")], false)?;
        cluster.ceph_daemon("ceph-mon", &["-i", "a"], true)?;
        cluster.ceph_daemon("ceph-mgr", &["-i", "x"], true)?;
        let id = cluster.ceph(&["osd", "create"])?;
        if id.trim() != "0" {
            return Err(HarnessError::Unexpected { what: "ceph osd create".into(), detail: id });
        }
        cluster.ceph_daemon("ceph-osd", &["-i", "0", "--mkfs"], false)?;
        cluster.ceph_daemon("ceph-osd", &["-i", "0"], true)?;
        cluster.wait_for_osd()?;
        cluster.ceph(&["osd", "pool", "create", "rbd", "8", "8"])?;
        cluster.ceph(&["osd", "pool", "set", "rbd", "size", "1", "--yes-i-really-mean-it"])?;
        cluster.rbd(&["pool", "init", "rbd"])?;
        Ok(cluster)
    }

    /// The configuration file clients use.
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("ceph.conf")
    }

    /// Runs `rbd` against the cluster; its standard output.
    pub fn rbd(&self, args: &[&str]) -> Result<String> {
        let conf = self.conf();
        let mut all = vec!["-c", conf.to_str().unwrap_or("")];
        all.extend_from_slice(args);
        self.run("rbd", &all)
    }

    /// Runs `ceph` against the cluster; its standard output.
    pub fn ceph(&self, args: &[&str]) -> Result<String> {
        let conf = self.conf();
        let mut all = vec!["-c", conf.to_str().unwrap_or(""), "--connect-timeout", "30"];
        all.extend_from_slice(args);
        self.run("ceph", &all)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = Command::new(program).args(args).output().map_err(HarnessError::io(format!("running {program}")))?;
        if !out.status.success() {
            return Err(HarnessError::CommandFailed {
                what: format!("{program} {}", args.join(" ")),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a Ceph daemon as root with the cluster's configuration: to completion, or (`keep`)
    /// in the foreground, kept until the cluster is dropped. Its output goes to the log
    /// directory.
    fn ceph_daemon(&mut self, program: &str, args: &[&str], keep: bool) -> Result<()> {
        let log = self.dir.path().join("log").join(format!("{program}.out"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(HarnessError::io(format!("opening {}", log.display())))?;
        let err = out.try_clone().map_err(HarnessError::io("duplicating a log file"))?;
        let mut cmd = Command::new(program);
        cmd.arg("-c").arg(self.conf()).args(args).args(["--setuser", "root", "--setgroup", "root"]);
        if keep {
            cmd.arg("-f");
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let mut child = cmd.spawn().map_err(HarnessError::io(format!("starting {program}")))?;
        if keep {
            self.daemons.push(child);
            return Ok(());
        }
        let status = child.wait().map_err(HarnessError::io(format!("waiting for {program}")))?;
        if status.success() {
            Ok(())
        } else {
            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
            Err(HarnessError::CommandFailed { what: format!("{program} {}", args.join(" ")), status, stderr })
        }
    }

    fn wait_for_osd(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let stat = self.ceph(&["osd", "stat"]).unwrap_or_default();
            if stat.contains("1 up") && stat.contains("1 in") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Unexpected { what: "the OSD".into(), detail: format!("not up: {stat}") });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for daemon in self.daemons.iter_mut().rev() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}
