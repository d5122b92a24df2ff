//! Reading what the tiny guest reports on its serial port: the `PVKIT-RESULT {json}` line
//! (every check a named boolean) and, in benchmark mode, `PVKIT-BENCH-END` lines.

/// The guest's `PVKIT-RESULT {...}` line, taken apart.
#[derive(Debug, Clone)]
pub struct GuestResult {
    /// The whole line.
    pub line: String,
    /// `poll` or `irq`.
    pub mode: String,
    /// Every check, in order.
    pub checks: Vec<(String, bool)>,
    /// Doorbell mechanism per device.
    pub doorbells: Vec<(String, String)>,
}

fn object<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(&format!("\"{key}\":{{")).nth(1).and_then(|r| r.split('}').next()).unwrap_or("")
}

fn pairs(body: &str) -> Vec<(String, String)> {
    body.split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once(':'))
        .map(|(k, v)| (k.trim_matches('"').to_string(), v.trim_matches('"').to_string()))
        .collect()
}

impl GuestResult {
    /// Finds and parses the result line in a serial log.
    pub fn parse(serial: &str) -> Option<GuestResult> {
        let line = serial.lines().find_map(|l| l.trim_end_matches('\r').strip_prefix("PVKIT-RESULT "))?.to_string();
        let mode = line.split("\"mode\":\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string();
        let checks = pairs(object(&line, "checks")).into_iter().map(|(k, v)| (k, v == "true")).collect();
        let doorbells = pairs(object(&line, "doorbells"));
        Some(GuestResult { line, mode, checks, doorbells })
    }

    /// A check's value, if the guest ran it.
    pub fn check(&self, name: &str) -> Option<bool> {
        self.checks.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// Whether there were checks and all passed.
    pub fn all_passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|(_, v)| *v)
    }

    /// The doorbell mechanism a device used.
    pub fn doorbell(&self, device: &str) -> Option<&str> {
        self.doorbells.iter().find(|(d, _)| d == device).map(|(_, m)| m.as_str())
    }

    /// Panics unless every check in `expected` ran and every check passed.
    pub fn assert_passed(&self, expected: &[&str], log: &str) {
        for name in expected {
            assert_eq!(self.check(name), Some(true), "check {name} missing or failed:\n{log}");
        }
        assert!(self.all_passed(), "a check failed:\n{log}");
    }
}

/// One `PVKIT-BENCH-END name ops=.. bytes=.. kicks=.. ticks=..` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchLine {
    /// Device: blk, net or console.
    pub name: String,
    /// Operations completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Doorbells rung.
    pub kicks: u64,
    /// TSC ticks the run took.
    pub ticks: u64,
}

impl BenchLine {
    /// Every benchmark line in a serial log.
    pub fn parse_all(serial: &str) -> Vec<BenchLine> {
        serial
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("PVKIT-BENCH-END "))
            .filter_map(|rest| {
                let name = rest.split_whitespace().next()?.to_string();
                let field = |key: &str| -> Option<u64> {
                    rest.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
                };
                Some(BenchLine {
                    ops: field("ops")?,
                    bytes: field("bytes")?,
                    kicks: field("kicks")?,
                    ticks: field("ticks")?,
                    name,
                })
            })
            .collect()
    }

    /// Seconds the run took at `tsc_khz`.
    pub fn seconds(&self, tsc_khz: u64) -> f64 {
        if tsc_khz == 0 { 0.0 } else { self.ticks as f64 / (tsc_khz as f64 * 1000.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_parsed() {
        let log = "noise\nPVKIT-RESULT {\"mode\":\"poll\",\"checks\":{\"blk_write_read\":true,\"net_arp\":false},\"doorbells\":{\"blk\":\"port-doorbell\"},\"irqs\":0}\r\nmore";
        let r = GuestResult::parse(log).unwrap();
        assert_eq!(r.mode, "poll");
        assert_eq!(r.check("blk_write_read"), Some(true));
        assert_eq!(r.check("net_arp"), Some(false));
        assert_eq!(r.check("console_read"), None);
        assert!(!r.all_passed());
        assert_eq!(r.doorbell("blk"), Some("port-doorbell"));
        assert!(GuestResult::parse("no result").is_none());
    }

    #[test]
    fn bench_lines_are_parsed() {
        let log = "PVKIT-BENCH-BEGIN blk\nPVKIT-BENCH-END blk ops=784 bytes=3211264 kicks=49 ticks=2600000000\r\nPVKIT-BENCH-END bad ops=x";
        let lines = BenchLine::parse_all(log);
        assert_eq!(lines.len(), 1);
        assert_eq!(
            lines[0],
            BenchLine { name: "blk".into(), ops: 784, bytes: 3_211_264, kicks: 49, ticks: 2_600_000_000 }
        );
        assert!((lines[0].seconds(2_600_000) - 1.0).abs() < 1e-9);
    }
}
