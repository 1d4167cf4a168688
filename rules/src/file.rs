//! Rule files: TOML with a rule-set `version` and `[[segment]]` entries.
//!
//! ```toml
//! version = "2026-11-22.1"
//!
//! [[segment]]
//! id = "mortgage_seekers"
//! name = "Searching for a mortgage"
//! version = 3
//! mode = "live"              # or "shadow" (results go to dmp.segments.shadow only)
//! sample = 1.0               # shadow: the share of users evaluated, 0 < sample <= 1
//! when = '''
//! count(q contains "ипотек" or q contains "mortgage", 30d) >= 3
//! '''
//! ```
//! Errors give the file, line and column, and the reason. Every error of a file is reported,
//! not only the first.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::lang;
use crate::{DeclaredRule, Mode, Rule, RuleError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    version: Spanned<String>,
    #[serde(default)]
    segment: Vec<SegmentDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SegmentDoc {
    id: Spanned<String>,
    name: Option<String>,
    #[allow(dead_code)]
    description: Option<String>,
    version: Option<u32>,
    mode: Option<Spanned<String>>,
    sample: Option<Spanned<f64>>,
    when: Spanned<String>,
}

/// Byte offset to 1-based (line, column).
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// A parsed rule file: its version and its rules.
pub type ParsedRules = (String, Vec<Arc<dyn Rule>>);

/// Parses a rule file's text. `name` is used in error messages.
pub fn parse_rules(name: &str, text: &str) -> Result<ParsedRules, Vec<RuleError>> {
    let at = |offset: usize, reason: String| {
        let (line, col) = line_col(text, offset);
        RuleError {
            file: name.to_string(),
            line,
            col,
            reason,
        }
    };
    let doc: FileDoc = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        vec![at(offset, e.message().trim().to_string())]
    })?;
    let mut errors = Vec::new();
    let mut rules: Vec<Arc<dyn Rule>> = Vec::new();
    if doc.version.get_ref().trim().is_empty() {
        errors.push(at(
            doc.version.span().start,
            "the rule set `version` is empty".into(),
        ));
    }
    for s in doc.segment {
        let id = s.id.get_ref().clone();
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            errors.push(at(
                s.id.span().start,
                format!("segment id {id:?} must be 1 to 64 of a-z 0-9 _"),
            ));
        }
        let mode = match (s.mode.as_ref().map(|m| m.get_ref().as_str()), &s.sample) {
            (None | Some("live"), None) => Mode::Live,
            (None | Some("live"), Some(sample)) => {
                errors.push(at(
                    sample.span().start,
                    format!("segment {id}: `sample` applies to mode = \"shadow\" only"),
                ));
                Mode::Live
            }
            (Some("shadow"), sample) => {
                let v = sample.as_ref().map_or(1.0, |s| *s.get_ref());
                if !(v > 0.0 && v <= 1.0) {
                    let off = sample.as_ref().map_or(0, |s| s.span().start);
                    errors.push(at(
                        off,
                        format!("segment {id}: sample must be in (0, 1], not {v}"),
                    ));
                }
                Mode::Shadow { sample: v }
            }
            (Some(other), _) => {
                let off = s.mode.as_ref().map_or(0, |m| m.span().start);
                errors.push(at(
                    off,
                    format!("segment {id}: mode must be \"live\" or \"shadow\", not {other:?}"),
                ));
                Mode::Live
            }
        };
        // Where the condition's text starts in the file, for positions inside it.
        let span = s.when.span();
        let raw = &text[span.start..span.end];
        let delim = if raw.starts_with("'''") || raw.starts_with("\"\"\"") {
            3
        } else {
            1
        };
        let mut content_start = span.start + delim;
        if delim == 3 && text[content_start..].starts_with('\n') {
            content_start += 1;
        } else if delim == 3 && text[content_start..].starts_with("\r\n") {
            content_start += 2;
        }
        match lang::parse(s.when.get_ref()) {
            Ok(expr) => rules.push(Arc::new(DeclaredRule {
                id,
                name: s.name.unwrap_or_default(),
                version: s.version.unwrap_or(1),
                mode,
                expr,
            })),
            Err(e) => {
                let (base_line, base_col) = line_col(text, content_start);
                let line = base_line + e.pos.line - 1;
                let col = if e.pos.line == 1 {
                    base_col + e.pos.col - 1
                } else {
                    e.pos.col
                };
                errors.push(RuleError {
                    file: name.to_string(),
                    line,
                    col,
                    reason: format!("segment {id}: {}", e.reason),
                });
            }
        }
    }
    if errors.is_empty() {
        Ok((doc.version.into_inner(), rules))
    } else {
        Err(errors)
    }
}

/// Reads and parses a rule file.
pub fn load_rules(path: &Path) -> Result<ParsedRules, Vec<RuleError>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![RuleError {
            file: name.clone(),
            line: 0,
            col: 0,
            reason: format!("cannot read: {e}"),
        }]
    })?;
    parse_rules(&name, &text)
}
