//! Fault injection: rules that match requests, frames or console chunks and make them fail, in
//! the manner of QEMU's `blkdebug` error rules and SPDK's error bdev.
//!
//! A rule names an operation (`op`: a block request type, `tx`/`rx` for net and console, or
//! `any`), optionally a sector range (block), a trigger (`always`, `once`, `every:N`, or
//! `probability:P` drawn from a generator seeded with `seed`) and an action: `ioerr` (the
//! request completes with VIRTIO_BLK_S_IOERR; a frame or chunk is dropped), `unsupp` (block:
//! VIRTIO_BLK_S_UNSUPP), `torn:BYTES` (block writes: only that prefix, in whole sectors,
//! reaches the disk, then IOERR), `delay:MS[-MS]` (block: the completion; net: the frame, as
//! netem's delay with jitter; console: the output), `reorder` (net: the frame goes after the
//! next one), `corrupt` and `duplicate` (net) or `drop` (net, console). Rules are tried in
//! order; the first that matches and triggers acts. Each rule counts what it matched and injected. The same rules
//! and seeds on the same sequence of requests inject the same faults.
//!
//! On the command line a rule is `key=value` pairs separated by commas
//! (`op=read,sectors=2048-4096,trigger=once,action=ioerr`); through the API it is the same
//! keys as a JSON object.

use crate::queue::services::{Verdict, Work};
use serde::{Deserialize, Serialize};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// The most rules a device holds.
pub const MAX_RULES: usize = 64;

/// Why a rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// A `key=value` pair is malformed or names no known key.
    #[error("'{0}' is not key=value with a key among op, sectors, trigger, seed, action")]
    BadPair(String),
    /// A value cannot be used for its key.
    #[error("{key}: '{value}' {why}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A rule without an action.
    #[error("a rule needs an action")]
    NoAction,
    /// Too many rules.
    #[error("{0} rules given, at most {MAX_RULES} are kept")]
    TooMany(usize),
}

/// When a matching rule acts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Trigger {
    /// Every time.
    #[default]
    Always,
    /// The first time only.
    Once,
    /// Every `n`th match (the `n`th, `2n`th, ...).
    Every(u64),
    /// With this probability, from the rule's seeded generator.
    Probability(f64),
}

/// What a triggered rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Block: VIRTIO_BLK_S_IOERR; net and console: the frame or chunk is dropped.
    Ioerr,
    /// Block: VIRTIO_BLK_S_UNSUPP.
    Unsupp,
    /// Net and console: the frame or chunk is dropped.
    Drop,
    /// Block writes: only the first this many bytes (whole sectors) reach the disk, then the
    /// request completes with VIRTIO_BLK_S_IOERR (other requests: as `ioerr`).
    Torn(u64),
    /// A delay drawn uniformly between these milliseconds (equal: a fixed delay), from the
    /// rule's seeded generator. Block: the request is served but completes only after it. Net:
    /// the frame leaves after it (frames whose delays cross are reordered, as by netem's
    /// jitter). Console (output only): the output reaches the port after it, in order.
    Delay(u64, u64),
    /// Net: one byte after the Ethernet header is inverted (which one, from the rule's
    /// generator).
    Corrupt,
    /// Net: the frame goes out twice.
    Duplicate,
    /// Net: the frame is held until the next frame in its direction has gone past it (10 ms at
    /// most).
    Reorder,
}

/// The longest delay a rule may add (a guest's own timeouts are shorter).
pub const MAX_DELAY_MS: u64 = 120_000;

/// One rule as given (command line or API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// The operation matched (`any` for all).
    #[serde(default = "any")]
    pub op: String,
    /// Block: the sectors matched, `[first, end)`; a request matches when it touches one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sectors: Option<[u64; 2]>,
    /// When it acts.
    #[serde(default)]
    pub trigger: Trigger,
    /// The seed of its generator (`probability` triggers).
    #[serde(default)]
    pub seed: u64,
    /// What it does.
    pub action: Action,
}

fn any() -> String {
    "any".into()
}

fn bad(key: &'static str, value: &str, why: &str) -> FaultError {
    FaultError::BadValue { key, value: value.to_string(), why: why.to_string() }
}

