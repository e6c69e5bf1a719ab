//! The AMQP transport over lapin: one self-healing link per broker, a
//! publisher channel in confirm mode, and consumer channels whose
//! acknowledgements are batched.
//!
//! A link keeps itself connected: a supervisor task opens the connection
//! (trying each host of the URL in turn), replays every declaration made so
//! far, and when the connection is lost, opens it again after a capped,
//! jittered backoff. Consumers follow: an [`Inbox`] outlives connections and
//! resumes consuming on each new one. Deliveries of a lost connection can no
//! longer be settled (the broker gives them to someone else, or to us again),
//! so settling one of them does nothing.
//!
//! Deliveries reach the inbox's reader directly: the inbox polls the
//! consumers of every connection so far, with no task in between.
//!
//! Publishing is pipelined: many publishes share the confirm channel, and
//! each caller awaits only its own verdict (confirmed, returned, refused),
//! which [`super::confirms`] pairs with its message, for at most the publish
//! timeout (a stalled link looks like silence, not like an error). Acknowledgements go
//! through one task per consumer channel that acks the longest settled prefix
//! of delivery tags with `multiple = true`, so a burst of settlements costs
//! one frame.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use arc_swap::{ArcSwap, ArcSwapOption};
use futures::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::{AMQPUriTcpExt, RustlsConnector};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;

use crate::config::RabbitOptions;
use crate::lock;

use super::confirms::{Lane, Outgoing, Publisher, Verdict};
use super::tls::TlsSetup;
use super::{
    ArgValue, ExchangeKind, ExchangeSpec, Inbound, Inbox, LinkState, Outcome, Publication,
    PublishError, QueueSpec, Role, Settle,
};

/// The first retry comes this soon after a lost connection.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Retries never wait longer than this.
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How often a link checks that its connection still stands, besides
/// listening for lapin's error events.
const LIVENESS_CHECK: Duration = Duration::from_millis(250);
/// Longest wait for one host to accept a connection (TCP, TLS and AMQP
/// handshakes): a host that says nothing is as good as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait, on close, for settled acknowledgements to go out and for
/// the broker to confirm the close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A self-healing link to one RabbitMQ virtual host.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    uris: Vec<String>,
    label: String,
    /// How `amqps://` hosts are verified, read once from the options' files.
    tls: Option<TlsSetup>,
    /// oslo.messaging's options for this broker: how to declare, TLS.
    options: RabbitOptions,
    publish_timeout: Duration,
    /// The connection in use, while there is one.
    live: ArcSwapOption<Live>,
    /// Up or down, and how many connections were opened so far.
    state: watch::Sender<LinkState>,
    /// Every declaration made on this link, replayed on each new connection.
    /// Held while a connection goes live, so none is missed in between.
    declared: Mutex<Vec<Declaration>>,
    closing: AtomicBool,
    /// Tasks that forward deliveries and settle them, awaited on close so
    /// that every settled acknowledgement reaches the broker first.
    consumers: std::sync::Mutex<Vec<ConsumerTasks>>,
}

struct Live {
    connection: Connection,
    generation: u64,
    /// The confirm-mode channel all publishes share; replaced if it closes.
    publisher: ArcSwap<Publisher>,
    reopen: Mutex<()>,
}

#[derive(Clone)]
enum Declaration {
    Exchange(ExchangeSpec),
    Queue(QueueSpec, String, String),
}

/// What a consumer channel leaves to settle on close: its acknowledging
/// task, and the one strong sender to it apart from those of deliveries in
/// hand (the inbox holds only weak ones).
struct ConsumerTasks {
    /// Let go when the connection is lost or the link closes.
    settle: Option<mpsc::UnboundedSender<(u64, Outcome)>>,
    acks: JoinHandle<()>,
}

/// One queue's deliveries, as the inbox reads them.
type Deliveries = Pin<Box<dyn Stream<Item = Inbound> + Send>>;

