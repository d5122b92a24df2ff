//! The backends' services over real sockets: libblkio (an independent frontend) drives
//! `vhost-user-blk` while the test reads and changes its metrics and fault rules through the
//! control API (`--api-socket`, HTTP over a unix socket); `promtool` checks the metrics text,
//! and a real Prometheus server scrapes `--metrics-addr`.

mod common;

use pvkit_test_support::blkio_client::{BlkioClient, BlkioError};
use pvkit_test_support::facility;
use pvkit_test_support::http;
use pvkit_test_support::process::ChildGuard;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const DISK: u64 = 16 << 20;

struct Backend {
    _child: ChildGuard,
    socket: PathBuf,
    api: PathBuf,
    dir: tempfile::TempDir,
}

fn backend(extra: &[&str]) -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(DISK).unwrap();
    let api = dir.path().join("api.sock");
    let mut args = vec!["--api-socket", api.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (child, socket) = common::start_blk(dir.path(), &image, &args);
    Backend { _child: child, socket, api, dir }
}

fn api(backend: &Backend, method: &str, path: &str, body: &str) -> http::Response {
    http::unix(&backend.api, method, path, body).unwrap()
}

fn is_eio(result: Result<Vec<u8>, BlkioError>) -> bool {
    matches!(result, Err(BlkioError::Request { ret, .. }) if ret == -libc::EIO)
}