impl RuleSpec {
    /// Parses the command-line form, `key=value,...`.
    pub fn parse(text: &str) -> Result<RuleSpec, FaultError> {
        let mut rule = RuleSpec { op: any(), sectors: None, trigger: Trigger::Always, seed: 0, action: Action::Ioerr };
        let mut action = None;
        for pair in text.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| FaultError::BadPair(pair.to_string()))?;
            match key {
                "op" => rule.op = value.to_string(),
                "sectors" => {
                    let (first, end) =
                        value.split_once('-').ok_or_else(|| bad("sectors", value, "is not FIRST-END"))?;
                    let number = |v: &str| v.parse::<u64>().map_err(|_| bad("sectors", value, "is not FIRST-END"));
                    rule.sectors = Some([number(first)?, number(end)?]);
                }
                "trigger" => rule.trigger = parse_trigger(value)?,
                "seed" => rule.seed = value.parse().map_err(|_| bad("seed", value, "is not a number"))?,
                "action" => {
                    action = Some(match value {
                        "ioerr" => Action::Ioerr,
                        "unsupp" => Action::Unsupp,
                        "drop" => Action::Drop,
                        "corrupt" => Action::Corrupt,
                        "duplicate" => Action::Duplicate,
                        "reorder" => Action::Reorder,
                        torn if torn.starts_with("torn:") => Action::Torn(
                            torn["torn:".len()..].parse().map_err(|_| bad("action", value, "is not torn:BYTES"))?,
                        ),
                        delay if delay.starts_with("delay:") => parse_delay(value, &delay["delay:".len()..])?,
                        _ => {
                            return Err(bad(
                                "action",
                                value,
                                "is not ioerr, unsupp, drop, torn:BYTES, delay:MS[-MS], corrupt, duplicate or reorder",
                            ));
                        }
                    })
                }
                _ => return Err(FaultError::BadPair(pair.to_string())),
            }
        }
        rule.action = action.ok_or(FaultError::NoAction)?;
        Ok(rule)
    }

    /// Checks the rule against a device whose operations are `ops` and whose actions are
    /// `actions`, of which those in `output_only` apply only to `op=tx`.
    pub fn check(&self, ops: &[&str], actions: &[Action], output_only: &[Action]) -> Result<(), FaultError> {
        if self.op != "any" && !ops.contains(&self.op.as_str()) {
            return Err(bad("op", &self.op, &format!("is not one of any, {}", ops.join(", "))));
        }
        if let Some([first, end]) = self.sectors
            && first >= end
        {
            return Err(bad("sectors", &format!("{first}-{end}"), "is an empty range"));
        }
        match self.trigger {
            Trigger::Every(0) => return Err(bad("trigger", "every:0", "must be at least every:1")),
            Trigger::Probability(p) if !(0.0..=1.0).contains(&p) => {
                return Err(bad("trigger", &format!("probability:{p}"), "is not between 0 and 1"));
            }
            _ => {}
        }
        if let Action::Delay(low, high) = self.action
            && (low > high || high > MAX_DELAY_MS)
        {
            let why = format!("must have MIN <= MAX <= {MAX_DELAY_MS}");
            return Err(bad("action", &format!("delay:{low}-{high}"), &why));
        }
        let kind = |action: &Action| std::mem::discriminant(action);
        let name = || format!("{:?}", self.action).to_lowercase();
        if !actions.iter().any(|a| kind(a) == kind(&self.action)) {
            return Err(bad("action", &name(), "does not apply to this device"));
        }
        if self.op != "tx" && output_only.iter().any(|a| kind(a) == kind(&self.action)) {
            return Err(bad("action", &name(), "applies to this device's output only (op=tx)"));
        }
        Ok(())
    }
}

fn parse_delay(value: &str, ms: &str) -> Result<Action, FaultError> {
    let number = |v: &str| v.parse::<u64>().map_err(|_| bad("action", value, "is not delay:MS or delay:MIN-MAX"));
    match ms.split_once('-') {
        Some((low, high)) => Ok(Action::Delay(number(low)?, number(high)?)),
        None => number(ms).map(|ms| Action::Delay(ms, ms)),
    }
}

