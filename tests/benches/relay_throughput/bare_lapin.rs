//! The bare relay the bench holds cellhost against: lapin alone, no policy,
//! no JSON, no cellhost code. It moves each body unchanged from one queue to
//! an exchange on another broker, with cellhost's guarantee: a source
//! delivery is acked only after the destination confirmed its copy.
//!
//! It is written to be fast, as one would write a relay that only forwards:
//! one task consumes and publishes; publishes are pipelined (the next goes
//! out before the previous is confirmed, up to the prefetch window); and
//! confirmed deliveries are acked together, one `multiple` ack for each run
//! of confirms that arrived at once, always over a gapless prefix of the
//! deliveries (the confirms are taken in publication order).
//!
//! With `mandatory`, it also publishes as cellhost does: mandatory, with the
//! publish's number in the `x-cellhost-publish` header (the stamp a return
//! is matched by). Only then does it keep cellhost's whole guarantee: without
//! `mandatory`, a message no queue takes is confirmed and dropped.
//!
//! Given a planner (a cellhost [`RouteWorker`]), it asks cellhost's router
//! for each delivery's plan (decoding, the policy's decision, the duplicate
//! claim, the relay body) and publishes the body the plan relays instead of
//! the one received, settling the claim once confirmed: cellhost's work per
//! message, carried by this relay's loop. Between it and cellhost, only the
//! way the host carries out its plans differs.
//!
//! Given a policy call instead ([`PolicyCall`]), it asks the policy about one
//! message, decoded once before the run, for each delivery, and forwards the
//! body unchanged: the cost of the policy interface alone (lowering the
//! message and the cell into the guest, its decision, lifting the actions),
//! with no decoding and no encoding.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use cellhost::policy::{Action, Cell, Message, PolicyInstance};
use cellhost::router::{Claim, RouteWorker};
use futures::future::{self, Either, Ready};
use futures::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Where the relay publishes: the exchange and routing key cellhost's router
/// picks for the same message.
#[derive(Debug, Clone)]
pub struct Destination {
    pub exchange: String,
    pub routing_key: String,
}

/// What the relay does with each delivery before publishing it.
pub enum Work {
    /// Nothing: the body is forwarded as received.
    Forward,
    /// Cellhost's router plans it; the relay publishes the planned body.
    Plan(RouteWorker),
    /// The policy is asked about one fixed message; the body is forwarded.
    Ask(PolicyCall),
}

impl Work {
    /// Whether the relay publishes what cellhost's router wrote.
    pub fn rewrites(&self) -> bool {
        matches!(self, Work::Plan(_))
    }
}

/// A policy's `route`, called with the same message and cell every time.
pub struct PolicyCall {
    pub instance: PolicyInstance,
    pub message: Message,
    pub cell: Cell,
}

impl PolicyCall {
    /// Asks the policy, and checks that it relays the message once, as the
    /// nova-cells policy does every message of the bench.
    fn ask(&mut self) -> Result<()> {
        match self.instance.route(&self.message, &self.cell) {
            Ok(actions) if matches!(actions.as_slice(), [Action::Relay(_)]) => Ok(()),
            Ok(actions) => bail!("the policy decided {actions:?}, not one relay"),
            Err(e) => bail!("the policy failed: {e}"),
        }
    }
}

/// A running bare relay.
pub struct BareRelay {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<Relayed>>,
    source: Connection,
    destination: Connection,
}

impl BareRelay {
    /// Connects to both brokers and starts relaying `queue` from `source_uri`
    /// to `to` on `destination_uri`, with `prefetch` deliveries in flight,
    /// publishing `mandatory` or not, doing `work` for each delivery.
    pub async fn start(
        source_uri: &str,
        queue: &str,
        destination_uri: &str,
        to: Destination,
        prefetch: u16,
        mandatory: bool,
        work: Work,
    ) -> Result<BareRelay> {
        let (source, destination) =
            tokio::try_join!(connect(source_uri), connect(destination_uri))?;
        let publisher = destination.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consuming = source.create_channel().await?;
        consuming
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = consuming
            .basic_consume(
                queue.into(),
                "bare-lapin-relay".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming {queue}"))?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(relay(
            consumer, consuming, publisher, to, mandatory, work, stopped,
        ));
        Ok(BareRelay {
            stop,
            task,
            source,
            destination,
        })
    }

    /// Stops relaying and closes both connections; returns what was
    /// relayed and acked.
    pub async fn stop(self) -> Result<Relayed> {
        // The task may have ended on an error already; its result says so.
        let _ = self.stop.send(());
        let relayed = self.task.await.context("the bare relay's task failed")?;
        let _ = self.source.close(200, "done".into()).await;
        let _ = self.destination.close(200, "done".into()).await;
        relayed
    }
}

/// What a bare relay did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Relayed {
    /// Messages confirmed by the destination and acked on the source.
    pub messages: u64,
    /// `basic.ack` frames that acked them.
    pub acks: u64,
    /// Wall time spent in the work, plans or policy calls, all messages
    /// together.
    pub planning: std::time::Duration,
}