#[test]
fn metrics_count_what_libblkio_did_and_fault_rules_fail_exactly_what_they_match() {
    // Reads of sectors 2048..2056 (the 4 KiB at 1 MiB) fail from the start.
    let b = backend(&["--fault", "op=read,sectors=2048-2056,action=ioerr"]);
    let mut client = BlkioClient::connect(&b.socket, 1).unwrap();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    client.write(0, 1 << 20, &data).unwrap();
    assert!(is_eio(client.read(0, 1 << 20, 4096)), "a read the rule matches fails with EIO");
    assert!(is_eio(client.read(0, (1 << 20) - 512, 1024)), "one that overlaps the range too");
    assert_eq!(client.read(0, 2 << 20, 4096).unwrap(), vec![0; 4096], "reads elsewhere succeed");

    let stats = api(&b, "GET", "/stats", "").json();
    let ops = &stats["queues"][0]["ops"];
    assert_eq!(ops["write"], serde_json::json!({"ok": 1, "failed": 0, "bytes": 4096}), "{stats}");
    assert_eq!((ops["read"]["ok"].as_u64(), ops["read"]["failed"].as_u64()), (Some(1), Some(2)), "{stats}");
    assert_eq!(stats["queues"][0]["latency"]["count"], 4);
    assert_eq!(stats["queues"][0]["in_flight"], 0);
    assert!(stats["queues"][0]["kicks"].as_u64() >= Some(1), "{stats}");
    assert_eq!(stats["faults"][0]["injected"], 2, "{stats}");

    // Requests the API refuses change nothing and leave the device serving.
    for (method, path, body, status) in [
        ("PUT", "/faults", "{\"rules\": [", 400),
        ("PUT", "/faults", r#"{"rules":[{"action":"ioerr","when":"now"}]}"#, 400),
        ("PUT", "/faults", r#"{"rules":[{"op":"read","sectors":[9,9],"action":"ioerr"}]}"#, 400),
        ("PUT", "/faults", r#"{"rules":[{"trigger":{"probability":2.0},"action":"ioerr"}]}"#, 400),
        ("PUT", "/faults", r#"{"rules":[{"action":"drop"}]}"#, 400),
        ("POST", "/faults", "", 405),
        ("GET", "/limits/nothing", "", 404),
    ] {
        let reply = api(&b, method, path, body);
        assert_eq!(reply.status, status, "{method} {path} {body}: {}", reply.body);
        assert!(reply.json()["error"].is_string(), "{}", reply.body);
    }
    assert!(is_eio(client.read(0, 1 << 20, 4096)), "the rule is still there");

    // Removed at run time: the range reads back what was written before.
    assert_eq!(api(&b, "DELETE", "/faults", "").status, 200);
    assert_eq!(client.read(0, 1 << 20, 4096).unwrap(), data);
    // Put at run time: flushes are refused as unsupported, every second time.
    let rule = r#"{"rules":[{"op":"flush","trigger":{"every":2},"action":"unsupp"}]}"#;
    assert_eq!(api(&b, "PUT", "/faults", rule).status, 200);
    let flushes: Vec<bool> = (0..4).map(|_| client.flush(0).is_ok()).collect();
    assert_eq!(flushes, [true, false, true, false]);
    assert_eq!(api(&b, "GET", "/faults", "").json()["rules"][0]["injected"], 2);
}

#[test]
fn the_metrics_text_passes_promtool() {
    if !facility::require_programs("services_promtool", &["promtool"]) {
        return;
    }
    let b = backend(&[]);
    let mut client = BlkioClient::connect(&b.socket, 1).unwrap();
    client.write(0, 0, &[1; 4096]).unwrap();
    client.read(0, 0, 4096).unwrap();
    let metrics = api(&b, "GET", "/metrics", "");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains("pvkit_requests_total{device=\"vhost-user-blk\",queue=\"0\",op=\"read\",outcome=\"ok\"} 1")
    );
    let file = b.dir.path().join("metrics.txt");
    std::fs::write(&file, &metrics.body).unwrap();
    let out =
        Command::new("sh").arg("-c").arg(format!("promtool check metrics < {}", file.display())).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool: {report}\n{}", metrics.body);
}

/// A free TCP port on the loopback interface.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn a_prometheus_server_scrapes_the_metrics_address() {
    if !facility::require_programs("services_prometheus", &["prometheus"]) {
        return;
    }
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let b = backend(&["--metrics-addr", &metrics_addr]);
    let mut client = BlkioClient::connect(&b.socket, 1).unwrap();
    for i in 0..10u64 {
        client.write(0, i * 4096, &[7; 4096]).unwrap();
    }
    assert_eq!(http::tcp(&metrics_addr, "GET", "/stats", "").unwrap().status, 404, "only /metrics over TCP");
    let web = format!("127.0.0.1:{}", free_port());
    let config = b.dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pvkit\n    static_configs:\n      - targets: ['{metrics_addr}']\n"),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus");
    prometheus
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", b.dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address={web}"));
    let _server = ChildGuard::spawn("prometheus", &mut prometheus).unwrap();
    let query = "/api/v1/query?query=pvkit_requests_total%7Bop%3D%22write%22%2Coutcome%3D%22ok%22%7D";
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        let answer = http::tcp(&web, "GET", query, "").ok().filter(|r| r.status == 200).map(|r| r.json());
        let value = answer.as_ref().and_then(|a| a["data"]["result"][0]["value"][1].as_str().map(str::to_string));
        if let Some(value) = value {
            break value;
        }
        assert!(Instant::now() < deadline, "Prometheus never returned the counter: {answer:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(value, "10", "Prometheus sees the ten writes");
}

/// Requests libblkio completes in `seconds`, one at a time, each `op` of `len` bytes.
fn completed_in(client: &mut BlkioClient, seconds: f64, len: usize, write: bool) -> u64 {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut count = 0;
    while Instant::now() < end {
        let offset = (count % 64) * len as u64;
        if write {
            client.write(0, offset, &vec![5; len]).unwrap();
        } else {
            client.read(0, offset, len).unwrap();
        }
        count += 1;
    }
    count
}

