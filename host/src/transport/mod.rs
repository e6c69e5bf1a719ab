//! The transport: moving opaque message bodies to and from one broker.
//!
//! One API, two implementations: AMQP over lapin (`amqp`) and the in-process
//! broker (`memory`) behind `memory://`. Above this module nothing knows which
//! one it talks to. The transport knows exchanges, queues, publisher confirms
//! and acknowledgements; it knows nothing of cells or of the oslo envelope.

pub mod amqp;
mod confirms;
pub mod memory;
pub mod oslo_declare;
pub mod tls;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;

use crate::config::{RabbitOptions, TransportUrl};

pub use confirms::{Lane, Outgoing, Verdict, STAMP_HEADER};
pub use oslo_declare::{OsloDeclarations, Role};

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Publication {
    /// `""` is the default exchange, which routes by queue name.
    pub exchange: String,
    pub routing_key: String,
    /// Shared, so a publish in flight holds it without a copy.
    pub body: Bytes,
    /// String headers, e.g. the dead-letter reason.
    pub headers: Vec<(&'static str, String)>,
    /// Per-message TTL, as oslo.messaging sets on calls.
    pub expiration_ms: Option<u64>,
    /// Returned by the broker, not dropped, when no queue takes it.
    pub mandatory: bool,
}

impl Publication {
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Bytes>,
    ) -> Self {
        Publication {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: body.into(),
            headers: Vec::new(),
            expiration_ms: None,
            mandatory: false,
        }
    }

    /// Marks it mandatory: a broker with no queue for it returns it, and
    /// the publish fails with [`PublishError::Unroutable`].
    pub fn mandatory(mut self) -> Self {
        self.mandatory = true;
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// Kinds of exchange the host declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Topic,
    Fanout,
}

/// An exchange declaration. Its properties come from [`OsloDeclarations`],
/// so that an oslo.messaging peer declaring the same name agrees with it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    /// Its part in an oslo deployment, to explain a refused declaration.
    pub role: Role,
}

/// A queue declaration, made like an [`ExchangeSpec`].
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    /// `x-queue-type`, `x-expires`, ...; the broker compares them on redeclaration.
    pub arguments: BTreeMap<String, ArgValue>,
    pub role: Role,
}

/// The value of a queue argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgValue {
    Text(String),
    Int(u64),
}

impl ArgValue {
    pub fn text(value: &str) -> ArgValue {
        ArgValue::Text(value.to_string())
    }
}

/// One received message, to be settled once it has been dealt with.
pub struct Inbound {
    pub body: Vec<u8>,
    /// The AMQP `expiration` it was published with, in milliseconds: where
    /// an oslo.messaging client puts its call's timeout.
    pub expiration_ms: Option<u64>,
    /// Its headers with text values (e.g. where a parked relay goes).
    pub headers: Vec<(String, String)>,
    pub redelivered: bool,
    settle: Settle,
}

/// How a settled message leaves the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done: relayed, delivered or dead-lettered.
    Ack,
    /// Could not be handled now; the broker keeps it for another try.
    Requeue,
    /// Refused; the broker drops it (or dead-letters it by its own policy).
    Reject,
}

enum Settle {
    Amqp(amqp::Settler),
    Memory(memory::Settler),
}

impl Inbound {
    /// The text value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Lets go of the body and headers once the message is planned, where
    /// settling does not need them (an AMQP delivery is settled by its tag):
    /// a message in flight then holds one body, its planned publication's,
    /// not two until its confirm.
    pub fn planned(&mut self) {
        if matches!(self.settle, Settle::Amqp(_)) {
            self.body = Vec::new();
            self.headers = Vec::new();
        }
    }

    pub fn settle(self, outcome: Outcome) {
        match self.settle {
            Settle::Amqp(s) => s.settle(outcome),
            Settle::Memory(s) => s.settle(self.body, self.expiration_ms, self.headers, outcome),
        }
    }
}

/// The messages of one or more queues, merged.
pub type Inbox = Pin<Box<dyn Stream<Item = Inbound> + Send>>;

/// Why a publication was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A mandatory publication no queue takes: it is not a delivery.
    #[error("the broker of {broker} has no queue for {routing_key:?} on exchange {exchange:?} ({reason})")]
    Unroutable {
        broker: String,
        exchange: String,
        routing_key: String,
        reason: String,
    },
    /// The broker refused it (a nack).
    #[error("the broker of {broker} refused the message for {routing_key:?} (nack)")]
    Refused { broker: String, routing_key: String },
    /// The link is down, stalled, or failed under it.
    #[error("{0}")]
    Unavailable(String),
}

/// Whether a link is up, and what it last saw go wrong.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkState {
    pub up: bool,
    /// How many connections were opened so far.
    pub generation: u64,
    pub last_error: Option<String>,
}

/// How long a publish may wait for its confirm before it counts as failed:
/// a stalled link says nothing at all.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to one broker.
#[derive(Clone)]
pub enum Broker {
    Amqp(amqp::AmqpBroker),
    Memory(memory::MemoryBroker),
}