fn parse_trigger(value: &str) -> Result<Trigger, FaultError> {
    match value.split_once(':') {
        None if value == "always" => Ok(Trigger::Always),
        None if value == "once" => Ok(Trigger::Once),
        Some(("every", n)) => n.parse().map(Trigger::Every).map_err(|_| bad("trigger", value, "is not every:N")),
        Some(("probability", p)) => {
            p.parse().map(Trigger::Probability).map_err(|_| bad("trigger", value, "is not probability:P"))
        }
        _ => Err(bad("trigger", value, "is not always, once, every:N or probability:P")),
    }
}

/// A rule with its state and counters.
struct Rule {
    spec: RuleSpec,
    matched: AtomicU64,
    injected: AtomicU64,
    fired: AtomicBool,
    random: AtomicU64,
}

impl Rule {
    fn new(spec: RuleSpec) -> Rule {
        // xorshift64* must not start at zero.
        let random = AtomicU64::new(spec.seed ^ 0x9e37_79b9_7f4a_7c15);
        Rule { spec, matched: AtomicU64::new(0), injected: AtomicU64::new(0), fired: AtomicBool::new(false), random }
    }

    fn matches(&self, work: &Work) -> bool {
        if self.spec.op != "any" && self.spec.op != work.kind {
            return false;
        }
        match (self.spec.sectors, work.sector) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some([first, end]), Some(sector)) => {
                let last = sector.saturating_add(work.bytes.div_ceil(512).max(1) - 1);
                sector < end && last >= first
            }
        }
    }

    /// The next number of the rule's generator (xorshift64*).
    fn draw(&self) -> u64 {
        let next = |x: u64| {
            let mut x = x;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x
        };
        let state = self.random.fetch_update(Relaxed, Relaxed, |x| Some(next(x))).unwrap_or(0);
        next(state).wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn triggers(&self) -> bool {
        let nth = self.matched.fetch_add(1, Relaxed) + 1;
        match self.spec.trigger {
            Trigger::Always => true,
            Trigger::Once => !self.fired.swap(true, Relaxed),
            Trigger::Every(n) => nth.is_multiple_of(n.max(1)),
            Trigger::Probability(p) => ((self.draw() >> 11) as f64 / (1u64 << 53) as f64) < p,
        }
    }
}

/// A device's rules.
pub struct Faults {
    ops: &'static [&'static str],
    actions: &'static [Action],
    output_only: &'static [Action],
    rules: RwLock<Vec<Rule>>,
    any: AtomicBool,
}

