//! Samples, their summaries, and the report: a markdown table for people
//! and a JSON document for tools.
//!
//! Every figure is summarised the same way — median, p99, min, max over its
//! samples — so the JSON has one shape and the smoke test can check every
//! figure with one rule (positive, min ≤ median ≤ p99 ≤ max). A figure that
//! is one measurement (a rule count, hearthd's RSS at one moment, a recovery
//! after which the VMs are gone) has n = 1 and all four equal.

use std::fmt::Write as _;

use serde::Serialize;

/// Median, p99, min and max of one figure's samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// How many samples.
    pub n: usize,
    /// The middle sample (the mean of the two middle ones for even n).
    pub median: f64,
    /// Nearest-rank 99th percentile: with fewer than 100 samples this is
    /// the largest or second largest, so read it as "the bad case".
    pub p99: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none (or any is NaN).
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        // Nearest rank: the smallest sample at or above 99 % of them.
        let rank = (0.99 * n as f64).ceil() as usize;
        let p99 = s[rank.clamp(1, n) - 1];
        Some(Summary {
            n,
            median,
            p99: p99.max(median),
            min: s[0],
            max: s[n - 1],
        })
    }
}

/// One figure of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable key (`start.hearth`), the JSON object key.
    #[serde(skip)]
    pub key: String,
    /// What it is, for the table.
    pub label: String,
    /// `ms`, `s`, `cycles/s`, `MiB`, `rules`.
    pub unit: &'static str,
    /// Raw samples (kept so a reader can redo the statistics).
    pub samples: Vec<f64>,
}

/// A derived number (a ratio, a per-VM cost).
#[derive(Debug, Clone, Serialize)]
pub struct Derived {
    /// Stable key.
    #[serde(skip)]
    pub key: String,
    /// What it is.
    pub label: String,
    /// Its value.
    pub value: f64,
    /// Its unit (`×`, `KiB`).
    pub unit: &'static str,
}

/// One of the targets, checked against what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The target as the issue states it.
    pub goal: String,
    /// What was measured, in words.
    pub measured: String,
    /// Whether it is met.
    pub met: bool,
}

/// Everything a run measured, in the order it was measured.
#[derive(Debug, Default)]
pub struct Report {
    figures: Vec<Figure>,
    derived: Vec<Derived>,
    targets: Vec<Target>,
    notes: Vec<String>,
    extra: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    /// Adds `value` to figure `key`, creating it with `label` and `unit`.
    pub fn add(&mut self, key: &str, label: &str, unit: &'static str, value: f64) {
        match self.figures.iter_mut().find(|f| f.key == key) {
            Some(f) => f.samples.push(value),
            None => self.figures.push(Figure {
                key: key.to_owned(),
                label: label.to_owned(),
                unit,
                samples: vec![value],
            }),
        }
    }

    /// The summary of figure `key`, if it has samples.
    pub fn summary(&self, key: &str) -> Option<Summary> {
        self.figures
            .iter()
            .find(|f| f.key == key)
            .and_then(|f| Summary::of(&f.samples))
    }

    /// The median of figure `key`.
    pub fn median(&self, key: &str) -> Option<f64> {
        self.summary(key).map(|s| s.median)
    }

    /// Records a derived number.
    pub fn derive(&mut self, key: &str, label: &str, unit: &'static str, value: f64) {
        self.derived.retain(|d| d.key != key);
        self.derived.push(Derived {
            key: key.to_owned(),
            label: label.to_owned(),
            value,
            unit,
        });
    }

    /// A derived number by key.
    pub fn derived(&self, key: &str) -> Option<f64> {
        self.derived.iter().find(|d| d.key == key).map(|d| d.value)
    }

    /// Records a target's verdict.
    pub fn target(&mut self, goal: impl Into<String>, measured: impl Into<String>, met: bool) {
        self.targets.push(Target {
            goal: goal.into(),
            measured: measured.into(),
            met,
        });
    }

    /// A line printed under the tables (what a figure includes, a caveat).
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Extra structured data for the JSON only (per-step breakdowns, …).
    pub fn extra(&mut self, key: &str, value: serde_json::Value) {
        self.extra.insert(key.to_owned(), value);
    }

    /// The markdown tables: figures, derived numbers, targets, notes.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str("| figure | unit | n | median | p99 | min | max |\n");
        out.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
        for f in &self.figures {
            if let Some(s) = Summary::of(&f.samples) {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    f.label,
                    f.unit,
                    s.n,
                    num(s.median),
                    num(s.p99),
                    num(s.min),
                    num(s.max)
                );
            }
        }
        if !self.derived.is_empty() {
            out.push_str("\n| derived | value |\n| --- | ---: |\n");
            for d in &self.derived {
                let _ = writeln!(out, "| {} | {} {} |", d.label, num(d.value), d.unit);
            }
        }
        if !self.targets.is_empty() {
            out.push_str("\n| target (issue 6) | measured | met |\n| --- | --- | --- |\n");
            for t in &self.targets {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} |",
                    t.goal,
                    t.measured,
                    if t.met { "yes" } else { "**no**" }
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "\n{n}");
        }
        out
    }

    /// The JSON document: `figures.<key>` = {label, unit, n, median, p99,
    /// min, max, samples}, `derived.<key>`, `targets`, `notes`, and
    /// whatever `context` the caller adds (machine, settings).
    pub fn json(&self, context: serde_json::Value) -> serde_json::Value {
        let mut figures = serde_json::Map::new();
        let mut order = Vec::new();
        for f in &self.figures {
            let Some(s) = Summary::of(&f.samples) else {
                continue;
            };
            order.push(f.key.clone());
            figures.insert(
                f.key.clone(),
                serde_json::json!({
                    "label": f.label,
                    "unit": f.unit,
                    "n": s.n,
                    "median": s.median,
                    "p99": s.p99,
                    "min": s.min,
                    "max": s.max,
                    "samples": f.samples,
                }),
            );
        }
        let derived: serde_json::Map<String, serde_json::Value> = self
            .derived
            .iter()
            .map(|d| {
                (
                    d.key.clone(),
                    serde_json::json!({"label": d.label, "value": d.value, "unit": d.unit}),
                )
            })
            .collect();
        serde_json::json!({
            "context": context,
            "figure_order": order,
            "figures": figures,
            "derived": derived,
            "targets": self.targets,
            "notes": self.notes,
            "extra": self.extra,
        })
    }
}

/// Three significant digits, no exponent: `0.412`, `41.2`, `4120`.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!(
            (s.n, s.median, s.min, s.max, s.p99),
            (3, 2.0, 1.0, 3.0, 3.0)
        );
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        let many: Vec<f64> = (1..=200).map(f64::from).collect();
        let s = Summary::of(&many).unwrap();
        assert_eq!(s.p99, 198.0);
        assert_eq!(Summary::of(&[7.0]).unwrap().p99, 7.0);
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn report_shapes() {
        let mut r = Report::default();
        r.add("a", "A", "ms", 2.0);
        r.add("a", "A", "ms", 4.0);
        r.derive("ratio", "A/B", "×", 1.5);
        r.target("x ≤ 1", "1.5", false);
        let md = r.markdown();
        assert!(
            md.contains("| A | ms | 2 | 3.00 | 4.00 | 2.00 | 4.00 |"),
            "{md}"
        );
        assert!(md.contains("**no**"));
        let j = r.json(serde_json::json!({}));
        assert_eq!(j["figures"]["a"]["median"], 3.0);
        assert_eq!(j["derived"]["ratio"]["value"], 1.5);
        assert_eq!(num(0.01234), "0.012");
        assert_eq!(num(1234.5), "1234");
    }
}
