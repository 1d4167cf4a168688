//! The rules' metrics, declared once. `rule` is a segment id of the rule set in force (bounded by
//! the rule set).

/// Time one rule took for one user, sampled on one evaluation in 64 (histogram, seconds).
pub const RULE_DURATION: &str = "dmp_rules_rule_duration_seconds";