/// The deliveries of `consumer` until it ends (its connection is gone),
/// each settled through the acknowledger `settle` leads to.
fn deliveries(
    consumer: lapin::Consumer,
    queue: String,
    settle: mpsc::WeakUnboundedSender<(u64, Outcome)>,
) -> Deliveries {
    // The consumer, its queue's name and the acknowledger go from one
    // delivery to the next; `None` once the consumer ended.
    let state = Some((consumer, queue, settle));
    Box::pin(futures::stream::unfold(state, |state| {
        async move {
            let (mut consumer, queue, settle) = state?;
            let d = match consumer.next().await? {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(queue = %queue, error = %e, "consumer ended with its connection");
                    return None;
                }
            };
            let inbound = Inbound {
                expiration_ms: d
                    .properties
                    .expiration()
                    .as_ref()
                    .and_then(|ms| ms.as_str().trim().parse().ok()),
                headers: string_headers(d.properties.headers().as_ref()),
                body: d.data,
                redelivered: d.redelivered,
                settle: Settle::Amqp(Settler {
                    tag: d.delivery_tag,
                    // Gone once the link is closing: the delivery is then
                    // the broker's again, as for a lost connection.
                    tx: settle.upgrade(),
                }),
            };
            Some((inbound, Some((consumer, queue, settle))))
        }
    }))
}

/// The deliveries of a consumer's queues, on every connection: each new
/// subscription's streams arrive on `sets` and are read beside the old ones
/// (which end with their connection).
struct MergedInbox {
    current: futures::stream::SelectAll<Deliveries>,
    sets: mpsc::UnboundedReceiver<Vec<Deliveries>>,
    /// No subscription will come any more.
    sets_ended: bool,
}

impl MergedInbox {
    fn new() -> (mpsc::UnboundedSender<Vec<Deliveries>>, MergedInbox) {
        let (tx, sets) = mpsc::unbounded_channel();
        let inbox = MergedInbox {
            current: futures::stream::SelectAll::new(),
            sets,
            sets_ended: false,
        };
        (tx, inbox)
    }
}

impl Stream for MergedInbox {
    type Item = Inbound;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Inbound>> {
        while !self.sets_ended {
            match self.sets.poll_recv(cx) {
                Poll::Ready(Some(set)) => self.current.extend(set),
                Poll::Ready(None) => self.sets_ended = true,
                Poll::Pending => break,
            }
        }
        match self.current.poll_next_unpin(cx) {
            Poll::Ready(Some(inbound)) => Poll::Ready(Some(inbound)),
            // Every stream ended: the next subscription may still come.
            Poll::Ready(None) if !self.sets_ended => Poll::Pending,
            other => other,
        }
    }
}

impl AmqpBroker {
    /// Opens a link and waits for its first connection: an error here (no
    /// host reachable, bad credentials, a certificate that does not verify)
    /// is returned, and nothing keeps trying.
    pub async fn connect(
        uris: &[String],
        options: &RabbitOptions,
        label: &str,
        publish_timeout: Duration,
    ) -> Result<AmqpBroker> {
        let broker = AmqpBroker::new(uris, options, label, publish_timeout)?;
        let connection = broker.open_any().await?;
        broker.go_live(connection).await?;
        tokio::spawn(broker.clone().supervise(false));
        Ok(broker)
    }

    /// Opens a link that connects in the background and keeps trying until
    /// it does: a neighbour that is down at start-up does not stop a cell.
    pub fn connect_in_background(
        uris: &[String],
        options: &RabbitOptions,
        label: &str,
        publish_timeout: Duration,
    ) -> Result<AmqpBroker> {
        let broker = AmqpBroker::new(uris, options, label, publish_timeout)?;
        tokio::spawn(broker.clone().supervise(true));
        Ok(broker)
    }

