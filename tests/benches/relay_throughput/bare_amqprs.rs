//! A second bare relay, written with another maintained Rust AMQP client
//! (amqprs), to tell whether lapin is what bounds the bare lapin relay: the
//! same work and the same guarantee as `bare_lapin.rs` in its mandatory
//! variant, nothing of cellhost.
//!
//! Each body goes unchanged from the source queue to the destination's
//! exchange, published mandatory and stamped with its number in the
//! `x-cellhost-publish` header as cellhost publishes. The destination's
//! confirms come to the channel's callback, which hands them to the relay's
//! one task; that task acks the source with one `multiple` ack over the
//! gapless prefix of confirmed publications each time confirms arrive. A
//! returned or nacked publication ends the relay with an error: the bench
//! never sends one that no queue takes.
//!
//! Given a planner, it publishes the body cellhost's router plans for each
//! delivery, as the bare lapin relay does with one: what cellhost's work per
//! message would cost carried by this client.
//!
//! amqprs runs on the tokio runtime (a reader and a writer task per
//! connection, a dispatcher task per channel), where lapin runs an I/O
//! thread per connection: its whole cost shows as the workers'.

use std::collections::VecDeque;

use amqprs::callbacks::{ChannelCallback, DefaultChannelCallback, DefaultConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, ConsumerMessage,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use cellhost::router::{Claim, RouteWorker};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::bare_lapin::{Destination, Relayed};

/// What amqprs's callbacks answer with.
type CallbackResult<T> = std::result::Result<T, amqprs::error::Error>;

/// What the destination said of a publication, as the callback hands it on.
enum Confirm {
    Ack { tag: u64, multiple: bool },
    Refused(String),
}

/// The destination channel's callback: forwards confirms to the relay.
struct Confirms(mpsc::UnboundedSender<Confirm>);

#[async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, close: CloseChannel) -> CallbackResult<()> {
        let _ = self
            .0
            .send(Confirm::Refused(format!("channel closed: {close}")));
        Ok(())
    }

    async fn cancel(&mut self, _: &Channel, _: Cancel) -> CallbackResult<()> {
        Ok(())
    }

    async fn flow(&mut self, _: &Channel, active: bool) -> CallbackResult<bool> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send(Confirm::Ack {
            tag: ack.delivery_tag(),
            multiple: ack.mutiple(),
        });
    }

    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        let _ = self.0.send(Confirm::Refused(format!(
            "publication {} nacked",
            nack.delivery_tag()
        )));
    }

    async fn publish_return(&mut self, _: &Channel, ret: Return, _: BasicProperties, _: Vec<u8>) {
        let _ = self
            .0
            .send(Confirm::Refused(format!("publication returned: {ret}")));
    }
}

/// A running bare amqprs relay.
pub struct BareAmqprsRelay {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<Relayed>>,
    source: Connection,
    destination: Connection,
}

impl BareAmqprsRelay {
    /// Connects to both vhosts on the local broker and starts relaying
    /// `queue` from `source_vhost` to `to` on `destination_vhost`, with
    /// `prefetch` deliveries in flight, each body as received or, with a
    /// `planner`, as cellhost's router plans to relay it.
    pub async fn start(
        source_vhost: &str,
        queue: &str,
        destination_vhost: &str,
        to: Destination,
        prefetch: u16,
        planner: Option<RouteWorker>,
    ) -> Result<BareAmqprsRelay> {
        let (source, destination) =
            tokio::try_join!(connect(source_vhost), connect(destination_vhost))?;
        let (confirms_tx, confirms) = mpsc::unbounded_channel();
        let publisher = destination.open_channel(None).await?;
        publisher.register_callback(Confirms(confirms_tx)).await?;
        publisher
            .confirm_select(ConfirmSelectArguments::default())
            .await?;
        let consuming = source.open_channel(None).await?;
        consuming.register_callback(DefaultChannelCallback).await?;
        consuming
            .basic_qos(BasicQosArguments::new(0, prefetch, false))
            .await?;
        let (_, deliveries) = consuming
            .basic_consume_rx(
                BasicConsumeArguments::new(queue, "bare-amqprs-relay")
                    .manual_ack(true)
                    .finish(),
            )
            .await
            .with_context(|| format!("consuming {queue}"))?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(relay(
            deliveries, consuming, publisher, confirms, to, planner, stopped,
        ));
        Ok(BareAmqprsRelay {
            stop,
            task,
            source,
            destination,
        })
    }

    /// Stops relaying and closes both connections; returns what was relayed
    /// and acked.
    pub async fn stop(self) -> Result<Relayed> {
        // The task may have ended on an error already; its result says so.
        let _ = self.stop.send(());
        let relayed = self
            .task
            .await
            .context("the bare amqprs relay's task failed")?;
        let _ = self.source.close().await;
        let _ = self.destination.close().await;
        relayed
    }
}

async fn connect(vhost: &str) -> Result<Connection> {
    let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest")
        .virtual_host(vhost)
        .finish();
    let connection = Connection::open(&args)
        .await
        .with_context(|| format!("connecting to vhost {vhost}"))?;
    connection
        .register_callback(DefaultConnectionCallback)
        .await?;
    Ok(connection)
}

