//! The segmenter's metrics, declared once. `worker` is the worker index (bounded by cores);
//! `rule` is a configured rule id (bounded by the rule set).

/// Changes received by a worker (counter).
pub const RECEIVED: &str = "dmp_segmenter_changes_received_total";
/// Changes skipped because a read already saw their data, or the read for another change of the
/// user in the same batch covers them (counter).
pub const SKIPPED_DUPLICATE: &str = "dmp_segmenter_changes_skipped_duplicate_total";
/// Changes skipped because the user is blacklisted as a bot (counter).
pub const SKIPPED_BOT: &str = "dmp_segmenter_changes_skipped_bot_total";
/// Changes of throttled users held back to be read with the user's next evaluation (counter).
/// Each is then counted as evaluated, duplicate or bot as well.
pub const THROTTLED: &str = "dmp_segmenter_changes_throttled_total";
/// Backfill changes (newest event older than `segmenter.backfill_age_ms` at their write) held
/// back behind live ones (counter). Each is then counted as evaluated, duplicate or bot as well.
pub const BACKFILL: &str = "dmp_segmenter_changes_backfill_total";
/// Backfill changes a worker holds back now (gauge).
pub const BACKFILL_HELD: &str = "dmp_segmenter_backfill_held_changes";
/// Users evaluated, by `trigger` (`change`, `timer`) (counter).
pub const EVALUATED: &str = "dmp_segmenter_users_evaluated_total";
/// Evaluations from a user's summary and the cells written since (counter; docs/adr/007).
pub const FROM_SUMMARY: &str = "dmp_segmenter_evaluations_from_summary_total";
/// Evaluations from the whole row, by `reason` the summary was not used: `no_summary`, `rules`
/// (pruned for another rule set), `timer`, `store` (it could not say what was written since),
/// `out_of_order` (an event within the times of the row's events), `history` (near the store's
/// limits) (counter).
pub const FROM_ROW: &str = "dmp_segmenter_evaluations_from_row_total";
/// Users a worker keeps a summary of (gauge).
pub const SUMMARIES: &str = "dmp_segmenter_summaries";
/// Users newly blacklisted (counter).
pub const BOTS: &str = "dmp_segmenter_bots_blacklisted_total";
/// Cells per row read: with the rules' projection, the event cells they read plus a marker per
/// event (histogram).
pub const ROW_CELLS: &str = "dmp_segmenter_row_cells";
/// Time to evaluate the whole rule set for one user (histogram, seconds). Per-rule times are
/// `dmp_rules_rule_duration_seconds{rule}`.
pub const EVALUATION_TIME: &str = "dmp_segmenter_evaluation_duration_seconds";
/// Time a change waited in dmp.user-changes before a worker took it (histogram, seconds).
pub const WAIT: &str = "dmp_segmenter_topic_wait_seconds";
/// Newest event time of the user -> its segment record published (histogram, seconds).
pub const END_TO_END: &str = "dmp_segmenter_event_to_segment_seconds";
/// Segment records published, by `topic_kind` (`live`, `shadow`) (counter).
pub const PUBLISHED: &str = "dmp_segmenter_records_published_total";
/// Due re-evaluation timers handed to workers (counter).
pub const TIMERS_FIRED: &str = "dmp_segmenter_timers_fired_total";
/// Re-evaluation timers scheduled (timer rows written) (counter).
pub const TIMERS_SCHEDULED: &str = "dmp_segmenter_timers_scheduled_total";
/// Scans for due timers that failed (counter); the next scan retries.
pub const TIMER_SCAN_ERRORS: &str = "dmp_segmenter_timer_scan_errors_total";
/// Change records that were not valid JSON (counter); each is also a dead letter.
pub const BAD_CHANGES: &str = "dmp_segmenter_bad_changes_total";
/// Records sent to the dead-letter topic, by `reason` (`bad_change`, `unreadable_row`) (counter).
pub const DEAD_LETTERS: &str = "dmp_segmenter_dead_letters_total";
/// Store or bus failures that made a worker retry (counter).
pub const RETRIES: &str = "dmp_segmenter_retries_total";
