//! `pvkit bench`: short runs of every scenario this machine has, checking the JSON report is
//! complete (every contender in every case, every round, positive values, each process's CPU
//! and memory), the SVG plots are well-formed XML, and `compare` gives its verdicts.

use pvkit_test_support::facility;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

fn pvkit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pvkit"))
}

/// Benchmarks measure: two at once on a small machine starve each other (and DPDK's hugepages),
/// so the tests of this file take turns.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `cmd`, which must succeed; on failure the message leads with the end of its standard
/// error (where a failed scenario says why), then its standard output.
fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        panic!(
            "pvkit exited with {}; end of its stderr:\n{tail}\nstdout:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    out
}

fn load(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Checks a report: machine and versions filled in; in every scenario that ran, each contender
/// measured in every group it belongs with (groups that share a contender have the same ones:
/// net's looped-back groups have contenders of their own), each (case, contender) exactly
/// `rounds` times, with positive, finite values and process statistics. Returns the scenarios'
/// statuses.
fn assert_complete(report: &Value, rounds: usize) -> BTreeMap<String, String> {
    assert_eq!(report["format"], 1);
    assert!(report["date"].as_str().unwrap().ends_with('Z'));
    let machine = &report["machine"];
    assert!(machine["cores"].as_u64().unwrap() >= 1);
    assert!(!machine["kernel"].as_str().unwrap().is_empty());
    assert!(["pvm", "kvm", "none"].contains(&machine["kvm"].as_str().unwrap()));
    assert!(report["versions"]["pvkit"].is_string());
    let statuses: BTreeMap<String, String> = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s["status"].as_str().unwrap().to_string()))
        .collect();
    let samples = report["samples"].as_array().unwrap();
    for (scenario, status) in &statuses {
        assert_ne!(status, "failed", "{scenario} failed: {report}");
        if status != "ran" {
            continue;
        }
        assert!(report["options"][scenario].is_string(), "options of {scenario}");
        let ours: Vec<&Value> = samples.iter().filter(|s| s["scenario"] == scenario.as_str()).collect();
        assert!(!ours.is_empty(), "{scenario} ran but has no samples");
        let mut per_group: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut per_case: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for s in &ours {
            let (group, case, contender) =
                (s["group"].as_str().unwrap(), s["case"].as_str().unwrap(), s["contender"].as_str().unwrap());
            per_group.entry(group).or_default().insert(contender);
            *per_case.entry((case, contender)).or_default() += 1;
            let value = s["value"].as_f64().unwrap();
            assert!(value.is_finite() && value > 0.0, "{scenario}: {s}");
            assert!(!s["metric"].as_str().unwrap().is_empty());
            let processes = s["processes"].as_array().unwrap();
            assert!(!processes.is_empty(), "{scenario}: no process statistics in {s}");
            for p in processes {
                assert!(p["peak_rss_kib"].as_u64().unwrap() > 0, "{p}");
                assert!(p["wall_seconds"].as_f64().unwrap() > 0.0, "{p}");
                assert!(p["cpu_seconds"].as_f64().unwrap() >= 0.0, "{p}");
            }
        }
        for (group, seen) in &per_group {
            for (other, theirs) in &per_group {
                if !seen.is_disjoint(theirs) {
                    assert_eq!(seen, theirs, "{scenario}: groups {group} and {other} share some contenders, not all");
                }
            }
        }
        for ((case, contender), n) in &per_case {
            assert_eq!(*n, rounds, "{scenario}: {contender} in {case}");
        }
    }
    statuses
}

/// Every file in `dir` is an SVG that parses as XML with an `svg` root and some text.
fn assert_svgs(dir: &Path, at_least: usize) {
    let files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(files.len() >= at_least, "{} plot(s), expected {at_least} or more: {files:?}", files.len());
    for file in files {
        assert_eq!(file.extension().and_then(|e| e.to_str()), Some("svg"), "{}", file.display());
        let text = std::fs::read_to_string(&file).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        assert!(doc.descendants().any(|n| n.has_tag_name("text")), "{}: no labels", file.display());
        assert!(doc.descendants().any(|n| n.has_tag_name("polyline") || n.has_tag_name("circle")), "no data");
    }
}

