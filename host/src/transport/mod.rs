//! The transport: moving opaque message bodies to and from one broker.
//!
//! One API, two implementations: AMQP over lapin (`amqp`) and the in-process
//! broker (`memory`) behind `memory://`. Above this module nothing knows which
//! one it talks to. The transport knows exchanges, queues, publisher confirms
//! and acknowledgements; it knows nothing of cells or of the oslo envelope.

pub mod amqp;
pub mod memory;
pub mod tls;

use std::pin::Pin;

use anyhow::Result;
use futures::Stream;

use crate::config::{RabbitOptions, TransportUrl};

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Publication {
    /// `""` is the default exchange, which routes by queue name.
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// String headers, e.g. the dead-letter reason.
    pub headers: Vec<(&'static str, String)>,
    /// Per-message TTL, as oslo.messaging sets on calls.
    pub expiration_ms: Option<u64>,
}

impl Publication {
    pub fn new(exchange: impl Into<String>, routing_key: impl Into<String>, body: Vec<u8>) -> Self {
        Publication {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body,
            headers: Vec::new(),
            expiration_ms: None,
        }
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

/// A queue declaration, with the properties oslo.messaging uses so that a
/// Python peer declaring the same name agrees with it.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
}

impl QueueSpec {
    /// A transient, non-auto-delete queue: what an oslo RPC server declares.
    pub fn oslo(name: impl Into<String>) -> Self {
        QueueSpec {
            name: name.into(),
            durable: false,
            auto_delete: false,
        }
    }
}

/// One received message, to be settled once it has been dealt with.
pub struct Inbound {
    pub body: Vec<u8>,
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
    pub fn settle(self, outcome: Outcome) {
        match self.settle {
            Settle::Amqp(s) => s.settle(outcome),
            Settle::Memory(s) => s.settle(self.body, outcome),
        }
    }
}

/// The messages of one or more queues, merged.
pub type Inbox = Pin<Box<dyn Stream<Item = Inbound> + Send>>;

/// A connection to one broker.
#[derive(Clone)]
pub enum Broker {
    Amqp(amqp::AmqpBroker),
    Memory(memory::MemoryBroker),
}

impl Broker {
    /// Connects to the broker at `url`, set up as `options` say; `name`
    /// labels the connection.
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
                amqp::AmqpBroker::connect(&url.amqp_uris_with(options), options, name).await?,
            )),
        }
    }

    pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<()> {
        match self {
            Broker::Amqp(b) => b.declare_exchange(name, kind).await,
            Broker::Memory(b) => {
                b.declare_exchange(name, kind);
                Ok(())
            }
        }
    }

    /// Declares `queue` and binds it to `exchange` with `routing_key`
    /// (no binding for the default exchange).
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
    pub async fn publish(&self, publication: Publication) -> Result<()> {
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
