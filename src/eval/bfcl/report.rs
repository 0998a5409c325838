//! Scores: per-category tallies of the verdicts and the Tool-N1 summary.

use super::check::{check_record, Verdict};
use super::{Category, Record};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Correct / total for one category.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub correct: usize,
    pub total: usize,
}

impl Tally {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Scores for a set of records.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub verdicts: Vec<Verdict>,
    pub per_category: BTreeMap<&'static str, Tally>,
    /// Records that had no output line (counted as wrong, kind `missing_output`).
    pub missing: usize,
    /// Output ids that match no loaded record (ignored).
    pub unknown_ids: Vec<String>,
}

/// The Tool-N1 summary (the grouping of the Tool-N1 paper's BFCL table, arXiv:2505.00024), in
/// percent; `None` where a needed category is absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Mean of the simple languages present (python, java, javascript).
    pub non_live_simple: Option<f64>,
    /// Mean of simple, multiple, parallel, parallel_multiple.
    pub non_live: Option<f64>,
    /// Correct / total over the four live AST categories.
    pub live: Option<f64>,
    /// Mean of non-live and live.
    pub overall: Option<f64>,
}

impl Report {
    pub fn accuracy(&self, c: Category) -> Option<f64> {
        self.per_category
            .get(c.name())
            .filter(|t| t.total > 0)
            .map(|t| 100.0 * t.accuracy())
    }

    pub fn summary(&self) -> Summary {
        let simples: Vec<f64> = [
            Category::SimplePython,
            Category::SimpleJava,
            Category::SimpleJavascript,
        ]
        .iter()
        .filter_map(|c| self.accuracy(*c))
        .collect();
        let non_live_simple =
            (!simples.is_empty()).then(|| simples.iter().sum::<f64>() / simples.len() as f64);
        let others: Option<Vec<f64>> = [
            Category::Multiple,
            Category::Parallel,
            Category::ParallelMultiple,
        ]
        .iter()
        .map(|c| self.accuracy(*c))
        .collect();
        let non_live = match (non_live_simple, others) {
            (Some(s), Some(o)) => Some((s + o.iter().sum::<f64>()) / 4.0),
            _ => None,
        };
        let live_cats = [
            Category::LiveSimple,
            Category::LiveMultiple,
            Category::LiveParallel,
            Category::LiveParallelMultiple,
        ];
        let mut lt = Tally::default();
        let mut all_present = true;
        for c in live_cats {
            match self.per_category.get(c.name()) {
                Some(t) if t.total > 0 => {
                    lt.correct += t.correct;
                    lt.total += t.total;
                }
                _ => all_present = false,
            }
        }
        let live = all_present.then(|| 100.0 * lt.accuracy());
        let overall = match (non_live, live) {
            (Some(a), Some(b)) => Some((a + b) / 2.0),
            _ => None,
        };
        Summary {
            non_live_simple,
            non_live,
            live,
            overall,
        }
    }

    /// The per-category table and the summary as text.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<26} {:>8} {:>8} {:>9}\n",
            "category", "correct", "total", "accuracy"
        );
        for c in Category::ALL {
            if let Some(t) = self.per_category.get(c.name()) {
                s += &format!(
                    "{:<26} {:>8} {:>8} {:>8.2}%\n",
                    c.name(),
                    t.correct,
                    t.total,
                    100.0 * t.accuracy()
                );
            }
        }
        let sm = self.summary();
        let f = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into());
        s += &format!(
            "\nTool-N1 summary: Non-live {} (simple {}), Live {}, Overall {}\n",
            f(sm.non_live),
            f(sm.non_live_simple),
            f(sm.live),
            f(sm.overall)
        );
        if self.missing > 0 {
            s += &format!(
                "{} records had no output and count as wrong\n",
                self.missing
            );
        }
        if !self.unknown_ids.is_empty() {
            s += &format!(
                "{} output ids match no loaded record and were ignored\n",
                self.unknown_ids.len()
            );
        }
        s
    }
}

/// Score `(id, raw output)` pairs against records. Records without an output count as wrong
/// (`missing_output`); outputs whose id matches no record are listed in `unknown_ids`.
pub fn score(records: &[Record], outputs: &[(String, String)]) -> Report {
    let mut by_id: HashMap<&str, &str> = HashMap::new();
    for (id, out) in outputs {
        by_id.insert(id.as_str(), out.as_str());
    }
    let known: std::collections::HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let mut rep = Report::default();
    for (id, _) in outputs {
        if !known.contains(id.as_str()) {
            rep.unknown_ids.push(id.clone());
        }
    }
    for r in records {
        let v = match by_id.get(r.id.as_str()) {
            Some(out) => check_record(r, out),
            None => {
                rep.missing += 1;
                Verdict {
                    id: r.id.clone(),
                    category: r.category.name(),
                    valid: false,
                    error_type: Some("missing_output".into()),
                    error: Some("no output line for this id".into()),
                }
            }
        };
        let t = rep.per_category.entry(r.category.name()).or_default();
        t.total += 1;
        t.correct += v.valid as usize;
        rep.verdicts.push(v);
    }
    rep
}
