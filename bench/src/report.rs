//! Figures, their medians and ranges, the pgwarden/Patroni ratio, as a table and as JSON.

use std::collections::BTreeMap;

use serde::Serialize;

/// Values of one figure for one agent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Series {
    pub values: Vec<f64>,
}

impl Series {
    pub fn push(&mut self, v: f64) {
        self.values.push(v);
    }

    pub fn median(&self) -> Option<f64> {
        if self.values.is_empty() {
            return None;
        }
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }

    pub fn min(&self) -> Option<f64> {
        self.values.iter().copied().reduce(f64::min)
    }

    pub fn max(&self) -> Option<f64> {
        self.values.iter().copied().reduce(f64::max)
    }
}

/// One figure for both agents.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figure {
    pub unit: String,
    /// True when lower is better (times, memory); false for throughput.
    pub lower_is_better: bool,
    pub pgwarden: Series,
    pub patroni: Series,
}

impl Figure {
    pub fn ratio(&self) -> Option<f64> {
        match (self.pgwarden.median(), self.patroni.median()) {
            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
            _ => None,
        }
    }
}

/// All figures, by name, in insertion order of their names' sort.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub figures: BTreeMap<String, Figure>,
    pub machine: String,
    pub started: String,
    pub settings: String,
    /// Repetitions that failed, per agent: reported beside the figures, never hidden and never
    /// allowed to abort the whole run.
    pub misses: Vec<Miss>,
}

/// One repetition that produced no figure.
#[derive(Debug, Clone, Serialize)]
pub struct Miss {
    pub agent: String,
    pub what: String,
    pub error: String,
}

impl Report {
    pub fn figure(&mut self, name: &str, unit: &str, lower_is_better: bool) -> &mut Figure {
        self.figures
            .entry(name.to_owned())
            .or_insert_with(|| Figure {
                unit: unit.to_owned(),
                lower_is_better,
                ..Default::default()
            })
    }

    pub fn miss(&mut self, agent: &str, what: &str, error: &anyhow::Error) {
        self.misses.push(Miss {
            agent: agent.to_owned(),
            what: what.to_owned(),
            error: format!("{error:#}"),
        });
    }

    /// A Markdown table: median (min–max) per agent and the ratio.
    pub fn table(&self) -> String {
        let fmt = |s: &Series| match (s.median(), s.min(), s.max()) {
            (Some(m), Some(lo), Some(hi)) if s.values.len() > 1 => {
                format!("{m:.3} ({lo:.3}–{hi:.3})")
            }
            (Some(m), _, _) => format!("{m:.3}"),
            _ => "n/a".to_owned(),
        };
        let mut out = String::from(
            "| figure | unit | pgwarden median (min–max) | Patroni median (min–max) | pgwarden / Patroni |\n|---|---|---|---|---|\n",
        );
        for (name, f) in &self.figures {
            out.push_str(&format!(
                "| {name} | {} | {} | {} | {} |\n",
                f.unit,
                fmt(&f.pgwarden),
                fmt(&f.patroni),
                f.ratio()
                    .map(|r| format!("{r:.3}"))
                    .unwrap_or_else(|| "n/a".into())
            ));
        }
        if !self.misses.is_empty() {
            out.push_str("\nFailed repetitions (not in the figures above):\n\n");
            for m in &self.misses {
                out.push_str(&format!("- {}: {}: {}\n", m.agent, m.what, m.error));
            }
        }
        out
    }
}
