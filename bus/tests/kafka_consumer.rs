//! The Kafka consumer's at-least-once pattern against a real broker: an application that stalls
//! longer than `max.poll.interval.ms` does not make the member leave its group (the poll thread
//! keeps polling), and a full buffer pauses the partitions instead of growing without bound.

use std::time::Duration;

use dmp_bus::kafka::KafkaBus;
use dmp_bus::{Bus, ProduceRecord, TopicPartition};

fn connect(max_buffered: usize) -> KafkaBus {
    let broker = std::env::var("DMP_TEST_KAFKA").expect(
        "DMP_TEST_KAFKA is not set: this real-service test needs a broker (run scripts/test.sh)",
    );
    let mut cfg = dmp_core::Config::defaults().kafka;
    cfg.max_buffered_records = max_buffered;
    cfg.consumer
        .insert("session.timeout.ms".into(), "6000".into());
    cfg.consumer
        .insert("max.poll.interval.ms".into(), "7000".into());
    cfg.consumer
        .insert("auto.commit.interval.ms".into(), "200".into());
    KafkaBus::from_url(&format!("kafka://{broker}"), &cfg).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka-protocol broker: run scripts/test.sh"]
async fn given_application_stalls_past_max_poll_interval_then_member_stays_in_group() {
    let bus = connect(1000);
    let run = dmp_core::clock::now_ms();
    let topic = format!("stall-{run}");
    bus.create_topic(&topic, 2).await.unwrap();
    let group = format!("g-stall-{run}");
    let mut c = bus
        .consumer(&group, std::slice::from_ref(&topic))
        .await
        .unwrap();
    bus.produce(
        &topic,
        (0..10)
            .map(|i| ProduceRecord::new(format!("k{i}"), "a"))
            .collect(),
    )
    .await
    .unwrap();
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first records never arrived"
        );
        got += c.poll(100, Duration::from_millis(200)).await.unwrap().len();
    }
    let before = c.assignment();
    assert_eq!(before.len(), 2);
    // A rule that takes far longer than max.poll.interval.ms (7 s): the application does not poll.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        !c.health().max_poll_exceeded,
        "the member exceeded max.poll.interval.ms"
    );
    assert_eq!(
        c.assignment(),
        before,
        "the member lost its partitions while stalled"
    );
    bus.produce(
        &topic,
        (0..10)
            .map(|i| ProduceRecord::new(format!("k{i}"), "b"))
            .collect(),
    )
    .await
    .unwrap();
    let mut after = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while after.len() < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "records after the stall never arrived"
        );
        after.extend(c.poll(100, Duration::from_millis(200)).await.unwrap());
    }
    assert!(
        after.iter().all(|r| r.value == b"b"),
        "records were redelivered: the member rejoined"
    );
    let marks: Vec<(TopicPartition, u64)> = after
        .iter()
        .map(|r| (TopicPartition::new(&topic, r.partition), r.offset + 1))
        .collect();
    c.commit(&marks).await.unwrap();
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka-protocol broker: run scripts/test.sh"]
async fn given_slow_application_when_buffer_fills_then_consumer_pauses_and_loses_nothing() {
    let bus = connect(100);
    let run = dmp_core::clock::now_ms();
    let topic = format!("pause-{run}");
    bus.create_topic(&topic, 1).await.unwrap();
    bus.produce(
        &topic,
        (0..2000)
            .map(|i| ProduceRecord::new("one", format!("{i}")))
            .collect(),
    )
    .await
    .unwrap();
    let mut c = bus
        .consumer(&format!("g-pause-{run}"), std::slice::from_ref(&topic))
        .await
        .unwrap();
    let mut saw_pause = false;
    let mut values = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while values.len() < 2000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "read {} of 2000",
            values.len()
        );
        saw_pause |= c.health().paused;
        for r in c.poll(50, Duration::from_millis(200)).await.unwrap() {
            values.push(String::from_utf8(r.value).unwrap().parse::<u32>().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // a slow application
        saw_pause |= c.health().paused;
    }
    assert!(
        saw_pause,
        "the consumer never paused with a 100-record buffer"
    );
    assert_eq!(
        values,
        (0..2000).collect::<Vec<_>>(),
        "records lost, doubled or reordered"
    );
    c.close().await.unwrap();
}
