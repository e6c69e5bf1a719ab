//! The AMQP transport over lapin: one connection per broker, a publisher
//! channel in confirm mode, and consumer channels whose acknowledgements are
//! batched.
//!
//! Publishing is pipelined: many publishes share the confirm channel and each
//! caller awaits only its own confirm. Acknowledgements go through one task per
//! consumer channel that acks the longest settled prefix of delivery tags with
//! `multiple = true`, so a burst of settlements costs one frame.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::AMQPUriTcpExt;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::{mpsc, Mutex};

use crate::config::RabbitOptions;

use super::tls::TlsSetup;
use super::{ExchangeKind, Inbound, Inbox, Outcome, Publication, QueueSpec, Settle};

/// A connection to one RabbitMQ virtual host.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    /// The confirm-mode channel all publishes share; replaced if it closes.
    publisher: ArcSwap<Channel>,
    reopen: Mutex<()>,
    label: String,
    /// oslo.messaging's options for this broker: how to declare, TLS.
    options: RabbitOptions,
}

impl AmqpBroker {
    /// Tries each URI in turn (oslo.messaging's failover list) and keeps the
    /// first connection that opens. `amqps://` URIs are opened over TLS,
    /// verified as `options` say (see `tls`).
    pub async fn connect(
        uris: &[String],
        options: &RabbitOptions,
        label: &str,
    ) -> Result<AmqpBroker> {
        let mut last_error = None;
        // Read the TLS files once, before dialling: a wrong path is a config
        // error, not a reason to try the next host.
        let tls = if uris.iter().any(|uri| uri.starts_with("amqps://")) {
            Some(TlsSetup::from_options(options, label)?)
        } else {
            None
        };
        for uri in uris {
            let parsed: AMQPUri = uri.parse().map_err(|e| {
                anyhow::anyhow!("the broker of {label}: an AMQP URI lapin cannot read: {e}")
            })?;
            let (host, port) = (parsed.authority.host.clone(), parsed.authority.port);
            let address = format!("{host}:{port}");
            let properties = ConnectionProperties::default()
                .with_connection_name(LongString::from(format!("cellhost {label}")));
            let opened = if let (AMQPScheme::AMQPS, Some(setup)) = (&parsed.scheme, &tls) {
                connect_tls(parsed, properties, setup)
                    .await
                    .map_err(|e| setup.explain(e, label, &host, port))
            } else {
                Connection::connect_uri(parsed, properties)
                    .await
                    .map_err(|e| {
                        anyhow::Error::new(e).context(format!(
                            "AMQP connection to the broker of {label} at {address} failed"
                        ))
                    })
            };
            match opened {
                Ok(connection) => {
                    let publisher = open_confirm_channel(&connection).await?;
                    return Ok(AmqpBroker {
                        inner: Arc::new(Inner {
                            connection,
                            publisher: ArcSwap::from_pointee(publisher),
                            reopen: Mutex::new(()),
                            label: label.to_string(),
                            options: options.clone(),
                        }),
                    });
                }
                Err(e) => {
                    tracing::warn!(broker = label, error = %format!("{e:#}"), "AMQP connection failed, trying the next host");
                    last_error = Some(e);
                }
            }
        }
        match last_error {
            Some(e) => Err(e.context(format!("cannot connect to the broker of {label}"))),
            None => bail!("no AMQP host configured for {label}"),
        }
    }

    pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<()> {
        let channel = self.inner.connection.create_channel().await?;
        let (kind, options) = match kind {
            // oslo.messaging: the control exchange is transient and kept.
            ExchangeKind::Topic => (
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
            ),
            // oslo.messaging: fanout exchanges vanish with their last queue.
            ExchangeKind::Fanout => (
                lapin::ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
            ),
        };
        channel
            .exchange_declare(name.into(), kind, options, FieldTable::default())
            .await
            .with_context(|| format!("declaring exchange {name:?} on {}", self.inner.label))?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    pub async fn declare_queue(
        &self,
        queue: &QueueSpec,
        exchange: &str,
        routing_key: &str,
    ) -> Result<()> {
        let channel = self.inner.connection.create_channel().await?;
        let options = QueueDeclareOptions {
            durable: queue.durable,
            auto_delete: queue.auto_delete,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.name.as_str().into(), options, FieldTable::default())
            .await
            .with_context(|| format!("declaring queue {:?} on {}", queue.name, self.inner.label))?;
        if !exchange.is_empty() {
            channel
                .queue_bind(
                    queue.name.as_str().into(),
                    exchange.into(),
                    routing_key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("binding queue {:?} to {exchange:?}", queue.name))?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    pub async fn consume(&self, queues: &[String], prefetch: u16, tag: &str) -> Result<Inbox> {
        let channel = self.inner.connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        tokio::spawn(acknowledge(channel.clone(), settle_rx));
        let mut streams = Vec::new();
        for queue in queues {
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    ShortString::from(format!("{tag}:{queue}")),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("consuming queue {queue:?} on {}", self.inner.label))?;
            let settle_tx = settle_tx.clone();
            let queue = queue.clone();
            streams.push(Box::pin(consumer.filter_map(move |delivery| {
                let settle_tx = settle_tx.clone();
                let queue = queue.clone();
                async move {
                    match delivery {
                        Ok(d) => Some(Inbound {
                            body: d.data,
                            redelivered: d.redelivered,
                            settle: Settle::Amqp(Settler {
                                tag: d.delivery_tag,
                                tx: settle_tx,
                            }),
                        }),
                        Err(e) => {
                            tracing::error!(queue = %queue, error = %e, "consumer stopped");
                            None
                        }
                    }
                }
            })));
        }
        Ok(Box::pin(futures::stream::select_all(streams)))
    }

    pub async fn publish(&self, p: Publication) -> Result<()> {
        let mut headers = FieldTable::default();
        for (name, value) in &p.headers {
            headers.insert((*name).into(), AMQPValue::LongString(value.as_str().into()));
        }
        // What oslo.messaging sets; content_type is what makes a Python peer
        // decode the body as JSON rather than skip it.
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(2)
            .with_priority(0)
            .with_headers(headers);
        if let Some(ms) = p.expiration_ms {
            properties = properties.with_expiration(ms.to_string().into());
        }
        let channel = self.publisher().await?;
        let confirm = channel
            .basic_publish(
                p.exchange.as_str().into(),
                p.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &p.body,
                properties,
            )
            .await
            .with_context(|| format!("publishing to {} on {}", p.routing_key, self.inner.label))?;
        match confirm.await? {
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
            Confirmation::Nack(_) => bail!(
                "the broker of {} refused the message for {} (nack)",
                self.inner.label,
                p.routing_key
            ),
        }
    }

    /// The shared confirm channel, reopened if the broker closed it (a failed
    /// declaration or publish closes a channel, not the connection).
    async fn publisher(&self) -> Result<Arc<Channel>> {
        let current = self.inner.publisher.load_full();
        if current.status().connected() {
            return Ok(current);
        }
        let _guard = self.inner.reopen.lock().await;
        let current = self.inner.publisher.load_full();
        if current.status().connected() {
            return Ok(current);
        }
        tracing::warn!(broker = %self.inner.label, "publisher channel closed, reopening it");
        let fresh = Arc::new(open_confirm_channel(&self.inner.connection).await?);
        self.inner.publisher.store(fresh.clone());
        Ok(fresh)
    }

    pub async fn close(&self) {
        let _ = self
            .inner
            .connection
            .close(200, "cellhost shutting down".into())
            .await;
    }
}

/// Opens `uri` over TLS with our own connector rather than lapin's built-in
/// one, whose trust store always includes the system's CAs: with
/// `ssl_ca_file` set, only that CA may vouch for the broker.
async fn connect_tls(
    uri: AMQPUri,
    properties: ConnectionProperties,
    tls: &TlsSetup,
) -> lapin::Result<Connection> {
    let connector = tls.connector();
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connector(
        uri,
        runtime,
        // lapin calls this to open the socket, and again if it ever reconnects.
        async move |uri: AMQPUri, runtime| {
            let mut plain = uri.clone();
            plain.scheme = AMQPScheme::AMQP;
            let stream = plain.connect_async(&runtime).await?;
            Ok(stream.into_rustls(&connector, &uri.authority.host).await?)
        },
        properties,
    )
    .await
}

async fn open_confirm_channel(connection: &Connection) -> Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Settles one delivery through its channel's acknowledging task.
pub(super) struct Settler {
    tag: u64,
    tx: mpsc::UnboundedSender<(u64, Outcome)>,
}

impl Settler {
    pub(super) fn settle(self, outcome: Outcome) {
        // The task is gone only when the channel is; the broker then
        // redelivers the message, which is what at-least-once wants.
        let _ = self.tx.send((self.tag, outcome));
    }
}

/// Acknowledges settled deliveries in batches: everything settled while the
/// previous frame was being sent goes out as one `multiple` ack.
async fn acknowledge(channel: Channel, mut settled: mpsc::UnboundedReceiver<(u64, Outcome)>) {
    let mut tracker = AckTracker::default();
    while let Some(first) = settled.recv().await {
        let mut next = Some(first);
        while let Some((tag, outcome)) = next {
            if outcome != Outcome::Ack {
                let requeue = outcome == Outcome::Requeue;
                if let Err(e) = channel
                    .basic_nack(
                        tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue,
                        },
                    )
                    .await
                {
                    tracing::warn!(error = %e, "nack failed; the broker will redeliver");
                    return;
                }
            }
            tracker.settled(tag, outcome == Outcome::Ack);
            next = settled.try_recv().ok();
        }
        if let Some(upto) = tracker.take_ackable() {
            if let Err(e) = channel
                .basic_ack(upto, BasicAckOptions { multiple: true })
                .await
            {
                tracing::warn!(error = %e, "ack failed; the broker will redeliver");
                return;
            }
        }
    }
}

/// Tracks which delivery tags are settled and how far the settled prefix
/// reaches, since a `multiple` ack may only cover a gapless prefix. Its top
/// must also be a tag still outstanding at the broker, so a nacked tag is
/// never the top of a batch.
#[derive(Default)]
struct AckTracker {
    /// Every tag up to this one is settled.
    prefix: u64,
    /// The highest tag within the prefix that was settled with an ack.
    top_ack: u64,
    /// The tag last acknowledged to the broker.
    acked: u64,
    /// Settled tags beyond a gap, and whether each was an ack.
    ahead: BTreeMap<u64, bool>,
}

impl AckTracker {
    fn settled(&mut self, tag: u64, ack: bool) {
        if tag != self.prefix + 1 {
            if tag > self.prefix {
                self.ahead.insert(tag, ack);
            }
            return;
        }
        self.advance(tag, ack);
        while let Some(ack) = self.ahead.remove(&(self.prefix + 1)) {
            self.advance(self.prefix + 1, ack);
        }
    }