    fn new(
        uris: &[String],
        options: &RabbitOptions,
        label: &str,
        publish_timeout: Duration,
    ) -> Result<AmqpBroker> {
        if uris.is_empty() {
            bail!("no AMQP host configured for {label}");
        }
        // Read the TLS files once, before dialling: a wrong path is a config
        // error, not a reason to try the next host.
        let tls = if uris.iter().any(|uri| uri.starts_with("amqps://")) {
            Some(TlsSetup::from_options(options, label)?)
        } else {
            None
        };
        Ok(AmqpBroker {
            inner: Arc::new(Inner {
                uris: uris.to_vec(),
                label: label.to_string(),
                tls,
                options: options.clone(),
                publish_timeout,
                live: ArcSwapOption::empty(),
                state: watch::channel(LinkState::default()).0,
                declared: Mutex::new(Vec::new()),
                closing: AtomicBool::new(false),
                consumers: std::sync::Mutex::new(Vec::new()),
            }),
        })
    }

    /// The options this broker is declared and reached with.
    pub fn options(&self) -> &RabbitOptions {
        &self.inner.options
    }

    /// Up or down, as it changes.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.inner.state.subscribe()
    }

    /// Why the link is down, or `None` while it is up: read in place, for
    /// every publication.
    pub fn down_because(&self) -> Option<String> {
        let state = self.inner.state.borrow();
        (!state.up).then(|| state.last_error.clone().unwrap_or_default())
    }

    /// Tries each host in turn (oslo.messaging's failover list) and returns
    /// the first connection that opens. `amqps://` URIs are opened over TLS,
    /// verified as the options say (see `tls`).
    async fn open_any(&self) -> Result<Connection> {
        let label = &self.inner.label;
        let mut errors = Vec::new();
        for uri in &self.inner.uris {
            let parsed: AMQPUri = uri.parse().map_err(|e| {
                anyhow::anyhow!("the broker of {label}: an AMQP URI lapin cannot read: {e}")
            })?;
            let (host, port) = (parsed.authority.host.clone(), parsed.authority.port);
            let properties = ConnectionProperties::default()
                .with_connection_name(LongString::from(format!("cellhost {label}")));
            let opening = async {
                if let (AMQPScheme::AMQPS, Some(setup)) = (&parsed.scheme, &self.inner.tls) {
                    let attempt = setup.attempt();
                    connect_tls(parsed.clone(), properties, attempt.connector.clone())
                        .await
                        .map_err(|e| setup.explain(e, &attempt, label, &host, port))
                } else {
                    Connection::connect_uri(parsed.clone(), properties)
                        .await
                        .map_err(|e| {
                            anyhow::Error::new(e).context(format!(
                                "AMQP connection to the broker of {label} at {host}:{port} failed"
                            ))
                        })
                }
            };
            let opened = tokio::time::timeout(CONNECT_TIMEOUT, opening)
                .await
                .unwrap_or_else(|_| {
                    Err(anyhow::anyhow!(
                        "AMQP connection to the broker of {label} at {host}:{port}: no answer within {CONNECT_TIMEOUT:?}"
                    ))
                });
            match opened {
                Ok(connection) => return Ok(connection),
                Err(e) => {
                    tracing::debug!(broker = %label, error = %format!("{e:#}"), "AMQP connection failed");
                    errors.push(format!("{e:#}"));
                }
            }
        }
        bail!(
            "cannot connect to the broker of {label}: {}",
            errors.join("; ")
        )
    }

    /// Makes `connection` the one in use: its publisher channel opened and
    /// every declaration replayed on it.
    async fn go_live(&self, connection: Connection) -> Result<()> {
        // A broker that stalls here must not hold the declarations, and every
        // later attempt, forever.
        let replayed = tokio::time::timeout(CONNECT_TIMEOUT, self.replay(&connection)).await;
        let (publisher, declared) = match replayed {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                let closing = connection.close(200, "declarations failed".into());
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
                return Err(e);
            }
            Err(_) => {
                let closing = connection.close(200, "declarations too slow".into());
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
                bail!(
                    "the broker of {} did not take the declarations within {CONNECT_TIMEOUT:?}",
                    self.inner.label
                );
            }
        };
        let generation = self.inner.state.borrow().generation + 1;
        self.inner.live.store(Some(Arc::new(Live {
            connection,
            generation,
            publisher: ArcSwap::from_pointee(Publisher::new(publisher, &self.inner.label)),
            reopen: Mutex::new(()),
        })));
        self.inner.state.send_replace(LinkState {
            up: true,
            generation,
            last_error: None,
        });
        drop(declared);
        tracing::info!(broker = %self.inner.label, generation, "link up");
        Ok(())
    }

    /// Opens the publisher channel of `connection` and replays every
    /// declaration on it; the declarations stay locked until the caller
    /// has made the connection the one in use.
    async fn replay(
        &self,
        connection: &Connection,
    ) -> Result<(Channel, tokio::sync::MutexGuard<'_, Vec<Declaration>>)> {
        let publisher = open_confirm_channel(connection).await?;
        let declared = self.inner.declared.lock().await;
        for declaration in declared.iter() {
            match declaration {
                Declaration::Exchange(spec) => {
                    declare_exchange_on(connection, &self.inner.label, spec).await?
                }
                Declaration::Queue(spec, exchange, key) => {
                    declare_queue_on(connection, &self.inner.label, spec, exchange, key).await?
                }
            }
        }
        Ok((publisher, declared))
    }

    /// Keeps the link connected until it is closed.
    async fn supervise(self, connect_first: bool) {
        let mut failures: u32 = 0;
        let mut connect_now = connect_first;
        loop {
            if !connect_now {
                self.until_lost().await;
                if self.inner.closing.load(Ordering::Relaxed) {
                    return;
                }
                failures = 0;
            }
            // A link opened in the background tries at once; a lost one
            // waits first, so a broker that just failed is not hammered.
            let mut wait = !connect_now;
            connect_now = false;
            loop {
                if wait {
                    tokio::time::sleep(backoff(failures)).await;
                }
                wait = true;
                if self.inner.closing.load(Ordering::Relaxed) {
                    return;
                }
                let opened = match self.open_any().await {
                    Ok(connection) => self.go_live(connection).await,
                    Err(e) => Err(e),
                };
                match opened {
                    Ok(()) => break,
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let error = format!("{e:#}");
                        if failures == 1 || failures % 20 == 0 {
                            tracing::warn!(broker = %self.inner.label, attempts = failures, error = %error, "link down, retrying");
                        }
                        self.inner.state.send_modify(|s| s.last_error = Some(error));
                    }
                }
            }
        }
    }

    /// Waits until the connection in use is lost, then marks the link down.
    async fn until_lost(&self) {
        let Some(live) = self.inner.live.load_full() else {
            return;
        };
        let mut events = Box::pin(live.connection.events_listener());
        let error = loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(lapin::Event::Error(e)) => break e.to_string(),
                    Some(_) => {}
                    None => break "connection closed".to_string(),
                },
                _ = tokio::time::sleep(LIVENESS_CHECK) => {
                    if !live.connection.status().connected() {
                        break "connection closed".to_string();
                    }
                }
            }
        };
        self.inner.live.store(None);
        // The lost connection's acknowledgers can settle nothing more: each
        // ends once the deliveries still in hand are dropped.
        let mut consumers = lock(&self.inner.consumers);
        consumers.retain(|tasks| !tasks.acks.is_finished());
        consumers.iter_mut().for_each(|tasks| tasks.settle = None);
        drop(consumers);
        if self.inner.closing.load(Ordering::Relaxed) {
            return;
        }
        tracing::warn!(broker = %self.inner.label, error = %error, "link lost; reconnecting");
        self.inner.state.send_modify(|s| {
            s.up = false;
            s.last_error = Some(error);
        });
    }

    fn live(&self) -> std::result::Result<Arc<Live>, PublishError> {
        self.inner.live.load_full().ok_or_else(|| {
            let state = self.inner.state.borrow();
            PublishError::Unavailable(format!(
                "the link to {} is down{}",
                self.inner.label,
                state
                    .last_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ))
        })
    }

    /// Declares an exchange now if the link is up, and on every connection
    /// to come; on a link that is down, it is made when the link comes up
    /// (and a refusal then keeps the link down, with the reason).
    pub async fn declare_exchange(&self, exchange: &ExchangeSpec) -> Result<()> {
        let mut declared = self.inner.declared.lock().await;
        if let Some(live) = self.inner.live.load_full() {
            declare_exchange_on(&live.connection, &self.inner.label, exchange).await?;
        }
        declared.push(Declaration::Exchange(exchange.clone()));
        Ok(())
    }

    /// Declares and binds a queue, as [`AmqpBroker::declare_exchange`] does.
    pub async fn declare_queue(
        &self,
        queue: &QueueSpec,
        exchange: &str,
        routing_key: &str,
    ) -> Result<()> {
        let mut declared = self.inner.declared.lock().await;
        if let Some(live) = self.inner.live.load_full() {
            declare_queue_on(
                &live.connection,
                &self.inner.label,
                queue,
                exchange,
                routing_key,
            )
            .await?;
        }
        declared.push(Declaration::Queue(
            queue.clone(),
            exchange.to_string(),
            routing_key.to_string(),
        ));
        Ok(())
    }

    /// Consumes `queues` now and on every connection to come. The first
    /// subscription must work (a missing queue is an error here); later
    /// ones are retried with each new connection.
    ///
    /// The inbox polls lapin's consumers itself: a delivery reaches the
    /// task that reads the inbox without passing through another task.
    pub async fn consume(&self, queues: &[String], prefetch: u16, tag: &str) -> Result<Inbox> {
        let (sets, inbox) = MergedInbox::new();
        let live = self.live()?;
        let (tasks, consumers) = self.subscribe(&live, queues, prefetch, tag).await?;
        lock(&self.inner.consumers).push(tasks);
        let _ = sets.send(consumers);
        let broker = self.clone();
        let queues = queues.to_vec();
        let tag = tag.to_string();
        let mut state = self.state();
        let mut generation = live.generation;
        tokio::spawn(async move {
            loop {
                let changed = tokio::select! {
                    changed = state.changed() => changed,
                    _ = sets.closed() => return,
                };
                if changed.is_err() || broker.inner.closing.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(live) = broker.live() else { continue };
                if live.generation == generation {
                    continue;
                }
                match broker.subscribe(&live, &queues, prefetch, &tag).await {
                    Ok((tasks, consumers)) => {
                        generation = live.generation;
                        lock(&broker.inner.consumers).push(tasks);
                        let _ = sets.send(consumers);
                        tracing::info!(broker = %broker.inner.label, queues = ?queues, "consuming again");
                    }
                    Err(e) => {
                        tracing::warn!(broker = %broker.inner.label, error = %format!("{e:#}"), "cannot consume again yet");
                    }
                }
            }
        });
        Ok(Box::pin(inbox))
    }

    /// Subscribes to `queues` on one channel of `live`: the channel's
    /// acknowledging task, and a stream of deliveries per queue.
    async fn subscribe(
        &self,
        live: &Live,
        queues: &[String],
        prefetch: u16,
        tag: &str,
    ) -> Result<(ConsumerTasks, Vec<Deliveries>)> {
        let channel = live.connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let (settle, settled) = mpsc::unbounded_channel();
        let acks = tokio::spawn(acknowledge(channel.clone(), settled));
        let mut consumers = Vec::new();
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
            consumers.push(deliveries(consumer, queue.clone(), settle.downgrade()));
        }
        let tasks = ConsumerTasks {
            settle: Some(settle),
            acks,
        };
        Ok((tasks, consumers))
    }

    /// Publishes `p` and waits for its verdict, at most the publish timeout.
    ///
    /// Across the wait only the verdict's receiver, the deadline's timer and
    /// two shared handles (connection, publisher) are held: the properties
    /// are built and handed to the publisher before it, and
    /// reopening a closed publisher channel (rare) waits in a future of its
    /// own. With hundreds of publishes in flight, each a future on the heap,
    /// a small future is less memory touched per message.
    pub async fn publish(&self, p: &Publication) -> std::result::Result<(), PublishError> {
        let label = &self.inner.label;
        let timeout = self.inner.publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            PublishError::Unavailable(format!(
                "publishing to {} on {label}: {what}: {e}",
                p.routing_key
            ))
        };
        let timed_out = || {
            PublishError::Unavailable(format!(
                "publishing to {} on {label}: no confirm within {timeout:?} (is the link stalled?)",
                p.routing_key
            ))
        };
        let live = self.live()?;
        let publisher = match Self::open_publisher(&live) {
            Some(publisher) => publisher,
            None => {
                let reopening = Box::pin(self.reopen_publisher(&live));
                match tokio::time::timeout_at(deadline, reopening).await {
                    Err(_) => return Err(timed_out()),
                    Ok(Err(e)) => return Err(unavailable("no publisher channel", &e)),
                    Ok(Ok(publisher)) => publisher,
                }
            }
        };
        let heard = publisher.publish(Self::outgoing(p));
        let verdict = match tokio::time::timeout_at(deadline, heard).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => return Err(unavailable("publisher gone", &e)),
            Ok(Ok(verdict)) => verdict,
        };
        self.judge(p, verdict)
    }

    /// The outcome of publishing `p` on this broker, by its verdict.
    pub fn judge(
        &self,
        p: &Publication,
        verdict: Verdict,
    ) -> std::result::Result<(), PublishError> {
        let label = &self.inner.label;
        match verdict {
            Verdict::Delivered => Ok(()),
            Verdict::Returned(reason) => Err(PublishError::Unroutable {
                broker: label.clone(),
                exchange: p.exchange.clone(),
                routing_key: p.routing_key.clone(),
                reason,
            }),
            Verdict::Refused => Err(PublishError::Refused {
                broker: label.clone(),
                routing_key: p.routing_key.clone(),
            }),
            Verdict::Failed(e) => Err(PublishError::Unavailable(format!(
                "publishing to {} on {label}: {e}",
                p.routing_key
            ))),
        }
    }

    /// How long a publish may wait for its confirm before it counts as
    /// failed (the link is then taken as stalled).
    pub fn publish_timeout(&self) -> Duration {
        self.inner.publish_timeout
    }

    /// Opens a confirm channel of its own on the connection in use, for
    /// one task's [`Lane`]. It lives as long as that connection.
    pub async fn open_lane<T>(&self) -> Result<Lane<T>> {
        let live = self.live()?;
        let channel = open_confirm_channel(&live.connection).await?;
        Ok(Lane::new(channel, &self.inner.label))
    }

    /// `p` as every publish here sends it (mandatory as it says, its
    /// headers, oslo.messaging's properties), for a [`Publisher`] or a
    /// [`Lane`].
    pub fn outgoing(p: &Publication) -> Outgoing {
        Outgoing {
            exchange: p.exchange.as_str().into(),
            routing_key: p.routing_key.as_str().into(),
            options: BasicPublishOptions {
                mandatory: p.mandatory,
                ..BasicPublishOptions::default()
            },
            body: p.body.clone(),
            headers: string_table(&p.headers),
            properties: publish_properties(p.expiration_ms),
        }
    }

    /// The shared confirm channel, if it is open.
    fn open_publisher(live: &Live) -> Option<Arc<Publisher>> {
        let current = live.publisher.load_full();
        current.channel().status().connected().then_some(current)
    }

    /// Opens the shared confirm channel again: the broker closed it (a
    /// failed declaration or publish closes a channel, not the connection).
    async fn reopen_publisher(&self, live: &Live) -> Result<Arc<Publisher>> {
        let _guard = live.reopen.lock().await;
        if let Some(current) = Self::open_publisher(live) {
            return Ok(current);
        }
        tracing::warn!(broker = %self.inner.label, "publisher channel closed, reopening it");
        let channel = open_confirm_channel(&live.connection).await?;
        let fresh = Arc::new(Publisher::new(channel, &self.inner.label));
        live.publisher.store(fresh.clone());
        Ok(fresh)
    }

    /// Stops reconnecting, lets every settled acknowledgement reach the
    /// broker, and closes the connection.
    pub async fn close(&self) {
        self.inner.closing.store(true, Ordering::Relaxed);
        let consumers: Vec<ConsumerTasks> = std::mem::take(&mut *lock(&self.inner.consumers));
        let mut acks = Vec::new();
        for tasks in consumers {
            // An acknowledger ends once this sender and every unsettled
            // delivery's are gone; the inboxes hold none.
            drop(tasks.settle);
            acks.push(tasks.acks);
        }
        // Deliveries still unsettled (an answer still being gathered, say)
        // are the broker's again once the connection closes; waiting on them
        // for long would hang shutdown.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, futures::future::join_all(acks)).await;
        if let Some(live) = self.inner.live.swap(None) {
            let closing = live.connection.close(200, "cellhost shutting down".into());
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
        }
        self.inner.state.send_modify(|s| s.up = false);
    }
}