async fn connect(uri: &str) -> Result<Connection> {
    Connection::connect(uri, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {uri}"))
}

/// The relay's one task: takes deliveries, publishes them, acks the source
/// as the confirms come back.
async fn relay(
    mut consumer: Consumer,
    source: Channel,
    publisher: Channel,
    to: Destination,
    mandatory: bool,
    mut work: Work,
    mut stop: oneshot::Receiver<()>,
) -> Result<Relayed> {
    let exchange = ShortString::from(to.exchange);
    let routing_key = ShortString::from(to.routing_key);
    // What cellhost's publisher sets on every relayed message.
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_headers(FieldTable::default());
    // Publications in delivery order; each yields its source delivery tag
    // once the destination confirmed it.
    let mut unconfirmed = FuturesOrdered::new();
    let mut acks = FuturesUnordered::new();
    let mut relayed = Relayed::default();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            Some(confirmed) = unconfirmed.next(), if !unconfirmed.is_empty() => {
                let mut upto = confirmed?;
                relayed.messages += 1;
                // The broker confirms in bursts (with `multiple`): take every
                // confirm already in, and ack them all with one frame.
                while let Poll::Ready(Some(confirmed)) = futures::poll!(unconfirmed.next()) {
                    upto = confirmed?;
                    relayed.messages += 1;
                }
                let ack = source.basic_ack(upto, BasicAckOptions { multiple: true });
                acks.push(begun(ack).await);
                relayed.acks += 1;
            }
            Some(acked) = acks.next(), if !acks.is_empty() => {
                acked.context("acking the source")?;
            }
            delivery = consumer.next() => {
                let Some(delivery) = delivery else {
                    bail!("the source queue's consumer was cancelled");
                };
                let delivery = delivery.context("consuming the source queue")?;
                let mut properties = properties.clone();
                if mandatory {
                    let mut stamp = FieldTable::default();
                    stamp.insert(
                        cellhost::transport::STAMP_HEADER.into(),
                        AMQPValue::LongLongInt(i64::try_from(delivery.delivery_tag)?),
                    );
                    properties = properties.with_headers(stamp);
                }
                let (body, claim) = match &mut work {
                    Work::Plan(worker) => {
                        let started = std::time::Instant::now();
                        let mut plan = worker.plan(&delivery.data, None);
                        relayed.planning += started.elapsed();
                        // Every message of the bench is one relay to leaf.
                        let Some((_, publication)) = plan.sends.pop() else {
                            bail!("the router planned no relay: {:?}", plan.disposition);
                        };
                        (publication.body, plan.claim.take())
                    }
                    Work::Ask(call) => {
                        let started = std::time::Instant::now();
                        call.ask()?;
                        relayed.planning += started.elapsed();
                        (Bytes::from(delivery.data), None)
                    }
                    Work::Forward => (Bytes::from(delivery.data), None),
                };
                let carried = Carried { body, claim, tag: delivery.delivery_tag };
                let publish = publish_confirmed(
                    &publisher,
                    exchange.clone(),
                    routing_key.clone(),
                    carried,
                    properties,
                    BasicPublishOptions { mandatory, ..BasicPublishOptions::default() },
                );
                unconfirmed.push_back(begun(publish).await);
            }
        }
    }
    Ok(relayed)
}

/// One delivery on its way: the body to publish, the plan's claim on its
/// uuid (with a planner), and its delivery tag on the source.
struct Carried {
    body: Bytes,
    claim: Option<Claim>,
    tag: u64,
}

/// Publishes the carried body and waits for the destination's confirm;
/// settles the claim, if any, and yields the source delivery tag to ack.
async fn publish_confirmed(
    publisher: &Channel,
    exchange: ShortString,
    routing_key: ShortString,
    carried: Carried,
    properties: BasicProperties,
    options: BasicPublishOptions,
) -> Result<u64> {
    let Carried { body, claim, tag } = carried;
    let confirm = publisher
        .basic_publish(exchange, routing_key, options, &body, properties)
        .await
        .context("publishing to the destination")?;
    match confirm
        .await
        .context("awaiting the destination's confirm")?
    {
        Confirmation::Ack(_) => {
            if let Some(claim) = claim {
                claim.settled();
            }
            Ok(tag)
        }
        other => bail!("the destination did not take a message: {other:?}"),
    }
}

/// Polls `work` once before handing it on. lapin queues a method's frames on
/// the first poll of its future, not when the future is made, so this puts
/// them on the wire now and in the order the relay begins them: publishes in
/// delivery order, and a `multiple` ack never behind a smaller one.
async fn begun<F: Future>(work: F) -> Either<Ready<F::Output>, Pin<Box<F>>> {
    let mut work = Box::pin(work);
    match futures::poll!(work.as_mut()) {
        Poll::Ready(output) => Either::Left(future::ready(output)),
        Poll::Pending => Either::Right(work),
    }
}