#[test]
fn bench_all_writes_a_complete_report_and_well_formed_plots() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (json, svg) = (dir.path().join("all.json"), dir.path().join("plots"));
    let out = run_ok(
        pvkit().args(["bench", "all", "--rounds", "1", "--seconds", "1", "--json"]).arg(&json).arg("--svg").arg(&svg),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = load(&json);
    let statuses = assert_complete(&report, 1);
    let names: Vec<&str> = statuses.keys().map(String::as_str).collect();
    assert_eq!(names, ["blk", "console", "doorbell", "guest", "net", "snapshot"], "{statuses:?}");
    // Skipped only where the machine lacks the facility.
    let expect = |name: &str, available: bool| {
        assert_eq!(statuses[name], if available { "ran" } else { "skipped" }, "{name}: {stdout}");
    };
    expect("blk", true);
    expect("console", true);
    expect("guest", true);
    expect("doorbell", facility::kvm_usable());
    expect("snapshot", facility::kvm_usable());
    expect("net", facility::find_program("dpdk-testpmd").is_some());
    let samples = report["samples"].as_array().unwrap();
    let cases_of = |scenario: &str| -> BTreeSet<String> {
        samples.iter().filter(|s| s["scenario"] == scenario).map(|s| s["case"].as_str().unwrap().to_string()).collect()
    };
    // blk: both sizes, the queue-depth and queue-count sweeps, each engine, latency percentiles.
    let blk = cases_of("blk");
    for case in ["randread 4 KiB QD 1, 1 queue(s)", "write 128 KiB QD 128, 2 queue(s)"] {
        assert!(blk.contains(case), "{case} missing: {blk:?}");
    }
    for contender in ["pvkit vhost-user-blk (io_uring)", "pvkit vhost-user-blk (sync)"] {
        assert!(samples.iter().any(|s| s["contender"] == contender), "{contender}");
    }
    assert!(samples.iter().filter(|s| s["scenario"] == "blk").all(|s| s["extra"]["lat_p99_us"].as_f64() > Some(0.0)));
    assert_eq!(cases_of("console"), BTreeSet::from(["guest to host".to_string(), "host to guest".to_string()]));
    if statuses["doorbell"] == "ran" {
        let doorbell = cases_of("doorbell");
        for case in ["one kick: mmio-notify", "one kick: port-doorbell", "requests at QD 16"] {
            assert!(doorbell.contains(case), "{case}: {doorbell:?}");
        }
    }
    if statuses["snapshot"] == "ran" {
        let snapshot = cases_of("snapshot");
        for case in ["snapshot (pause + save)", "restore until the vCPUs run", "move, pre-copy: downtime"] {
            assert!(snapshot.contains(case), "{case}: {snapshot:?}");
        }
        let sizes: BTreeSet<&str> =
            samples.iter().filter(|s| s["scenario"] == "snapshot").filter_map(|s| s["contender"].as_str()).collect();
        assert_eq!(sizes, BTreeSet::from(["256 MiB guest", "1024 MiB guest"]));
    }
    // One plot per group, plus latency plots for blk.
    let groups: BTreeSet<(String, String)> = samples
        .iter()
        .map(|s| (s["scenario"].as_str().unwrap().to_string(), s["group"].as_str().unwrap().to_string()))
        .collect();
    let blk_groups = groups.iter().filter(|(s, _)| s == "blk").count();
    assert_svgs(&svg, groups.len() + blk_groups);
    // The table names every scenario that ran.
    for (name, status) in &statuses {
        if status == "ran" {
            assert!(stdout.contains(&format!("pvkit bench {name}")), "{name} table missing:\n{stdout}");
        }
    }
}