    fn advance(&mut self, tag: u64, ack: bool) {
        self.prefix = tag;
        if ack {
            self.top_ack = tag;
        }
    }

    /// The tag to ack with `multiple`, if acks were settled since the last one.
    fn take_ackable(&mut self) -> Option<u64> {
        (self.top_ack > self.acked).then(|| {
            self.acked = self.top_ack;
            self.top_ack
        })
    }
}

#[cfg(test)]
mod tests {
    use super::AckTracker;

    #[test]
    fn ack_covers_only_the_gapless_prefix() {
        let mut t = AckTracker::default();
        t.settled(2, true);
        t.settled(3, true);
        assert_eq!(t.take_ackable(), None, "tag 1 is still in flight");
        t.settled(1, true);
        assert_eq!(t.take_ackable(), Some(3));
        assert_eq!(t.take_ackable(), None);
        t.settled(5, true);
        t.settled(4, true);
        assert_eq!(t.take_ackable(), Some(5));
    }

    #[test]
    fn a_nacked_tag_is_never_the_top_of_a_batch() {
        let mut t = AckTracker::default();
        t.settled(1, true);
        t.settled(2, false);
        assert_eq!(t.take_ackable(), Some(1));
        t.settled(3, false);
        assert_eq!(t.take_ackable(), None);
        t.settled(4, true);
        assert_eq!(t.take_ackable(), Some(4));
    }
}