/// How long to wait before the next connection attempt: doubling from
/// [`BACKOFF_FIRST`] up to [`BACKOFF_CAP`], with a random half taken off so
/// that many hosts losing one broker do not all come back at once.
fn backoff(failures: u32) -> Duration {
    let full = BACKOFF_FIRST
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_CAP);
    full.mul_f64(0.5 + fastrand::f64() / 2.0)
}

fn string_headers(table: Option<&FieldTable>) -> Vec<(String, String)> {
    let Some(table) = table else {
        return Vec::new();
    };
    table
        .inner()
        .iter()
        .filter_map(|(k, v)| match v {
            AMQPValue::LongString(s) => Some((k.to_string(), s.to_string())),
            AMQPValue::ShortString(s) => Some((k.to_string(), s.to_string())),
            _ => None,
        })
        .collect()
}

async fn declare_exchange_on(
    connection: &Connection,
    label: &str,
    exchange: &ExchangeSpec,
) -> Result<()> {
    let channel = connection.create_channel().await?;
    let kind = match exchange.kind {
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
    };
    let options = ExchangeDeclareOptions {
        durable: exchange.durable,
        auto_delete: exchange.auto_delete,
        ..ExchangeDeclareOptions::default()
    };
    let declared = channel
        .exchange_declare(
            exchange.name.as_str().into(),
            kind,
            options,
            FieldTable::default(),
        )
        .await;
    if let Err(e) = declared {
        return Err(refused(
            label,
            e,
            "exchange",
            &exchange.name,
            exchange.role,
            &format!(
                "durable={}, auto_delete={}",
                exchange.durable, exchange.auto_delete
            ),
        ));
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

async fn declare_queue_on(
    connection: &Connection,
    label: &str,
    queue: &QueueSpec,
    exchange: &str,
    routing_key: &str,
) -> Result<()> {
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions {
        durable: queue.durable,
        auto_delete: queue.auto_delete,
        ..QueueDeclareOptions::default()
    };
    let mut arguments = FieldTable::default();
    for (key, value) in &queue.arguments {
        arguments.insert(key.as_str().into(), amqp_value(value));
    }
    let declared = channel
        .queue_declare(queue.name.as_str().into(), options, arguments)
        .await;
    if let Err(e) = declared {
        return Err(refused(
            label,
            e,
            "queue",
            &queue.name,
            queue.role,
            &format!(
                "durable={}, auto_delete={}, arguments={:?}",
                queue.durable, queue.auto_delete, queue.arguments
            ),
        ));
    }
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
            .with_context(|| {
                format!("binding queue {:?} to {exchange:?} on {label}", queue.name)
            })?;
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Explains a failed declaration. PRECONDITION_FAILED means the name exists
/// with other properties, usually declared first by an oslo service
/// configured differently: say which option to align.
fn refused(
    broker: &str,
    error: lapin::Error,
    what: &str,
    name: &str,
    role: Role,
    declared: &str,
) -> anyhow::Error {
    if let lapin::ErrorKind::ProtocolError(amqp) = error.kind() {
        if amqp.get_id() == 406 {
            let said = amqp.get_message().as_str();
            let argument = inequivalent_argument(said).unwrap_or("");
            return anyhow::anyhow!(
                "{what} {name:?} already exists on the broker of {broker} with other properties than cellhost declares ({declared}); the broker says: {said}. Make `{}` in [oslo_messaging_rabbit] match the oslo.messaging services that use this broker (or delete the {what} if nothing uses it)",
                role.likely_option(argument)
            );
        }
    }
    anyhow::Error::new(error).context(format!(
        "declaring {what} {name:?} on the broker of {broker}"
    ))
}

/// The argument RabbitMQ names in "PRECONDITION_FAILED - inequivalent arg
/// 'durable' for exchange 'nova' ...".
fn inequivalent_argument(reply_text: &str) -> Option<&str> {
    let rest = reply_text.split("inequivalent arg '").nth(1)?;
    rest.split('\'').next()
}

/// py-amqp (oslo's client) sends a Python int as a 32-bit signed integer
/// when it fits; RabbitMQ compares integers by value, whatever their width.
fn amqp_value(value: &ArgValue) -> AMQPValue {
    match value {
        ArgValue::Text(text) => AMQPValue::LongString(text.as_str().into()),
        ArgValue::Int(n) => match i32::try_from(*n) {
            Ok(small) => AMQPValue::LongInt(small),
            Err(_) => AMQPValue::LongLongInt(i64::try_from(*n).unwrap_or(i64::MAX)),
        },
    }
}

/// Opens `uri` over TLS with our own connector rather than lapin's built-in
/// one, whose trust store always includes the system's CAs: with
/// `ssl_ca_file` set, only that CA may vouch for the broker.
async fn connect_tls(
    uri: AMQPUri,
    properties: ConnectionProperties,
    connector: RustlsConnector,
) -> lapin::Result<Connection> {
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connector(
        uri,
        runtime,
        // lapin calls this to open the socket; reconnecting is the link's
        // own business (it opens a new connection).
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
    tx: Option<mpsc::UnboundedSender<(u64, Outcome)>>,
}

impl Settler {
    pub(super) fn settle(self, outcome: Outcome) {
        // The task is gone only when the channel is (or the link closes);
        // the broker then redelivers the message, which is what
        // at-least-once wants.
        if let Some(tx) = self.tx {
            let _ = tx.send((self.tag, outcome));
        }
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
                    tracing::debug!(error = %e, "nack failed; the broker will redeliver");
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
                tracing::debug!(error = %e, "ack failed; the broker will redeliver");
                return;
            }
        }
    }
}

/// String headers as an AMQP field table.
fn string_table(headers: &[(&'static str, String)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert((*name).into(), AMQPValue::LongString(value.as_str().into()));
    }
    table
}

/// What oslo.messaging sets on a message; content_type is what makes a
/// Python peer decode the body as JSON rather than skip it.
fn publish_properties(expiration_ms: Option<u64>) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(0);
    match expiration_ms {
        Some(ms) => properties.with_expiration(ms.to_string().into()),
        None => properties,
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
    use super::{backoff, inequivalent_argument, AckTracker, BACKOFF_CAP};
    use std::time::Duration;

    #[test]
    fn the_inequivalent_argument_is_read_from_the_brokers_words() {
        let said = "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'nova' in vhost 'c1': received 'false' but current is 'true'";
        assert_eq!(inequivalent_argument(said), Some("durable"));
        assert_eq!(inequivalent_argument("PRECONDITION_FAILED - other"), None);
    }

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

    #[test]
    fn backoff_doubles_up_to_a_cap_with_jitter() {
        for failures in 0..40 {
            let wait = backoff(failures);
            assert!(wait <= BACKOFF_CAP, "{failures}: {wait:?}");
            assert!(wait >= Duration::from_millis(50), "{failures}: {wait:?}");
        }
        assert!(backoff(30) >= BACKOFF_CAP / 2);
    }
}