/// A publication awaiting its confirm.
struct Pending {
    /// Its number on the destination channel (the confirm's tag).
    number: u64,
    /// The delivery it carries, on the source.
    source_tag: u64,
    confirmed: bool,
    /// The plan's claim on its uuid, with a planner.
    claim: Option<Claim>,
}

/// The relay's one task: takes deliveries, publishes them, acks the source
/// as the confirms come back.
async fn relay(
    mut deliveries: mpsc::UnboundedReceiver<ConsumerMessage>,
    source: Channel,
    publisher: Channel,
    mut confirms: mpsc::UnboundedReceiver<Confirm>,
    to: Destination,
    mut planner: Option<RouteWorker>,
    mut stop: oneshot::Receiver<()>,
) -> Result<Relayed> {
    let publish = BasicPublishArguments::new(&to.exchange, &to.routing_key)
        .mandatory(true)
        .finish();
    // What cellhost's publisher sets on every relayed message.
    let properties = BasicProperties::default()
        .with_content_type("application/json")
        .with_content_encoding("utf-8")
        .with_delivery_mode(2)
        .with_priority(0)
        .finish();
    let stamp_header = amqprs::FieldName::try_from(cellhost::transport::STAMP_HEADER)
        .map_err(|e| anyhow::anyhow!("the stamp header's name: {e:?}"))?;
    // In publication order, numbered without gaps from the front.
    let mut unconfirmed: VecDeque<Pending> = VecDeque::new();
    let mut published: u64 = 0;
    let mut relayed = Relayed::default();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            confirm = confirms.recv() => {
                let Some(mut confirm) = confirm else {
                    bail!("the destination channel's callback is gone");
                };
                // Every confirm already in, then one ack for all.
                loop {
                    match confirm {
                        Confirm::Ack { tag, multiple } => {
                            mark_confirmed(&mut unconfirmed, tag, multiple)?;
                        }
                        Confirm::Refused(why) => bail!("the destination refused: {why}"),
                    }
                    match confirms.try_recv() {
                        Ok(next) => confirm = next,
                        Err(_) => break,
                    }
                }
                let mut upto = None;
                while unconfirmed.front().is_some_and(|p| p.confirmed) {
                    let Some(pending) = unconfirmed.pop_front() else { break };
                    if let Some(claim) = pending.claim {
                        claim.settled();
                    }
                    relayed.messages += 1;
                    upto = Some(pending.source_tag);
                }
                if let Some(upto) = upto {
                    source
                        .basic_ack(BasicAckArguments::new(upto, true))
                        .await
                        .context("acking the source")?;
                    relayed.acks += 1;
                }
            }
            delivery = deliveries.recv() => {
                let Some(mut delivery) = delivery else {
                    bail!("the source queue's consumer ended");
                };
                // Deliveries already at hand go out back to back.
                loop {
                    let (Some(deliver), Some(received)) =
                        (delivery.deliver.take(), delivery.content.take())
                    else {
                        bail!("amqprs handed over a delivery without its method or body");
                    };
                    let (body, claim) = match planner.as_mut() {
                        Some(worker) => {
                            let started = std::time::Instant::now();
                            let mut plan = worker.plan(&received, None);
                            relayed.planning += started.elapsed();
                            // Every message of the bench is one relay to leaf.
                            let Some((_, publication)) = plan.sends.pop() else {
                                bail!("the router planned no relay: {:?}", plan.disposition);
                            };
                            (Vec::from(publication.body), plan.claim.take())
                        }
                        None => (received, None),
                    };
                    published += 1;
                    let mut stamp = FieldTable::new();
                    stamp.insert(stamp_header.clone(), FieldValue::l(i64::try_from(published)?));
                    let mut properties = properties.clone();
                    properties.with_headers(stamp);
                    publisher
                        .basic_publish(properties, body, publish.clone())
                        .await
                        .context("publishing to the destination")?;
                    unconfirmed.push_back(Pending {
                        number: published,
                        source_tag: deliver.delivery_tag(),
                        confirmed: false,
                        claim,
                    });
                    match deliveries.try_recv() {
                        Ok(next) => delivery = next,
                        Err(_) => break,
                    }
                }
            }
        }
    }
    Ok(relayed)
}

/// Marks the publications a confirm covers: `tag` alone, or every one up
/// to it with `multiple`. Found by subtraction from the front's number.
fn mark_confirmed(unconfirmed: &mut VecDeque<Pending>, tag: u64, multiple: bool) -> Result<()> {
    let Some(first) = unconfirmed.front().map(|p| p.number) else {
        bail!("a confirm of publication {tag} with none awaiting one");
    };
    // Below the front: covered by an earlier confirm.
    let Some(at) = tag.checked_sub(first) else {
        return Ok(());
    };
    let at = usize::try_from(at)?;
    if at >= unconfirmed.len() {
        bail!("a confirm of publication {tag}, never made");
    }
    let from = if multiple { 0 } else { at };
    for pending in unconfirmed.range_mut(from..=at) {
        pending.confirmed = true;
    }
    Ok(())
}
