//! `dmp-rules`: segment rules. **Empty until the segmenter and rules issue.**
//!
//! What will live here: the `Rule` trait for compiled-in plugins (the user's whole row in, the
//! segments it matches with evidence out), the registry, the declarative rule language analysts
//! edit live (validated with file, line and reason; shadow mode on a sample of traffic) and the
//! built-in rules. Nothing here behaves yet.