impl Broker {
    /// Connects to the broker at `url`, set up as `options` say; `name`
    /// labels the connection. The first connection must open; after that
    /// the link reconnects by itself whenever it is lost.
    pub async fn connect(
        url: &TransportUrl,
        options: &RabbitOptions,
        name: &str,
    ) -> Result<Broker> {
        match url {
            TransportUrl::Memory { name: broker } => {
                Ok(Broker::Memory(memory::MemoryBroker::named(broker)))
            }
            TransportUrl::Amqp { .. } => Ok(Broker::Amqp(
                amqp::AmqpBroker::connect(
                    &url.amqp_uris_with(options),
                    options,
                    name,
                    PUBLISH_TIMEOUT,
                )
                .await?,
            )),
        }
    }

    /// Like [`Broker::connect`], but returns at once and connects in the
    /// background, for as long as it takes: a neighbour may be down.
    pub fn connect_in_background(
        url: &TransportUrl,
        options: &RabbitOptions,
        name: &str,
    ) -> Result<Broker> {
        match url {
            TransportUrl::Memory { name: broker } => {
                Ok(Broker::Memory(memory::MemoryBroker::named(broker)))
            }
            TransportUrl::Amqp { .. } => Ok(Broker::Amqp(amqp::AmqpBroker::connect_in_background(
                &url.amqp_uris_with(options),
                options,
                name,
                PUBLISH_TIMEOUT,
            )?)),
        }
    }

    /// Up or down, as it changes. An in-process broker is always up.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        match self {
            Broker::Amqp(b) => b.state(),
            Broker::Memory(_) => {
                watch::channel(LinkState {
                    up: true,
                    generation: 1,
                    last_error: None,
                })
                .1
            }
        }
    }

    /// Why the link is down (its last error, maybe empty), or `None` while
    /// it is up. An in-process broker is always up.
    pub fn down_because(&self) -> Option<String> {
        match self {
            Broker::Amqp(b) => b.down_because(),
            Broker::Memory(_) => None,
        }
    }

    /// How long a publish may wait for its confirm before it counts as
    /// failed.
    pub fn publish_timeout(&self) -> Duration {
        match self {
            Broker::Amqp(b) => b.publish_timeout(),
            Broker::Memory(_) => PUBLISH_TIMEOUT,
        }
    }

    /// Waits until the link is up.
    pub async fn until_up(&self) {
        let mut state = self.state();
        let _ = state.wait_for(|s| s.up).await;
    }

    /// Waits until the link is up or its first attempt to connect failed:
    /// a link opened in the background has then had its chance.
    pub async fn first_attempt(&self) {
        let mut state = self.state();
        let _ = state.wait_for(|s| s.up || s.last_error.is_some()).await;
    }

    /// The `[oslo_messaging_rabbit]` options this broker was connected with;
    /// the memory broker has oslo's defaults (it ignores them anyway).
    pub fn options(&self) -> &RabbitOptions {
        static DEFAULTS: OnceLock<RabbitOptions> = OnceLock::new();
        match self {
            Broker::Amqp(b) => b.options(),
            Broker::Memory(_) => DEFAULTS.get_or_init(RabbitOptions::default),
        }
    }

    /// What oslo.messaging declares on this broker, under its options: every
    /// declaration made on a broker takes its properties from here.
    pub fn oslo(&self) -> OsloDeclarations<'_> {
        OsloDeclarations::new(self.options())
    }

    /// Declares `exchange`; a refusal (it exists with other properties) is an
    /// error naming the exchange, the broker and the option likely to differ.
    pub async fn declare_exchange(&self, exchange: &ExchangeSpec) -> Result<()> {
        match self {
            Broker::Amqp(b) => b.declare_exchange(exchange).await,
            Broker::Memory(b) => {
                b.declare_exchange(&exchange.name, exchange.kind);
                Ok(())
            }
        }
    }

    /// Declares `queue` and binds it to `exchange` with `routing_key`
    /// (no binding for the default exchange). A refusal is explained as for
    /// [`Broker::declare_exchange`]; the memory broker ignores the properties.
    pub async fn declare_queue(
        &self,
        queue: &QueueSpec,
        exchange: &str,
        routing_key: &str,
    ) -> Result<()> {
        match self {
            Broker::Amqp(b) => b.declare_queue(queue, exchange, routing_key).await,
            Broker::Memory(b) => {
                b.declare_queue(&queue.name, exchange, routing_key);
                Ok(())
            }
        }
    }

    /// Consumes `queues` on one channel, at most `prefetch` unsettled per queue.
    pub async fn consume(&self, queues: &[String], prefetch: u16, tag: &str) -> Result<Inbox> {
        match self {
            Broker::Amqp(b) => b.consume(queues, prefetch, tag).await,
            Broker::Memory(b) => b.consume(queues),
        }
    }

    /// Publishes and waits until the broker has taken responsibility for the
    /// message (a publisher confirm on AMQP). Callers run many of these at once.
    pub async fn publish(&self, publication: &Publication) -> Result<(), PublishError> {
        match self {
            Broker::Amqp(b) => b.publish(publication).await,
            Broker::Memory(b) => b.publish(publication),
        }
    }

    /// Closes the connection after the in-flight work is settled.
    pub async fn close(&self) {
        if let Broker::Amqp(b) = self {
            b.close().await;
        }
    }
}
