//! What a load did: which keys were applied, and every key that was missing, of the wrong
//! shape, or not expected at all.

use std::fmt;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Keys loaded into the module.
    pub applied: Vec<String>,
    /// Keys the module needs that the checkpoint lacks.
    pub missing: Vec<String>,
    /// `(key, expected shape, stored shape)`.
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Keys the checkpoint holds that no module wants and no ignore rule names.
    pub unexpected: Vec<String>,
    /// Keys the checkpoint holds that are skipped on purpose, with the reason.
    pub ignored: Vec<(String, &'static str)>,
}

impl LoadReport {
    /// A load fails on any missing, mismatched or unexpected key.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.mismatched.is_empty() && self.unexpected.is_empty()
    }

    pub(crate) fn sort(&mut self) {
        self.applied.sort();
        self.missing.sort();
        self.mismatched.sort();
        self.unexpected.sort();
        self.ignored.sort();
    }
}

fn shape(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

/// Every problem on one line, all of them listed.
impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("{} missing: {}", self.missing.len(), self.missing.join(", ")));
        }
        if !self.mismatched.is_empty() {
            let list: Vec<String> = self
                .mismatched
                .iter()
                .map(|(k, want, got)| format!("{k} (config says {}, file has {})", shape(want), shape(got)))
                .collect();
            parts.push(format!("{} of the wrong shape: {}", list.len(), list.join(", ")));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("{} unexpected: {}", self.unexpected.len(), self.unexpected.join(", ")));
        }
        if parts.is_empty() {
            write!(f, "{} tensors loaded", self.applied.len())
        } else {
            write!(f, "{}", parts.join("; "))
        }
    }
}
