//! The conformance suite every [`Bus`] backend passes: order within a partition, key to the same
//! partition (Kafka's murmur2), consumer groups independent of each other, members of one group
//! sharing partitions, commit and resume, seek by timestamp, committed offsets surviving a
//! restart, a batch produce of 10k, end offsets, a compacted topic ending with each key's newest
//! record (tombstones as empty values), and clear errors.
//!
//! A backend's test implements [`Harness`] and calls [`run_all`]; each check uses its own topics
//! and groups, so a broker can be shared between checks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use dmp_core::partition::partition_for_key;

use crate::{Bus, BusError, Cleanup, Consumer, ProduceRecord, Record, TopicPartition};

/// What a backend's test provides.
#[async_trait]
pub trait Harness: Send {
    /// The bus under test.
    fn bus(&self) -> Arc<dyn Bus>;
    /// Closes the bus and opens it again on the same data (embedded: reopen the database;
    /// Kafka: new clients to the same broker).
    async fn restart(&mut self);
    /// A name unique to this run, for topics and groups.
    fn unique(&self, base: &str) -> String;
    /// How long a consumer may take to be assigned partitions and read (brokers need longer).
    fn patience(&self) -> Duration {
        Duration::from_secs(20)
    }
    /// Whether the backend reports exact high offsets. Tansu 0.6's high watermark lags the real
    /// end of a partition; there the checks count with the producer's acknowledgements instead
    /// and only check that reported offsets never run ahead of the records.
    fn exact_watermarks(&self) -> bool {
        true
    }
    /// Compacts every compacted topic now, where the backend lets the test do that (None: the
    /// broker compacts on its own schedule).
    fn compact_now(&self) -> Option<CheckResult> {
        None
    }
}

/// The next offset of each partition after `delivered` (from the producer's acknowledgements).
fn ends_from(delivered: &[crate::Delivered], partitions: u32) -> Vec<u64> {
    let mut ends = vec![0u64; partitions as usize];
    for d in delivered {
        ends[d.partition as usize] = ends[d.partition as usize].max(d.offset + 1);
    }
    ends
}

/// A failed check.
pub type CheckResult = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

fn e(err: BusError) -> String {
    err.to_string()
}

/// Runs every check; returns the failures as `name: reason`.
pub async fn run_all(h: &mut dyn Harness) -> Vec<String> {
    let mut failures = Vec::new();
    macro_rules! check {
        ($name:ident) => {
            let started = std::time::Instant::now();
            let r = $name(h).await;
            tracing::info!(
                check = stringify!($name),
                ok = r.is_ok(),
                secs = started.elapsed().as_secs_f64(),
                "bus conformance"
            );
            if let Err(reason) = r {
                failures.push(format!("{}: {}", stringify!($name), reason));
            }
        };
    }
    check!(order_within_partition);
    check!(key_goes_to_murmur2_partition);
    check!(groups_are_independent);
    check!(members_of_one_group_share_partitions);
    check!(commit_then_resume);
    check!(commit_for_unowned_partition_is_ignored);
    check!(seek_group_to_timestamp);
    check!(restart_keeps_records_and_committed_offsets);
    check!(batch_produce_of_10k);
    check!(end_offsets_count_records);
    check!(compacted_topic_ends_with_newest_of_each_key);
    check!(errors_are_clear);
    failures
}

async fn topic(h: &dyn Harness, base: &str, partitions: u32) -> Result<String, String> {
    let name = h.unique(base);
    let created = h.bus().create_topic(&name, partitions).await.map_err(e)?;
    ensure!(created, "topic {name} already existed");
    let again = h.bus().create_topic(&name, partitions).await.map_err(e)?;
    ensure!(!again, "creating {name} twice reported a new topic");
    Ok(name)
}

/// Polls until `n` records arrived (or patience runs out), committing nothing.
async fn read_n(c: &mut dyn Consumer, n: usize, patience: Duration) -> Result<Vec<Record>, String> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut out = Vec::new();
    while out.len() < n {
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "read {} of {n} records before timing out",
                out.len()
            ));
        }
        out.extend(
            c.poll(n - out.len(), Duration::from_millis(200))
                .await
                .map_err(e)?,
        );
    }
    Ok(out)
}