#[test]
fn bench_blk_measures_engines_peers_and_queue_counts() {
    let _turn = one_at_a_time();
    if !facility::require_programs("bench_blk", &["qemu-storage-daemon"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("blk.json");
    let peer = "qemu-storage-daemon --blockdev driver=null-co,node-name=n0,size={size} --export \
                type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={socket},writable=on,num-queues={queues}";
    let out = run_ok(
        pvkit()
            .args(["bench", "blk", "--rounds", "2", "--seconds", "0.2", "--qd", "1,8", "--queues", "1,2"])
            .args(["--patterns", "randread,write", "--engines", "io_uring,null", "--image-mib", "16"])
            .args(["--peer", peer, "--json"])
            .arg(&json)
            .arg("--image-dir")
            .arg(dir.path()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = load(&json);
    assert_complete(&report, 2);
    let contenders: BTreeSet<&str> =
        report["samples"].as_array().unwrap().iter().map(|s| s["contender"].as_str().unwrap()).collect();
    assert_eq!(
        contenders,
        BTreeSet::from([
            "pvkit vhost-user-blk (io_uring)",
            "pvkit vhost-user-blk (null)",
            "qemu-storage-daemon (io_uring)",
            "qemu-storage-daemon (--peer)"
        ])
    );
    for case in ["randread 4 KiB QD 8, 2 queue(s)", "write 128 KiB QD 1, 1 queue(s)"] {
        assert!(stdout.contains(case), "{case}:\n{stdout}");
    }
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, ["blk.json"], "the image was removed");
    for (args, message) in [
        (&["--qd", "0"][..], "queue depths"),
        (&["--patterns", "randrw"][..], "unknown pattern"),
        (&["--engines", "aio"][..], "unknown engine"),
        (&["--peer", "qemu-storage-daemon"][..], "{socket}"),
    ] {
        let bad = pvkit().args(["bench", "blk"]).args(args).output().unwrap();
        assert!(!bad.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&bad.stderr).contains(message), "{args:?}");
    }
}

#[test]
fn bench_net_compares_the_sink_and_the_loop_with_dpdk_vhost() {
    let _turn = one_at_a_time();
    if !facility::require_programs("bench_net", &["dpdk-testpmd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("net.json");
    run_ok(
        pvkit()
            .args(["bench", "net", "--rounds", "1", "--seconds", "1", "--frame-sizes", "64", "--compare-sandbox"])
            .arg("--json")
            .arg(&json),
    );
    let report = load(&json);
    assert_complete(&report, 1);
    let samples = report["samples"].as_array().unwrap();
    assert!(samples.iter().any(|s| s["contender"] == "pvkit --sink --sandbox off"), "no unsandboxed contender");
    // Both modes: into the sink, and back to the generator through both backends.
    let looped: BTreeSet<&str> = samples
        .iter()
        .filter(|s| s["case"] == "64-byte frames, looped back")
        .map(|s| s["contender"].as_str().unwrap())
        .collect();
    assert_eq!(
        looped,
        BTreeSet::from([
            "DPDK net_vhost io",
            "pvkit --loopback (--poll-us 50)",
            "pvkit --loopback --poll-us 0",
            "pvkit --loopback --sandbox off"
        ])
    );
    for s in report["samples"].as_array().unwrap() {
        let roles: Vec<&str> = s["processes"].as_array().unwrap().iter().map(|p| p["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["backend", "testpmd generator"]);
        assert!(s["extra"]["Gbit/s"].as_f64() > Some(0.0));
    }
    for args in [&["--frame-sizes", "9000"][..], &["--modes", "mirror"][..]] {
        let bad = pvkit().args(["bench", "net"]).args(args).output().unwrap();
        assert!(!bad.status.success(), "{args:?}");
    }
}

#[test]
fn bench_guest_and_compare_catch_a_regression() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old.json"), dir.path().join("new.json"));
    run_ok(pvkit().args(["bench", "guest", "--rounds", "1", "--seconds", "0.1", "--json"]).arg(&old));
    let report = load(&old);
    assert_complete(&report, 1);
    let software: Vec<&Value> = report["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["contender"] == "software guest (host thread)")
        .collect();
    assert_eq!(software.len(), 3, "blk, net and console");
    // The same report against itself: nothing changed.
    let same = run_ok(pvkit().args(["bench", "compare"]).arg(&old).arg(&old));
    assert!(String::from_utf8_lossy(&same.stdout).contains("0 better, 0 worse"));
    // Halve every headline value (all are higher-is-better here): compare flags it and fails.
    let mut worse = report.clone();
    for s in worse["samples"].as_array_mut().unwrap() {
        let v = s["value"].as_f64().unwrap();
        s["value"] = serde_json::json!(v / 2.0);
    }
    std::fs::write(&new, serde_json::to_string(&worse).unwrap()).unwrap();
    let out = pvkit().args(["bench", "compare"]).arg(&old).arg(&new).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("WORSE") && stdout.contains("-50.0%"), "{stdout}");
    // Not a report: a clear error.
    std::fs::write(&new, "{}").unwrap();
    let bad = pvkit().args(["bench", "compare"]).arg(&old).arg(&new).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a pvkit bench report"));
    let bad = pvkit().args(["bench", "guest", "--rounds", "0"]).output().unwrap();
    assert!(!bad.status.success());
}

#[test]
fn bench_limits_reports_each_limit_and_fails_when_one_is_missed() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("limits.json");
    // Short runs: the buckets' first tenth of a second weighs more, hence the tolerance.
    let out = run_ok(
        pvkit()
            .args(["bench", "limits", "--rounds", "1", "--seconds", "1", "--ops", "2000", "--mbps", "20"])
            .args(["--tolerance", "0.25", "--json"])
            .arg(&json),
    );
    let report = load(&json);
    assert_complete(&report, 1);
    let ratios: Vec<f64> = report["samples"].as_array().unwrap().iter().map(|s| s["value"].as_f64().unwrap()).collect();
    assert_eq!(ratios.len(), 2, "{report}");
    assert!(ratios.iter().all(|r| (0.75..=1.25).contains(r)), "{ratios:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ops limit 2000/s"));
    // A tolerance no limiter meets: the scenario fails, saying which limits missed it.
    let strict = pvkit()
        .args(["bench", "limits", "--rounds", "1", "--seconds", "0.5", "--ops", "2000", "--mbps", "20"])
        .args(["--tolerance", "0.0001"])
        .output()
        .unwrap();
    assert_eq!(strict.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&strict.stderr).contains("further than"),
        "{}",
        String::from_utf8_lossy(&strict.stderr)
    );
}

#[test]
fn bench_blk_compares_the_services_on_and_off() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("blk.json");
    run_ok(
        pvkit()
            .args(["bench", "blk", "--rounds", "1", "--seconds", "0.2", "--qd", "8", "--queues", "1"])
            .args(["--patterns", "randread", "--engines", "null", "--no-qsd", "--compare-services", "--json"])
            .arg(&json)
            .arg("--image-dir")
            .arg(dir.path()),
    );
    let report = load(&json);
    assert_complete(&report, 1);
    let contenders: BTreeSet<&str> =
        report["samples"].as_array().unwrap().iter().map(|s| s["contender"].as_str().unwrap()).collect();
    assert_eq!(
        contenders,
        BTreeSet::from([
            "pvkit vhost-user-blk (null)",
            "pvkit vhost-user-blk (null, metrics)",
            "pvkit vhost-user-blk (null, metrics + limit)"
        ])
    );
}
