//! A stream of cells messages through a relay, for the tests that break
//! something on the way (faults, cluster failover): the messages as an
//! application casts them, a sender that publishes them all with confirms,
//! and the application at the far end that counts the cells uuid of every
//! delivery, so a test can say what was delivered, duplicated and lost.
//!
//! Both ends talk to RabbitMQ with lapin directly, never through the host's
//! own transport, which is what is under test.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cellhost::client::{entry_cast, Outgoing};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tokio::sync::watch;

/// The control exchange and queue base of the cells these tests build.
pub const EXCHANGE: &str = "nova";
pub const QUEUE_BASE: &str = "cells.intercell";

/// Publishes whose confirms a sender awaits together.
const PUBLISH_BATCH: usize = 500;

/// `count` messages as an application casts them into a cell, each made by
/// `make` and tagged with a `request_id` of `tag`: their uuids and oslo bodies.
pub fn messages(
    count: usize,
    tag: &str,
    make: impl Fn(usize) -> Outgoing,
) -> (Vec<String>, Vec<Vec<u8>>) {
    (0..count)
        .map(|i| {
            let mut outgoing = make(i);
            outgoing.ctxt.insert(
                "request_id".into(),
                serde_json::Value::String(format!("req-{tag}-{i}")),
            );
            let message = outgoing.to_message();
            (
                message.uuid.clone(),
                entry_cast(EXCHANGE, QUEUE_BASE, &message).body.into(),
            )
        })
        .unzip()
}

/// Casts `bodies` into `cells.intercell.<kind>` through `uri`, many
/// publishes in flight, each confirmed.
pub async fn publish_all(uri: String, kind: &str, bodies: Vec<Vec<u8>>) -> Result<()> {
    let connection = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .with_context(|| format!("the sender connecting to {uri}"))?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let routing_key = format!("{QUEUE_BASE}.{kind}");
    // What an oslo.messaging client sets.
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2);
    for batch in bodies.chunks(PUBLISH_BATCH) {
        let sends = batch.iter().map(|body| {
            channel.basic_publish(
                EXCHANGE.into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties.clone(),
            )
        });
        let confirms = futures::future::try_join_all(sends).await?;
        for confirmation in futures::future::try_join_all(confirms).await? {
            ensure!(
                matches!(confirmation, Confirmation::Ack(_)),
                "the broker did not take a message for {routing_key} through {uri}: {confirmation:?}"
            );
        }
    }
    let _ = connection.close(200, "sent".into()).await;
    Ok(())
}

/// Names a delivery by its cells uuid, or says what is wrong with it.
pub type UuidOf = fn(&lapin::message::Delivery) -> std::result::Result<String, String>;

/// A local delivery: an oslo request whose context carries the cells uuid.
pub fn local_delivery_uuid(
    delivery: &lapin::message::Delivery,
) -> std::result::Result<String, String> {
    let request = cellhost::wire::decode_request(&delivery.data, usize::MAX)
        .map_err(|e| format!("undecodable local delivery: {e}"))?;
    request
        .context
        .0
        .get("cell_message_uuid")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| "a local delivery without cell_message_uuid".to_string())
}

/// What an application saw: each cells uuid, how often, and when first.
#[derive(Default)]
struct Seen {
    first: HashMap<String, (u32, Instant)>,
    /// What was wrong with deliveries that were not as expected.
    wrong: Vec<String>,
}

/// A cell's application: consumes a queue of the cell's broker and records
/// the cells uuid of each delivery.
pub struct App {
    connection: Connection,
    seen: Arc<Mutex<Seen>>,
    /// Distinct uuids seen so far.
    distinct: watch::Receiver<usize>,
}

/// What became of the messages a test sent, as the application saw them.
#[derive(Default)]
pub struct Tally {
    pub delivered: usize,
    pub duplicated: usize,
    pub lost: usize,
    /// Uuids the test never sent.
    pub strangers: usize,
    pub wrong: Vec<String>,
    /// When each delivered message first arrived.
    pub firsts: Vec<Instant>,
}

impl App {
    /// The application behind the cell whose broker `uri` reaches: it
    /// consumes `cells.local`.
    pub async fn start(uri: &str) -> Result<App> {
        App::consume(uri, "cells.local", local_delivery_uuid).await
    }

    /// Records what arrives on `queue` through `uri`, each delivery named by
    /// `uuid_of` (an error says what is wrong with a delivery, and fails the
    /// test at the end).
    pub async fn consume(uri: &str, queue: &str, uuid_of: UuidOf) -> Result<App> {
        let connection = Connection::connect(uri, ConnectionProperties::default())
            .await
            .with_context(|| format!("the application connecting to {uri}"))?;
        let channel = connection.create_channel().await?;
        // Declared by the host already; consumed as an oslo server would,
        // with automatic acks: the application is not what is tested.
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "stream-test-app".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming {queue} through {uri}"))?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (tx, distinct) = watch::channel(0usize);
        let record = seen.clone();
        tokio::spawn(async move {
            while let Some(delivery) = consumer.next().await {
                let Ok(delivery) = delivery else { return };
                let mut seen = lock(&record);
                match uuid_of(&delivery) {
                    Ok(uuid) => {
                        let entry = seen.first.entry(uuid).or_insert((0, Instant::now()));
                        entry.0 += 1;
                    }
                    Err(wrong) => seen.wrong.push(wrong),
                }
                let count = seen.first.len();
                drop(seen);
                tx.send_replace(count);
            }
        });
        Ok(App {
            connection,
            seen,
            distinct,
        })
    }

    /// Distinct uuids delivered so far.
    pub fn delivered_now(&self) -> usize {
        *self.distinct.borrow()
    }

    /// Waits until at least `n` distinct uuids were delivered.
    pub async fn wait_distinct(&self, n: usize, patience: Duration) -> Result<()> {
        let mut distinct = self.distinct.clone();
        let waited = tokio::time::timeout(patience, async {
            distinct.wait_for(|d| *d >= n).await.map(|_| ())
        })
        .await;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => bail!("the application's consumer ended"),
            Err(_) => bail!(
                "{} of {n} messages delivered within {patience:?}",
                self.delivered_now()
            ),
        }
    }

    /// Delivered, duplicated, lost, and the first delivery of each uuid.
    pub fn tally(&self, sent: &[String]) -> Tally {
        let seen = lock(&self.seen);
        let mut tally = Tally::default();
        for uuid in sent {
            match seen.first.get(uuid) {
                Some((count, at)) => {
                    tally.delivered += 1;
                    tally.duplicated += (*count - 1) as usize;
                    tally.firsts.push(*at);
                }
                None => tally.lost += 1,
            }
        }
        let sent: HashSet<&String> = sent.iter().collect();
        tally.strangers = seen.first.keys().filter(|u| !sent.contains(u)).count();
        tally.wrong = seen.wrong.clone();
        tally
    }

    pub async fn stop(self) {
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