/// Checks that nothing more arrives for a while.
async fn read_nothing(c: &mut dyn Consumer, wait: Duration) -> CheckResult {
    let extra = c.poll(100, wait).await.map_err(e)?;
    ensure!(
        extra.is_empty(),
        "{} unexpected records, first {:?}",
        extra.len(),
        extra.first()
    );
    Ok(())
}

fn records(prefix: &str, n: usize, keys: usize) -> Vec<ProduceRecord> {
    (0..n)
        .map(|i| ProduceRecord::new(format!("{prefix}-k{}", i % keys), format!("{prefix}-v{i}")))
        .collect()
}

async fn order_within_partition(h: &mut dyn Harness) -> CheckResult {
    let t = topic(h, "order", 4).await?;
    let bus = h.bus();
    for b in 0..10 {
        let batch: Vec<ProduceRecord> = (0..100)
            .map(|i| ProduceRecord::new("one-user", format!("{}", b * 100 + i)))
            .collect();
        bus.produce(&t, batch).await.map_err(e)?;
    }
    let mut c = bus
        .consumer(&h.unique("g-order"), std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let got = read_n(c.as_mut(), 1000, h.patience()).await?;
    let values: Vec<u32> = got
        .iter()
        .map(|r| {
            String::from_utf8_lossy(&r.value)
                .parse()
                .unwrap_or(u32::MAX)
        })
        .collect();
    ensure!(
        values == (0..1000).collect::<Vec<_>>(),
        "records of one key out of order"
    );
    ensure!(
        got.windows(2).all(|w| w[1].offset == w[0].offset + 1),
        "offsets not consecutive"
    );
    c.close().await.map_err(e)
}

async fn key_goes_to_murmur2_partition(h: &mut dyn Harness) -> CheckResult {
    let t = topic(h, "keys", 6).await?;
    let bus = h.bus();
    let batch = records("kp", 600, 60);
    let delivered = bus.produce(&t, batch.clone()).await.map_err(e)?;
    ensure!(delivered.len() == 600, "{} deliveries", delivered.len());
    for (r, d) in batch.iter().zip(&delivered) {
        let want = partition_for_key(&r.key, 6);
        ensure!(
            d.partition == want,
            "key {:?} went to {} not {want}",
            String::from_utf8_lossy(&r.key),
            d.partition
        );
    }
    let mut c = bus
        .consumer(&h.unique("g-keys"), std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let got = read_n(c.as_mut(), 600, h.patience()).await?;
    for r in &got {
        ensure!(
            r.partition == partition_for_key(&r.key, 6),
            "consumed record on wrong partition"
        );
    }
    c.close().await.map_err(e)
}

async fn groups_are_independent(h: &mut dyn Harness) -> CheckResult {
    let t = topic(h, "groups", 3).await?;
    let bus = h.bus();
    bus.produce(&t, records("gi", 300, 30)).await.map_err(e)?;
    let mut a = bus
        .consumer(&h.unique("g-a"), std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let mut b = bus
        .consumer(&h.unique("g-b"), std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let ra = read_n(a.as_mut(), 300, h.patience()).await?;
    let rb = read_n(b.as_mut(), 300, h.patience()).await?;
    let sa: BTreeSet<_> = ra.iter().map(|r| (r.partition, r.offset)).collect();
    let sb: BTreeSet<_> = rb.iter().map(|r| (r.partition, r.offset)).collect();
    ensure!(sa.len() == 300 && sa == sb, "groups saw different records");
    a.close().await.map_err(e)?;
    b.close().await.map_err(e)
}

async fn members_of_one_group_share_partitions(h: &mut dyn Harness) -> CheckResult {
    let t = topic(h, "share", 4).await?;
    let bus = h.bus();
    let g = h.unique("g-share");
    let mut a = bus
        .consumer(&g, std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let mut b = bus
        .consumer(&g, std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    // Wait until both members hold a share of the partitions.
    let deadline = tokio::time::Instant::now() + h.patience();
    let mut seen: BTreeMap<(u32, u64), u32> = BTreeMap::new();
    let mut produced = false;
    loop {
        for r in a.poll(500, Duration::from_millis(100)).await.map_err(e)? {
            *seen.entry((r.partition, r.offset)).or_default() += 1;
        }
        for r in b.poll(500, Duration::from_millis(100)).await.map_err(e)? {
            *seen.entry((r.partition, r.offset)).or_default() += 1;
        }
        let (pa, pb) = (a.assignment(), b.assignment());
        let disjoint = pa.iter().all(|x| !pb.contains(x));
        if !produced && !pa.is_empty() && !pb.is_empty() && disjoint && pa.len() + pb.len() == 4 {
            bus.produce(&t, records("sh", 400, 40)).await.map_err(e)?;
            produced = true;
        }
        if produced && seen.len() >= 400 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "members never split the partitions and read everything: a={pa:?} b={pb:?} read {}",
            seen.len()
        );
    }
    ensure!(
        seen.values().all(|n| *n == 1),
        "a record was read by both members"
    );
    a.close().await.map_err(e)?;
    b.close().await.map_err(e)
}

async fn commit_then_resume(h: &mut dyn Harness) -> CheckResult {
    let t = topic(h, "resume", 1).await?;
    let bus = h.bus();
    let g = h.unique("g-resume");
    bus.produce(&t, records("cr", 100, 10)).await.map_err(e)?;
    let mut c = bus
        .consumer(&g, std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let first = read_n(c.as_mut(), 100, h.patience()).await?;
    ensure!(
        first[0].offset == 0,
        "a new group starts at the earliest record"
    );
    c.commit(&[(TopicPartition::new(&t, 0), 40)])
        .await
        .map_err(e)?;
    c.close().await.map_err(e)?;
    let committed = bus.committed(&g, &t).await.map_err(e)?;
    ensure!(committed == vec![Some(40)], "committed {committed:?}");
    let mut c = bus
        .consumer(&g, std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let again = read_n(c.as_mut(), 60, h.patience()).await?;
    ensure!(
        again[0].offset == 40,
        "resumed at {} not 40",
        again[0].offset
    );
    ensure!(
        again.last().map(|r| r.offset) == Some(99),
        "did not read to the end"
    );
    read_nothing(c.as_mut(), Duration::from_millis(300)).await?;
    c.close().await.map_err(e)
}

async fn commit_for_unowned_partition_is_ignored(h: &mut dyn Harness) -> CheckResult {
    let t = topic(h, "unowned", 1).await?;
    let other = topic(h, "unowned-other", 1).await?;
    let bus = h.bus();
    let g = h.unique("g-unowned");
    bus.produce(&t, records("uo", 5, 1)).await.map_err(e)?;
    let mut c = bus
        .consumer(&g, std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    read_n(c.as_mut(), 5, h.patience()).await?;
    c.commit(&[(TopicPartition::new(&other, 0), 3)])
        .await
        .map_err(e)?;
    c.close().await.map_err(e)?;
    let committed = bus.committed(&g, &other).await.map_err(e)?;
    ensure!(
        committed == vec![None],
        "commit of an unowned partition landed: {committed:?}"
    );
    Ok(())
}

async fn seek_group_to_timestamp(h: &mut dyn Harness) -> CheckResult {
    let t = topic(h, "seek", 2).await?;
    let bus = h.bus();
    let t0 = dmp_core::clock::now_ms() - 3_600_000;
    let batch: Vec<ProduceRecord> = (0..100)
        .map(|i| ProduceRecord {
            key: format!("k{}", i % 10).into_bytes(),
            value: format!("{i}").into_bytes(),
            timestamp: Some(t0 + i * 1000),
        })
        .collect();
    let delivered = bus.produce(&t, batch).await.map_err(e)?;
    let highs = ends_from(&delivered, 2);
    let g = h.unique("g-seek");
    let mut c = bus
        .consumer(&g, std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let all = read_n(c.as_mut(), 100, h.patience()).await?;
    ensure!(
        all.iter().all(|r| {
            let i: i64 = String::from_utf8_lossy(&r.value).parse().unwrap_or(-1);
            r.timestamp == t0 + i * 1000
        }),
        "message timestamps were not kept"
    );
    let ends: Vec<(TopicPartition, u64)> = highs
        .iter()
        .enumerate()
        .map(|(p, o)| (TopicPartition::new(&t, p as u32), *o))
        .collect();
    c.commit(&ends).await.map_err(e)?;
    c.close().await.map_err(e)?;
    // A partner lost everything from t0 + 50 s on: move the group back.
    let offsets = bus
        .seek_group_to_time(&g, &t, t0 + 50_000)
        .await
        .map_err(e)?;
    ensure!(offsets.len() == 2, "{offsets:?}");
    ensure!(
        matches!(
            bus.commit_group(&g, &t, &[(2, 0)]).await,
            Err(crate::BusError::Rejected(_))
        ),
        "a commit for a partition the topic does not have is refused"
    );
    let mut c = bus
        .consumer(&g, std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let replay = read_n(c.as_mut(), 50, h.patience()).await?;
    let mut values: Vec<i64> = replay
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).parse().unwrap_or(-1))
        .collect();
    values.sort();
    ensure!(
        values == (50..100).collect::<Vec<_>>(),
        "replayed {values:?}"
    );
    read_nothing(c.as_mut(), Duration::from_millis(300)).await?;
    c.close().await.map_err(e)?;
    let future = bus.offsets_for_time(&t, t0 + 10_000_000).await.map_err(e)?;
    if h.exact_watermarks() {
        ensure!(
            future == highs,
            "a time after every record seeks to the end: {future:?}"
        );
    } else {
        ensure!(
            future.iter().zip(&highs).all(|(f, h)| f <= h),
            "seek past every record ran beyond the end: {future:?} vs {highs:?}"
        );
    }
    Ok(())
}

async fn restart_keeps_records_and_committed_offsets(h: &mut dyn Harness) -> CheckResult {
    let t = topic(h, "restart", 2).await?;
    let g = h.unique("g-restart");
    let ends = {
        let bus = h.bus();
        let delivered = bus.produce(&t, records("rs", 200, 20)).await.map_err(e)?;
        let ends = ends_from(&delivered, 2);
        let mut c = bus
            .consumer(&g, std::slice::from_ref(&t))
            .await
            .map_err(e)?;
        read_n(c.as_mut(), 200, h.patience()).await?;
        let marks: Vec<(TopicPartition, u64)> = ends
            .iter()
            .enumerate()
            .map(|(p, end)| (TopicPartition::new(&t, p as u32), end / 2))
            .collect();
        c.commit(&marks).await.map_err(e)?;
        c.close().await.map_err(e)?;
        ends
    };
    h.restart().await;
    let bus = h.bus();
    let offsets = bus.offsets(&t).await.map_err(e)?;
    if h.exact_watermarks() {
        let total: u64 = offsets.iter().map(|o| o.high).sum();
        ensure!(
            total == 200,
            "after restart the topic has {total} records, not 200"
        );
    }
    let committed = bus.committed(&g, &t).await.map_err(e)?;
    let want: Vec<Option<u64>> = ends.iter().map(|end| Some(end / 2)).collect();
    ensure!(
        committed == want,
        "committed after restart {committed:?}, want {want:?}"
    );
    let expect: usize = ends.iter().map(|end| (end - end / 2) as usize).sum();
    let mut c = bus
        .consumer(&g, std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let rest = read_n(c.as_mut(), expect, h.patience()).await?;
    for r in &rest {
        ensure!(
            r.offset >= ends[r.partition as usize] / 2,
            "resumed before the committed offset"
        );
    }
    read_nothing(c.as_mut(), Duration::from_millis(300)).await?;
    c.close().await.map_err(e)?;
    // Every record is still there after the restart: a new group reads all 200.
    let mut c = bus
        .consumer(&h.unique("g-restart-all"), std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    read_n(c.as_mut(), 200, h.patience()).await?;
    c.close().await.map_err(e)?;
    // Producing after a restart continues the offsets.
    let d = bus.produce(&t, records("rs2", 10, 10)).await.map_err(e)?;
    for x in d {
        ensure!(
            x.offset >= ends[x.partition as usize],
            "offset reused after restart"
        );
    }
    Ok(())
}

async fn batch_produce_of_10k(h: &mut dyn Harness) -> CheckResult {
    let t = topic(h, "batch", 4).await?;
    let bus = h.bus();
    let batch: Vec<ProduceRecord> = (0..10_000)
        .map(|i| ProduceRecord::new(format!("u{}", i % 1000), vec![b'x'; 100]))
        .collect();
    let d = bus.produce(&t, batch).await.map_err(e)?;
    ensure!(d.len() == 10_000, "{} deliveries", d.len());
    let distinct: BTreeSet<_> = d.iter().map(|x| (x.partition, x.offset)).collect();
    ensure!(distinct.len() == 10_000, "deliveries share offsets");
    let mut c = bus
        .consumer(&h.unique("g-batch"), std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let got = read_n(c.as_mut(), 10_000, h.patience()).await?;
    let seen: BTreeSet<_> = got.iter().map(|r| (r.partition, r.offset)).collect();
    ensure!(
        seen == distinct,
        "consumed records differ from the produced ones"
    );
    c.close().await.map_err(e)
}

async fn end_offsets_count_records(h: &mut dyn Harness) -> CheckResult {
    let t = topic(h, "ends", 3).await?;
    let bus = h.bus();
    let delivered = bus.produce(&t, records("eo", 90, 9)).await.map_err(e)?;
    let ends = ends_from(&delivered, 3);
    let offsets = bus.offsets(&t).await.map_err(e)?;
    ensure!(offsets.len() == 3, "{} partitions", offsets.len());
    for o in &offsets {
        let end = ends[o.partition as usize];
        if h.exact_watermarks() {
            ensure!(
                o.high == end,
                "partition {} high {} but {end} records",
                o.partition,
                o.high
            );
        } else {
            ensure!(
                o.high <= end,
                "partition {} high {} beyond its {end} records",
                o.partition,
                o.high
            );
        }
        ensure!(
            end == 0 || o.high > 0,
            "partition {} with records reports high 0",
            o.partition
        );
    }
    let topics = bus.topics().await.map_err(e)?;
    ensure!(
        topics.iter().any(|x| x.name == t && x.partitions == 3),
        "topic list lacks {t}"
    );
    Ok(())
}

/// Whether or when the backend compacts is its own business; what a reader from the start must
/// see is every key's newest record, after any older one, with tombstones as empty values.
async fn compacted_topic_ends_with_newest_of_each_key(h: &mut dyn Harness) -> CheckResult {
    let t = h.unique("compacted");
    let bus = h.bus();
    let created = bus
        .create_topic_with(&t, 3, Cleanup::Compact)
        .await
        .map_err(e)?;
    ensure!(created, "topic {t} already existed");
    let mut newest: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut last = vec![None::<u64>; 3];
    for round in 0..3 {
        let batch: Vec<ProduceRecord> = (0..50)
            .map(|k| ProduceRecord::new(format!("user{k}"), format!("round{round}")))
            .chain(
                (0..5)
                    .filter(|_| round == 2)
                    .map(|k| ProduceRecord::new(format!("user{}", k * 7), Vec::new())),
            )
            .collect();
        let delivered = bus.produce(&t, batch.clone()).await.map_err(e)?;
        for (r, d) in batch.into_iter().zip(delivered) {
            newest.insert(r.key, r.value);
            let l = &mut last[d.partition as usize];
            *l = Some(l.map_or(d.offset, |o: u64| o.max(d.offset)));
        }
    }
    if let Some(embedded) = h.compact_now() {
        embedded?;
    }
    let mut c = bus
        .consumer(&h.unique("g-compacted"), std::slice::from_ref(&t))
        .await
        .map_err(e)?;
    let deadline = tokio::time::Instant::now() + h.patience();
    let mut seen: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut at = vec![None::<u64>; 3];
    while at != last {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "read up to {at:?}, not to the last offsets {last:?}"
        );
        for r in c.poll(1000, Duration::from_millis(200)).await.map_err(e)? {
            let prev = &mut at[r.partition as usize];
            ensure!(
                prev.is_none_or(|p| r.offset > p),
                "offsets out of order in partition {}",
                r.partition
            );
            *prev = Some(r.offset);
            seen.insert(r.key, r.value);
        }
    }
    ensure!(
        seen == newest,
        "the last record read of each key is not its newest ({} keys differ)",
        newest
            .iter()
            .filter(|(k, v)| seen.get(*k) != Some(v))
            .count()
    );
    c.close().await.map_err(e)
}

async fn errors_are_clear(h: &mut dyn Harness) -> CheckResult {
    let bus = h.bus();
    let missing = h.unique("never-created");
    let err = bus
        .produce(&missing, records("x", 1, 1))
        .await
        .err()
        .ok_or("produce to a missing topic succeeded")?;
    ensure!(
        err.kind() == crate::ErrorKind::NotFound,
        "produce to a missing topic: {err} ({})",
        err.kind()
    );
    let err = bus
        .create_topic("bad topic!", 1)
        .await
        .err()
        .ok_or("a bad topic name was accepted")?;
    ensure!(
        err.to_string().contains("bad topic!"),
        "error does not name the topic: {err}"
    );
    Ok(())
}