#[test]
fn rate_limits_hold_libblkio_to_them_and_change_at_run_time() {
    let b = backend(&["--limit", "all:ops=500"]);
    let mut client = BlkioClient::connect(&b.socket, 1).unwrap();
    let ops = completed_in(&mut client, 2.0, 4096, false) as f64 / 2.0;
    assert!((400.0..=600.0).contains(&ops), "{ops} reads/s under a 500/s limit");
    // Changed through the API: a bandwidth limit on writes alone.
    let put = api(&b, "PUT", "/limits", r#"{"limits":{"write":{"bw":2000000}}}"#);
    assert_eq!(put.status, 200, "{}", put.body);
    let started = Instant::now();
    let bytes = completed_in(&mut client, 2.0, 65536, true) as f64 * 65536.0 / started.elapsed().as_secs_f64();
    assert!((1.6e6..=2.4e6).contains(&bytes), "{bytes} B/s of writes under a 2 MB/s limit");
    let reads = completed_in(&mut client, 0.5, 4096, false) as f64 / 0.5;
    assert!(reads > 1000.0, "reads are no longer limited: {reads}/s");
    let limits = api(&b, "GET", "/limits", "").json();
    assert!(limits["throttled"].as_u64() > Some(0) && limits["limits"]["write"]["bw"] == 2e6, "{limits}");
    for body in
        [r#"{"limits":{"tx":{"ops":5}}}"#, r#"{"limits":{"all":{"ops":-1}}}"#, r#"{"limits":{"all":{"iops":5}}}"#, "[]"]
    {
        assert_eq!(api(&b, "PUT", "/limits", body).status, 400, "{body}");
    }
    assert_eq!(api(&b, "PUT", "/limits", r#"{"limits":{}}"#).status, 200);
    let free = completed_in(&mut client, 0.5, 4096, false) as f64 / 0.5;
    assert!(free > 1000.0, "no limits: {free}/s");
    println!("limits: {ops} reads/s at 500/s; {:.2} MB/s of writes at 2 MB/s; unlimited {free} reads/s", bytes / 1e6);
}

#[test]
fn a_torn_write_leaves_exactly_its_prefix_on_the_image() {
    let b = backend(&["--fault", "op=write,sectors=0-64,trigger=once,action=torn:4500"]);
    let mut client = BlkioClient::connect(&b.socket, 1).unwrap();
    let data: Vec<u8> = (0..16384u32).map(|i| (i % 253) as u8 + 1).collect();
    let torn = client.write(0, 0, &data);
    assert!(matches!(torn, Err(BlkioError::Request { ret, .. }) if ret == -libc::EIO), "{torn:?}");
    // 4500 bytes asked: whole sectors only, so 4096 reached the disk.
    let image = std::fs::read(b.dir.path().join("disk.img")).unwrap();
    assert_eq!(&image[..4096], &data[..4096], "the prefix is on the image");
    assert!(image[4096..16384].iter().all(|b| *b == 0), "nothing after it");
    client.write(0, 0, &data).unwrap();
    assert_eq!(client.read(0, 0, 16384).unwrap(), data, "the rule fired once");
    let faults = api(&b, "GET", "/faults", "").json();
    assert_eq!(
        (faults["rules"][0]["action"]["torn"].as_u64(), faults["rules"][0]["injected"].as_u64()),
        (Some(4500), Some(1))
    );
}

#[test]
fn a_delay_rule_holds_the_matched_completions_and_nothing_else() {
    let b = backend(&["--fault", "op=read,sectors=0-8,action=delay:300"]);
    let mut client = BlkioClient::connect(&b.socket, 1).unwrap();
    client.write(0, 0, &[9; 4096]).unwrap();
    let timed = |client: &mut BlkioClient, offset: u64| {
        let started = Instant::now();
        let data = client.read(0, offset, 4096).unwrap();
        (started.elapsed(), data)
    };
    let (slow, data) = timed(&mut client, 0);
    assert_eq!(data, vec![9; 4096], "the held read's data");
    assert!(slow >= Duration::from_millis(300) && slow < Duration::from_secs(3), "{slow:?}");
    let (fast, _) = timed(&mut client, 1 << 20);
    assert!(fast < Duration::from_millis(100), "an unmatched read is not held: {fast:?}");
    // A spread, changed at run time: every delay falls inside it.
    let rule = r#"{"rules":[{"op":"read","seed":3,"action":{"delay":[50,150]}}]}"#;
    assert_eq!(api(&b, "PUT", "/faults", rule).status, 200);
    for _ in 0..5 {
        let (took, _) = timed(&mut client, 8192);
        assert!(took >= Duration::from_millis(50) && took < Duration::from_millis(1000), "{took:?}");
    }
    let stats = api(&b, "GET", "/stats", "").json();
    assert!(stats["queues"][0]["latency"]["p99_us_at_most"].as_f64() >= Some(250_000.0), "{stats}");
    assert_eq!(stats["queues"][0]["in_flight"], 0, "{stats}");
}
