//! vhost-user-net against Linux's own virtio-net driver (QEMU TCG guests): through a tap into a
//! network namespace the test creates (ping and iperf3 against a server inside it; no traffic
//! leaves the namespace), two guests on one `--switch` process pinging each other, and a guest
//! that keeps pinging while it is live-migrated from one backend's tap to another's on the
//! same bridge.

use pvkit_test_support::facility;
use pvkit_test_support::linux_guest::{GuestRun, LinuxGuest};
use pvkit_test_support::process::ChildGuard;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// Waits for the guest's eth0 to appear and gives it `addr`.
const NET_UP: &str = r#"
for i in $(seq 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
[ -e /sys/class/net/eth0 ] || { echo "no eth0"; exit 10; }
ip link set lo up
ip link set eth0 up
ip addr add ADDR dev eth0
echo "FEATURES=$(cat /sys/class/net/eth0/device/features)"
"#;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn create(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let ok = Command::new("ip").args(["netns", "add", name]).status().unwrap().success();
        assert!(ok, "ip netns add {name} failed");
        Netns(name.to_string())
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0]).args(args);
        cmd
    }

    fn run(&self, args: &[&str]) {
        let out = self.exec(args).output().unwrap();
        assert!(out.status.success(), "{args:?} in {}: {}", self.0, String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The network namespace `pvkit-{tag}{pid}` for test `test`, or None when the test cannot
/// run here (a program missing, or not root: the reason is printed; CI's strict mode fails).
fn namespace_for(test: &str, tag: &str, programs: &[&str]) -> Option<Netns> {
    if !facility::require_programs(test, programs) {
        return None;
    }
    if !is_root() {
        assert!(!facility::strict(), "{test}: needs root for ip netns and the tap");
        println!("SKIPPED {test}: creating a network namespace and a tap needs root");
        return None;
    }
    Some(Netns::create(&format!("pvkit-{tag}{}", std::process::id())))
}

/// Starts a backend in `ns` on tap `tap` with `extra` arguments, serving `socket`; the host's
/// end of the tap gets `addr` and is up.
fn backend_on_tap(ns: &Netns, tap: &str, addr: &str, socket: &Path, extra: &[&str]) -> ChildGuard {
    let program = env!("CARGO_BIN_EXE_vhost-user-net");
    let mut args = vec![program, "--tap", tap];
    args.extend_from_slice(extra);
    let backend = start_backend(&mut ns.exec(&args), &[socket]);
    ns.run(&["ip", "addr", "add", addr, "dev", tap]);
    ns.run(&["ip", "link", "set", tap, "up"]);
    backend
}

fn start_backend(cmd: &mut Command, sockets: &[&Path]) -> ChildGuard {
    for s in sockets {
        cmd.arg("--socket-path").arg(s);
    }
    let mut child = ChildGuard::spawn("vhost-user-net", cmd).unwrap();
    for s in sockets {
        child.wait_for_socket(s, WAIT).unwrap();
    }
    child
}

#[test]
fn linux_guest_reaches_a_namespace_through_a_tap() {
    let test = "net_linux_guest_tap";
    let Some(ns) = namespace_for(test, "t", &["qemu-system-x86_64", "ip", "iperf3"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let backend = backend_on_tap(&ns, "pvkt0", "10.77.0.1/30", &socket, &["--num-queue-pairs", "2"]);
    ns.run(&["ip", "link", "set", "lo", "up"]);
    let mut iperf = ChildGuard::spawn("iperf3", &mut ns.exec(&["iperf3", "-s", "-1", "-B", "10.77.0.1"])).unwrap();
    let script = NET_UP.replace("ADDR", "10.77.0.2/30")
        + r#"
ping -c 3 -W 5 10.77.0.1 > /tmp/ping.out 2>&1
echo "PING_REPLIES=$(grep -c 'bytes from' /tmp/ping.out)"
echo "RX_QUEUES=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
for i in 1 2 3; do iperf3 -c 10.77.0.1 -t 3 -P 2 -f m > /tmp/iperf.out 2>&1 && break; sleep 1; done
cat /tmp/iperf.out
echo "IPERF_MBITS=$(grep receiver /tmp/iperf.out | tail -1 | awk '{print $6}')"
"#;
    let run = LinuxGuest::new(script)
        .vhost_user_net(&socket, 2, "52:54:00:77:00:02")
        .cpus(2)
        .timeout(Duration::from_secs(120))
        .run()
        .unwrap();
    let _ = iperf.check_running();
    let log = backend.terminate(WAIT);
    run.assert_passed();
    let replies: u32 = first(&run, "PING_REPLIES").parse().unwrap_or(0);
    assert_eq!(replies, 3, "ping replies\n{}", run.log);
    let mbits: f64 = first(&run, "IPERF_MBITS").parse().unwrap_or(0.0);
    assert!(mbits > 0.0, "iperf3 throughput {mbits} Mbit/s\n{}", run.log);
    assert_eq!(first(&run, "RX_QUEUES"), "2", "two queue pairs in use\n{}", run.log);
    println!("{test}: ping 3/3, iperf3 {mbits} Mbit/s (TCG guest), features {}", first(&run, "FEATURES"));
    let summary = log.lines().rev().find(|l| l.contains(" packets ")).unwrap_or("");
    assert!(!summary.contains("tx 0 packets") && !summary.contains("rx 0 packets"), "{log}");
}

fn first<'a>(run: &'a GuestRun, key: &'a str) -> &'a str {
    run.values(key).next().unwrap_or("")
}

#[test]
fn two_linux_guests_ping_each_other_through_the_switch() {
    let test = "net_linux_guest_switch";
    if !facility::require_programs(test, &["qemu-system-x86_64"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-net"));
    cmd.arg("--switch");
    let backend = start_backend(&mut cmd, &[&a, &b]);
    // Each guest pings until the other answers, then three more times, then stays up a while
    // so the other one can finish too.
    let guest = |socket: std::path::PathBuf, me: &'static str, peer: &'static str, mac: &'static str| {
        let script = NET_UP.replace("ADDR", &format!("{me}/24"))
            + &format!(
                r#"
for i in $(seq 60); do ping -c 1 -W 1 {peer} > /dev/null 2>&1 && break; done
ping -c 3 -W 5 {peer} > /tmp/ping.out 2>&1
echo "PING_REPLIES=$(grep -c 'bytes from' /tmp/ping.out)"
sleep 8
"#
            );
        std::thread::spawn(move || {
            LinuxGuest::new(script).vhost_user_net(&socket, 1, mac).timeout(Duration::from_secs(150)).run().unwrap()
        })
    };
    let ga = guest(a.clone(), "10.78.0.1", "10.78.0.2", "52:54:00:78:00:01");
    let gb = guest(b.clone(), "10.78.0.2", "10.78.0.1", "52:54:00:78:00:02");
    for (name, run) in [("A", ga.join().unwrap()), ("B", gb.join().unwrap())] {
        run.assert_passed();
        assert_eq!(first(&run, "PING_REPLIES"), "3", "guest {name}\n{}", run.log);
    }
    let log = backend.terminate(WAIT);
    assert!(log.contains("vhost-user-net"), "{log}");
}

/// A guest pings the namespace's bridge five times a second for 20 s while it is live-migrated
/// from the source backend's tap to the destination backend's tap, both on that bridge; the
/// loss is stated, and most replies must come back.
#[test]
fn a_pinging_guest_migrates_between_two_taps_on_one_bridge() {
    let test = "net_linux_guest_migration";
    let Some(ns) = namespace_for(test, "m", &["qemu-system-x86_64", "ip"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (source, destination) = (dir.path().join("source.sock"), dir.path().join("destination.sock"));
    ns.run(&["ip", "link", "add", "pvkbr0", "type", "bridge"]);
    ns.run(&["ip", "addr", "add", "10.79.0.1/24", "dev", "pvkbr0"]);
    let program = env!("CARGO_BIN_EXE_vhost-user-net");
    let mut backends = Vec::new();
    for (tap, socket) in [("pvkms0", &source), ("pvkmd0", &destination)] {
        backends.push(start_backend(&mut ns.exec(&[program, "--tap", tap]), &[socket]));
        ns.run(&["ip", "link", "set", tap, "master", "pvkbr0"]);
        ns.run(&["ip", "link", "set", tap, "up"]);
    }
    ns.run(&["ip", "link", "set", "pvkbr0", "up"]);
    ns.run(&["ip", "link", "set", "lo", "up"]);
    let script = NET_UP.replace("ADDR", "10.79.0.2/24")
        + r#"
ping -c 100 -i 0.2 -W 1 10.79.0.1 > /tmp/ping.out 2>&1
cat /tmp/ping.out | grep -o "seq=[0-9]*" | tr "\n" " "; echo; tail -3 /tmp/ping.out
echo "PING_REPLIES=$(grep -c 'bytes from' /tmp/ping.out)"
"#;
    let run = LinuxGuest::new(script)
        .vhost_user_net(&source, 1, "52:54:00:79:00:02")
        .memory_mib(512)
        .migrate_to(vec![destination.clone()], Duration::from_secs(10))
        .timeout(Duration::from_secs(180))
        .run()
        .unwrap();
    let logs: Vec<String> = backends.into_iter().map(|b| b.terminate(WAIT)).collect();
    run.assert_passed();
    let replies: u32 = first(&run, "PING_REPLIES").parse().unwrap_or(0);
    let migration = run.migration.as_deref().unwrap_or("");
    println!("{test}: {replies} of 100 pings answered across the migration ({} lost)\n{migration}", 100 - replies);
    assert!(migration.contains("completed"), "{migration}");
    assert!(
        replies >= 80,
        "{replies} of 100 pings answered\n{}\nsource backend:\n{}\ndestination backend:\n{}",
        run.log,
        logs[0],
        logs[1]
    );
    // The destination's backend carried the guest's traffic both ways after the move.
    let summary = logs[1].lines().rev().find(|l| l.contains(" packets ")).unwrap_or("");
    let count = |dir: &str| -> u64 {
        let after = summary.split(&format!("{dir} ")).nth(1).unwrap_or("");
        after.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    assert!(count("tx") > 0 && count("rx") > 0, "the destination's tap carried nothing: {summary}\n{}", logs[1]);
    println!("{test}: destination backend: {summary}");
}

/// A guest on a tap pings through a fault rule that drops 30% of what it transmits (seeded),
/// then, once the test removed the rule through the API, through none.
#[test]
fn a_loss_rule_drops_about_its_share_of_pings_and_none_once_removed() {
    let test = "net_linux_guest_loss";
    let Some(ns) = namespace_for(test, "l", &["qemu-system-x86_64", "ip"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (socket, api) = (dir.path().join("net.sock"), dir.path().join("api.sock"));
    let rule = "op=tx,trigger=probability:0.3,seed=7,action=drop";
    let extra = ["--api-socket", api.to_str().unwrap(), "--fault", rule];
    let backend = backend_on_tap(&ns, "pvkl0", "10.78.0.1/24", &socket, &extra);
    let script = NET_UP.replace("ADDR", "10.78.0.2/24")
        + r#"
for i in $(seq 30); do ping -c 1 -W 1 10.78.0.1 > /dev/null 2>&1 && break; done
ping -c 100 -i 0.05 -W 2 10.78.0.1 > /tmp/lossy.out 2>&1
echo "LOSSY_REPLIES=$(grep -c 'bytes from' /tmp/lossy.out)"
for i in $(seq 300); do ping -c 1 -W 1 10.78.0.3 > /dev/null 2>&1 && break; done
ping -c 100 -i 0.05 -W 2 10.78.0.1 > /tmp/clean.out 2>&1
echo "CLEAN_REPLIES=$(grep -c 'bytes from' /tmp/clean.out)"
"#;
    let guest = std::thread::spawn(move || {
        LinuxGuest::new(script).vhost_user_net(&socket, 1, "52:54:00:78:00:02").timeout(Duration::from_secs(240)).run()
    });
    // Once the guest has sent its 100 lossy pings, remove the rule and give it the address it
    // waits for.
    let deadline = std::time::Instant::now() + Duration::from_secs(200);
    loop {
        let stats = pvkit_test_support::http::unix(&api, "GET", "/stats", "").unwrap().json();
        let tx = &stats["queues"][1]["ops"]["tx"];
        if tx["ok"].as_u64().unwrap_or(0) + tx["failed"].as_u64().unwrap_or(0) >= 110 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && !guest.is_finished(),
            "the guest never sent its pings: {stats}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let faults = pvkit_test_support::http::unix(&api, "DELETE", "/faults", "").unwrap();
    assert_eq!(faults.status, 200);
    ns.run(&["ip", "addr", "add", "10.78.0.3/24", "dev", "pvkl0"]);
    let run = guest.join().unwrap().unwrap();
    let stats = pvkit_test_support::http::unix(&api, "GET", "/stats", "").unwrap().json();
    let _ = backend.terminate(WAIT);
    run.assert_passed();
    let lossy: u32 = first(&run, "LOSSY_REPLIES").parse().unwrap_or(0);
    let clean: u32 = first(&run, "CLEAN_REPLIES").parse().unwrap_or(0);
    println!("{test}: {lossy} of 100 answered through a 30% loss rule, {clean} of 100 without it");
    assert!((50..=85).contains(&lossy), "{lossy} of 100 answered through a 30% loss rule\n{stats}\n{}", run.log);
    assert_eq!(clean, 100, "loss without the rule\n{}", run.log);
}

/// A guest on a tap sends 100 pings as fast as it may through a limit of 20 packets/s on what
/// it transmits: the backend passes them on at that rate (read from its API while they go),
/// and drops none.
#[test]
fn a_packet_limit_slows_pings_without_losing_any() {
    let test = "net_linux_guest_limit";
    let Some(ns) = namespace_for(test, "r", &["qemu-system-x86_64", "ip"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (socket, api) = (dir.path().join("net.sock"), dir.path().join("api.sock"));
    let extra = ["--api-socket", api.to_str().unwrap(), "--limit", "tx:ops=20"];
    let backend = backend_on_tap(&ns, "pvkr0", "10.80.0.1/24", &socket, &extra);
    // The guest's busybox ping stops waiting for replies soon after its last request: the
    // rate is read from the backend instead, while the guest stays up.
    let script = NET_UP.replace("ADDR", "10.80.0.2/24")
        + r#"
for i in $(seq 30); do ping -c 1 -W 1 10.80.0.1 > /dev/null 2>&1 && break; done
ping -c 100 -i 0.01 10.80.0.1 > /dev/null 2>&1
sleep 12
"#;
    let guest = std::thread::spawn(move || {
        LinuxGuest::new(script).vhost_user_net(&socket, 1, "52:54:00:80:00:02").timeout(Duration::from_secs(180)).run()
    });
    let sent = || {
        let stats = pvkit_test_support::http::unix(&api, "GET", "/stats", "").unwrap().json();
        let tx = &stats["queues"][1]["ops"]["tx"];
        (tx["ok"].as_u64().unwrap_or(0), tx["failed"].as_u64().unwrap_or(0))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    let mut from: Option<(std::time::Instant, u64)> = None;
    let (to, count) = loop {
        let (ok, failed) = sent();
        assert_eq!(failed, 0, "a frame was dropped");
        if from.is_none() && ok >= 20 {
            from = Some((std::time::Instant::now(), ok));
        }
        if ok >= 100 {
            break (std::time::Instant::now(), ok);
        }
        assert!(std::time::Instant::now() < deadline && !guest.is_finished(), "only {ok} frames sent");
        std::thread::sleep(Duration::from_millis(50));
    };
    let (started, at_start) = from.unwrap();
    let rate = (count - at_start) as f64 / to.duration_since(started).as_secs_f64();
    let run = guest.join().unwrap().unwrap();
    let limits = pvkit_test_support::http::unix(&api, "GET", "/limits", "").unwrap().json();
    let _ = backend.terminate(WAIT);
    run.assert_passed();
    println!("{test}: {rate:.1} packets/s passed on through a 20 packets/s limit, none dropped; {limits}");
    assert!((14.0..=26.0).contains(&rate), "{rate} packets/s\n{}", run.log);
    assert!(limits["throttled"].as_u64() > Some(0), "{limits}");
}

/// A guest on a tap pings through a rule that delays what it transmits by 100 to 200 ms
/// (uniform, seeded): every round trip takes at least the shortest delay, no longer than the
/// longest plus the guest's own slowness, and the delays spread over the range.
#[test]
fn a_delay_rule_with_jitter_shows_in_the_round_trip_times() {
    let test = "net_linux_guest_delay";
    let Some(ns) = namespace_for(test, "d", &["qemu-system-x86_64", "ip"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (socket, api) = (dir.path().join("net.sock"), dir.path().join("api.sock"));
    let extra = ["--api-socket", api.to_str().unwrap(), "--fault", "op=tx,seed=3,action=delay:100-200"];
    let backend = backend_on_tap(&ns, "pvkd0", "10.81.0.1/24", &socket, &extra);
    let script = NET_UP.replace("ADDR", "10.81.0.2/24")
        + r#"
for i in $(seq 30); do ping -c 1 -W 2 10.81.0.1 > /dev/null 2>&1 && break; done
ping -c 20 -i 0.3 -W 2 10.81.0.1 > /tmp/delayed.out 2>&1
echo "REPLIES=$(grep -c 'bytes from' /tmp/delayed.out)"
echo "RTTS=$(grep -o 'time=[0-9.]*' /tmp/delayed.out | cut -d= -f2 | tr '\n' ' ')"
"#;
    let run = LinuxGuest::new(script)
        .vhost_user_net(&socket, 1, "52:54:00:81:00:02")
        .timeout(Duration::from_secs(180))
        .run()
        .unwrap();
    let faults = pvkit_test_support::http::unix(&api, "GET", "/faults", "").unwrap().json();
    let _ = backend.terminate(WAIT);
    run.assert_passed();
    let rtts: Vec<f64> = first(&run, "RTTS").split_whitespace().filter_map(|t| t.parse().ok()).collect();
    let (min, max) = rtts.iter().fold((f64::MAX, 0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    println!("{test}: {} replies, round trips {min:.0} to {max:.0} ms through a 100-200 ms delay", rtts.len());
    assert_eq!(first(&run, "REPLIES"), "20", "{}", run.log);
    assert!(min >= 100.0, "a round trip of {min} ms beat the 100 ms delay\n{}", run.log);
    assert!(max <= 200.0 + 150.0, "a round trip of {max} ms\n{}", run.log);
    assert!(max - min >= 30.0, "the delays did not spread: {rtts:?}");
    assert!(faults["rules"][0]["injected"].as_u64() >= Some(20), "{faults}");
}
