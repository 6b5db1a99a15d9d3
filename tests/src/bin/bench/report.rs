//! The Markdown report and its CSV of raw values.
use std::fmt::Write as _;

#[derive(Default)]
pub struct Report {
    pub md: String,
    pub csv: String,
}

/// Median and p99 of samples (any unit), by nearest rank on the sorted values.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub p99: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[(((v.len() - 1) as f64) * p / 100.0).round() as usize];
        Some(Self {
            median: at(50.0),
            p99: at(99.0),
            n: v.len(),
        })
    }
}

/// One row of a comparison: a tool, its median and p99 (already formatted) and n.
pub struct Row {
    pub tool: String,
    pub median: String,
    pub p99: String,
    pub n: String,
    pub note: String,
}

impl Row {
    pub fn new(tool: impl Into<String>, stat: Option<Stat>, unit: &str, note: String) -> Self {
        let f = |x: f64| format!("{} {unit}", fmt(x));
        match stat {
            Some(s) => Self {
                tool: tool.into(),
                median: f(s.median),
                p99: f(s.p99),
                n: s.n.to_string(),
                note,
            },
            None => Self {
                tool: tool.into(),
                median: "–".into(),
                p99: "–".into(),
                n: "0".into(),
                note,
            },
        }
    }
}

/// A number with 3 significant digits, no exponent.
pub fn fmt(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else if a >= 0.01 {
        format!("{x:.3}")
    } else {
        format!("{x:.5}")
    }
}

/// `a / b` as "N×", or "–" when b is zero.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{}×", fmt(a / b))
    } else {
        "–".into()
    }
}

impl Report {
    pub fn line(&mut self, text: &str) {
        let _ = writeln!(self.md, "{text}");
    }

    pub fn heading(&mut self, text: &str) {
        let _ = writeln!(self.md, "## {text}\n");
    }

    pub fn table(&mut self, rows: &[Row]) {
        let _ = writeln!(
            self.md,
            "| tool | median | p99 | n | notes |\n|---|---|---|---|---|"
        );
        for r in rows {
            let _ = writeln!(
                self.md,
                "| {} | {} | {} | {} | {} |",
                r.tool, r.median, r.p99, r.n, r.note
            );
        }
        let _ = writeln!(self.md);
    }

    /// Raw values under `kind` in the CSV.
    pub fn values(&mut self, kind: &str, values: impl IntoIterator<Item = f64>) {
        for v in values {
            let _ = writeln!(self.csv, "\"{kind}\",{v}");
        }
    }

    pub fn value(&mut self, kind: &str, v: f64) {
        self.values(kind, [v]);
    }
}
