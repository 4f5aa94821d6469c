//! Figures: what was measured, printed as a table and written as JSON.
//!
//! A figure may carry a target (a goal from the issue, never asserted: the machine is
//! noisy) and a baseline measured in the same run, with the ratio value / baseline.

use std::fmt::Write as _;

/// Whether a larger or a smaller value is better (decides how a target reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

#[derive(Clone, Debug)]
pub struct Target {
    /// `value < limit` (Lower) or `value >= limit` (Higher); for ratio targets the
    /// ratio is compared.
    pub limit: f64,
    pub on_ratio: bool,
    pub text: String,
}

#[derive(Clone, Debug)]
pub struct Figure {
    pub group: String,
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub better: Better,
    pub target: Option<Target>,
    /// (label, value) of the same-run baseline, same unit.
    pub baseline: Option<(String, f64)>,
    pub note: String,
}

impl Figure {
    pub fn new(group: &str, name: &str, value: f64, unit: &str, better: Better) -> Figure {
        Figure {
            group: group.into(),
            name: name.into(),
            value,
            unit: unit.into(),
            better,
            target: None,
            baseline: None,
            note: String::new(),
        }
    }

    pub fn target(mut self, limit: f64, on_ratio: bool, text: &str) -> Figure {
        self.target = Some(Target {
            limit,
            on_ratio,
            text: text.into(),
        });
        self
    }

    pub fn baseline(mut self, label: &str, value: f64) -> Figure {
        self.baseline = Some((label.into(), value));
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .filter(|(_, b)| *b > 0.0)
            .map(|(_, b)| self.value / b)
    }

    /// Whether the target is met; None without a target (or a ratio target without a
    /// baseline).
    pub fn met(&self) -> Option<bool> {
        let t = self.target.as_ref()?;
        let v = if t.on_ratio {
            self.ratio()?
        } else {
            self.value
        };
        Some(match self.better {
            Better::Lower => v < t.limit,
            Better::Higher => v >= t.limit,
        })
    }
}

fn num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The figures as an aligned text table.
pub fn table(figs: &[Figure]) -> String {
    let mut rows = vec![[
        "figure".to_string(),
        "value".into(),
        "target".into(),
        "baseline (same run)".into(),
        "ratio".into(),
        "note".into(),
    ]];
    for f in figs {
        let target = match (&f.target, f.met()) {
            (Some(t), Some(true)) => format!("{} (met)", t.text),
            (Some(t), Some(false)) => format!("{} (NOT met)", t.text),
            (Some(t), None) => t.text.clone(),
            (None, _) => "-".into(),
        };
        let baseline = match &f.baseline {
            Some((l, b)) => format!("{} {} ({l})", num(*b), f.unit),
            None => "-".into(),
        };
        let ratio = f.ratio().map_or("-".into(), |r| format!("{r:.2}"));
        rows.push([
            format!("{}: {}", f.group, f.name),
            format!("{} {}", num(f.value), f.unit),
            target,
            baseline,
            ratio,
            f.note.clone(),
        ]);
    }
    let mut w = [0usize; 6];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for (n, r) in rows.iter().enumerate() {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            let _ = write!(line, "{c:<width$}  ", width = w[i]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if n == 0 {
            out.push_str(&"-".repeat(w.iter().sum::<usize>() + 10));
            out.push('\n');
        }
    }
    out
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

/// The figures as a JSON document: `{"quick": bool, "figures": [...]}`.
pub fn json(figs: &[Figure], quick: bool, context: &[(String, String)]) -> String {
    let mut o = String::from("{\n");
    let _ = writeln!(o, "  \"quick\": {quick},");
    o.push_str("  \"context\": {");
    for (i, (k, v)) in context.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(o, "{sep}\n    {}: {}", json_str(k), json_str(v));
    }
    o.push_str("\n  },\n  \"figures\": [");
    for (i, f) in figs.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            o,
            "{sep}\n    {{\"group\": {}, \"name\": {}, \"value\": {}, \"unit\": {}, \"better\": {}",
            json_str(&f.group),
            json_str(&f.name),
            json_num(f.value),
            json_str(&f.unit),
            json_str(match f.better {
                Better::Lower => "lower",
                Better::Higher => "higher",
            })
        );
        match &f.target {
            Some(t) => {
                let _ = write!(
                    o,
                    ", \"target\": {{\"text\": {}, \"limit\": {}, \"on_ratio\": {}, \"met\": {}}}",
                    json_str(&t.text),
                    json_num(t.limit),
                    t.on_ratio,
                    f.met().map_or("null".into(), |m| m.to_string())
                );
            }
            None => o.push_str(", \"target\": null"),
        }
        match &f.baseline {
            Some((l, b)) => {
                let _ = write!(
                    o,
                    ", \"baseline\": {{\"label\": {}, \"value\": {}}}, \"ratio\": {}",
                    json_str(l),
                    json_num(*b),
                    f.ratio().map_or("null".into(), json_num)
                );
            }
            None => o.push_str(", \"baseline\": null, \"ratio\": null"),
        }
        let _ = write!(o, ", \"note\": {}}}", json_str(&f.note));
    }
    o.push_str("\n  ]\n}\n");
    o
}

/// Median and 90th percentile (nearest rank) of `v`; `(NaN, NaN)` when empty.
pub fn median_p90(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let med = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    let rank = ((0.9 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    (med, s[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p90() {
        assert_eq!(median_p90(&[3.0, 1.0, 2.0]), (2.0, 3.0));
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(median_p90(&v), (5.5, 9.0));
        assert!(median_p90(&[]).0.is_nan());
    }

    #[test]
    fn targets_and_ratios() {
        let f = Figure::new("g", "n", 80.0, "ms", Better::Lower).target(100.0, false, "< 100");
        assert_eq!(f.met(), Some(true));
        let f = Figure::new("g", "n", 60.0, "MB/s", Better::Higher)
            .target(0.7, true, ">= 70%")
            .baseline("host", 100.0);
        assert_eq!(f.ratio(), Some(0.6));
        assert_eq!(f.met(), Some(false));
        let j = json(&[f], true, &[("k".into(), "v\"".into())]);
        assert!(j.contains("\"ratio\": 0.6"), "{j}");
        assert!(j.contains("\"met\": false"), "{j}");
        assert!(j.contains("\"k\": \"v\\\"\""), "{j}");
        assert!(table(&[]).starts_with("figure"));
    }
}