impl Faults {
    /// No rules, for a device whose operations are `ops` and that can take `actions`.
    pub fn new(ops: &'static [&'static str], actions: &'static [Action]) -> Faults {
        Faults { ops, actions, output_only: &[], rules: RwLock::new(Vec::new()), any: AtomicBool::new(false) }
    }

    /// The same, where the actions `output_only` apply only to `op=tx`.
    pub fn with_output_only(self, output_only: &'static [Action]) -> Faults {
        Faults { output_only, ..self }
    }

    /// Replaces every rule with `specs`, after checking them all (nothing changes on an
    /// error).
    pub fn set(&self, specs: Vec<RuleSpec>) -> Result<(), FaultError> {
        if specs.len() > MAX_RULES {
            return Err(FaultError::TooMany(specs.len()));
        }
        for spec in &specs {
            spec.check(self.ops, self.actions, self.output_only)?;
        }
        let mut rules = crate::write(&self.rules);
        *rules = specs.into_iter().map(Rule::new).collect();
        self.any.store(!rules.is_empty(), Relaxed);
        Ok(())
    }

    /// What the first rule that matches `work` and triggers says (`Serve` when none does).
    pub fn admit(&self, work: &Work) -> Verdict {
        if !self.any.load(Relaxed) {
            return Verdict::Serve;
        }
        for rule in crate::read(&self.rules).iter() {
            if rule.matches(work) && rule.triggers() {
                rule.injected.fetch_add(1, Relaxed);
                return match rule.spec.action {
                    Action::Unsupp => Verdict::Unsupported,
                    Action::Torn(bytes) => Verdict::Torn(bytes),
                    Action::Delay(low, high) => {
                        let spread = high - low;
                        let extra = if spread == 0 { 0 } else { rule.draw() % (spread + 1) };
                        Verdict::Delay(std::time::Duration::from_millis(low + extra))
                    }
                    Action::Corrupt => Verdict::Corrupt(rule.draw()),
                    Action::Duplicate => Verdict::Duplicate,
                    Action::Reorder => Verdict::Reorder,
                    Action::Ioerr | Action::Drop => Verdict::Fail,
                };
            }
        }
        Verdict::Serve
    }

    /// The rules with their counters (`GET /faults`).
    pub fn to_json(&self) -> serde_json::Value {
        let rules: Vec<serde_json::Value> = crate::read(&self.rules)
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let mut value = serde_json::to_value(&rule.spec).unwrap_or_default();
                if let Some(object) = value.as_object_mut() {
                    object.insert("rule".into(), index.into());
                    object.insert("matched".into(), rule.matched.load(Relaxed).into());
                    object.insert("injected".into(), rule.injected.load(Relaxed).into());
                }
                value
            })
            .collect();
        serde_json::json!({ "rules": rules })
    }

    /// Every rule's injected count, for the metrics: (index, action, count).
    pub fn injected(&self) -> Vec<(usize, Action, u64)> {
        crate::read(&self.rules).iter().enumerate().map(|(i, r)| (i, r.spec.action, r.injected.load(Relaxed))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLK_OPS: &[&str] = &["read", "write", "flush", "discard", "write-zeroes", "get-id"];
    const BLK_ACTIONS: &[Action] = &[Action::Ioerr, Action::Unsupp, Action::Torn(0), Action::Delay(0, 0)];

    fn read_at(sector: u64, bytes: u64) -> Work {
        Work::new(0, "read", bytes).at_sector(sector)
    }

    #[test]
    fn the_command_line_form_parses_and_is_checked() {
        let rule = RuleSpec::parse("op=read,sectors=2048-4096,trigger=every:3,seed=7,action=unsupp").unwrap();
        assert_eq!(
            rule,
            RuleSpec {
                op: "read".into(),
                sectors: Some([2048, 4096]),
                trigger: Trigger::Every(3),
                seed: 7,
                action: Action::Unsupp
            }
        );
        assert_eq!(rule.check(BLK_OPS, BLK_ACTIONS, &[]), Ok(()));
        assert_eq!(RuleSpec::parse("op=read"), Err(FaultError::NoAction));
        assert!(matches!(RuleSpec::parse("colour=red,action=ioerr"), Err(FaultError::BadPair(_))));
        assert!(matches!(
            RuleSpec::parse("trigger=sometimes,action=ioerr"),
            Err(FaultError::BadValue { key: "trigger", .. })
        ));
        assert!(matches!(RuleSpec::parse("sectors=9,action=ioerr"), Err(FaultError::BadValue { key: "sectors", .. })));
        let bad_op = RuleSpec::parse("op=fly,action=ioerr").unwrap().check(BLK_OPS, BLK_ACTIONS, &[]);
        assert!(matches!(bad_op, Err(FaultError::BadValue { key: "op", .. })));
        let empty = RuleSpec::parse("sectors=5-5,action=ioerr").unwrap().check(BLK_OPS, BLK_ACTIONS, &[]);
        assert!(matches!(empty, Err(FaultError::BadValue { key: "sectors", .. })));
        let torn = RuleSpec::parse("op=write,action=torn:4096").unwrap();
        assert_eq!((torn.action, torn.check(BLK_OPS, BLK_ACTIONS, &[])), (Action::Torn(4096), Ok(())));
        assert!(matches!(RuleSpec::parse("action=torn:half"), Err(FaultError::BadValue { key: "action", .. })));
        assert_eq!(RuleSpec::parse("action=delay:5").unwrap().action, Action::Delay(5, 5));
        let spread = RuleSpec::parse("action=delay:5-20").unwrap();
        assert_eq!((spread.action, spread.check(BLK_OPS, BLK_ACTIONS, &[])), (Action::Delay(5, 20), Ok(())));
        let backwards = RuleSpec::parse("action=delay:20-5").unwrap().check(BLK_OPS, BLK_ACTIONS, &[]);
        assert!(matches!(backwards, Err(FaultError::BadValue { key: "action", .. })));
        let drop = RuleSpec::parse("action=drop").unwrap().check(BLK_OPS, BLK_ACTIONS, &[]);
        assert!(matches!(drop, Err(FaultError::BadValue { key: "action", .. })));
        let odds = RuleSpec::parse("trigger=probability:1.5,action=ioerr").unwrap().check(BLK_OPS, BLK_ACTIONS, &[]);
        assert!(matches!(odds, Err(FaultError::BadValue { key: "trigger", .. })));
    }

    #[test]
    fn rules_match_operations_and_sector_ranges_and_count() {
        let faults = Faults::new(BLK_OPS, BLK_ACTIONS);
        faults.set(vec![RuleSpec::parse("op=read,sectors=100-200,action=ioerr").unwrap()]).unwrap();
        assert_eq!(faults.admit(&read_at(99, 512)), Verdict::Serve, "ends before the range");
        assert_eq!(faults.admit(&read_at(96, 4096)), Verdict::Fail, "its last sector (103) is in the range");
        assert_eq!(faults.admit(&read_at(199, 512)), Verdict::Fail);
        assert_eq!(faults.admit(&read_at(200, 512)), Verdict::Serve, "the range's end is not in it");
        assert_eq!(faults.admit(&Work::new(0, "write", 512).at_sector(150)), Verdict::Serve, "another op");
        assert_eq!(faults.admit(&Work::new(0, "flush", 0)), Verdict::Serve, "no sector: no match");
        let json = faults.to_json();
        assert_eq!((json["rules"][0]["matched"].as_u64(), json["rules"][0]["injected"].as_u64()), (Some(2), Some(2)));
        faults.set(Vec::new()).unwrap();
        assert_eq!(faults.admit(&read_at(150, 512)), Verdict::Serve, "rules removed");
    }

    #[test]
    fn triggers_once_every_and_seeded_probability_are_deterministic() {
        let verdicts = |rule: &str, n: usize| {
            let faults = Faults::new(BLK_OPS, BLK_ACTIONS);
            faults.set(vec![RuleSpec::parse(rule).unwrap()]).unwrap();
            (0..n).map(|i| faults.admit(&read_at(i as u64, 512)) == Verdict::Fail).collect::<Vec<_>>()
        };
        assert_eq!(verdicts("trigger=once,action=ioerr", 3), [true, false, false]);
        assert_eq!(verdicts("trigger=every:3,action=ioerr", 6), [false, false, true, false, false, true]);
        let a = verdicts("trigger=probability:0.3,seed=42,action=ioerr", 10_000);
        assert_eq!(a, verdicts("trigger=probability:0.3,seed=42,action=ioerr", 10_000), "same seed, same faults");
        assert_ne!(a, verdicts("trigger=probability:0.3,seed=43,action=ioerr", 10_000));
        let rate = a.iter().filter(|f| **f).count() as f64 / a.len() as f64;
        assert!((0.27..0.33).contains(&rate), "{rate}");
    }

    #[test]
    fn json_rules_refuse_unknown_fields_and_a_failed_set_changes_nothing() {
        let faults = Faults::new(BLK_OPS, BLK_ACTIONS);
        let good: RuleSpec = serde_json::from_str(r#"{"op":"write","trigger":{"every":2},"action":"unsupp"}"#).unwrap();
        assert_eq!(good.trigger, Trigger::Every(2));
        assert!(serde_json::from_str::<RuleSpec>(r#"{"action":"ioerr","colour":"red"}"#).is_err());
        faults.set(vec![good.clone()]).unwrap();
        let bad = RuleSpec { op: "fly".into(), ..good };
        assert!(faults.set(vec![bad]).is_err());
        assert_eq!(faults.to_json()["rules"][0]["op"], "write", "the earlier rules stay");
        assert!(matches!(
            faults.set(vec![RuleSpec::parse("action=ioerr").unwrap(); MAX_RULES + 1]),
            Err(FaultError::TooMany(_))
        ));
    }
}
