//! The AMQP transport over amqprs, the second client a link can run on
//! (`[cell] amqp_client = "amqprs"`); the same link as [`super::amqp`]'s
//! over lapin, seen from above: self-healing, declarations replayed on each
//! new connection, consumers that follow, batched acknowledgements, and
//! publishes paired with their confirms by [`super::rs_confirms`].
//!
//! amqprs runs on the tokio runtime (a reader and a writer task per
//! connection, a dispatcher task per channel), where lapin runs an I/O
//! thread per connection. Its known sharp edges are kept away here:
//!
//! - a request it is waiting on must not be cancelled (its reader task
//!   panics answering a request whose caller is gone): every control call
//!   with a deadline runs in a task of its own, and only the waiting for it
//!   is timed out;
//! - it reads no close reason into a failed request's error: each channel
//!   used for declarations carries a callback that keeps the broker's words;
//! - names over 255 bytes would panic inside it: they are refused before a
//!   call is made;
//! - a channel the connection lost is not told of it: the link tells every
//!   confirm channel when it sees the connection go.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicNackArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, ConsumerMessage, ExchangeDeclareArguments, QueueBindArguments,
    QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::tls::TlsAdaptor;
use amqprs::{
    Ack, BasicProperties, Cancel, Close, CloseChannel, FieldTable, FieldValue, Nack, Return,
};
use anyhow::{bail, Result};
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;

use crate::config::{AmqpHost, RabbitOptions, TransportUrl};
use crate::lock;

use super::amqp::{backoff, explain_refusal, AckTracker, Deliveries, MergedInbox};
use super::rs_confirms::{Feed, RsLane, RsOutgoing};
use super::tls::TlsSetup;
use super::{
    ArgValue, ExchangeKind, ExchangeSpec, Inbound, Inbox, LinkState, Outcome, Publication,
    PublishError, QueueSpec, Settle, Verdict,
};

/// Longest wait for one host to accept a connection (TCP, TLS and AMQP
/// handshakes), and for one control request (a declaration, a channel).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait, on close, for settled acknowledgements to go out and for
/// the broker to confirm the close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a link checks that its connection still stands, besides
/// waiting for amqprs's report of a failed socket.
const LIVENESS_CHECK: Duration = Duration::from_millis(250);
/// The heartbeat proposed when the options propose none: RabbitMQ's own.
const DEFAULT_HEARTBEAT: u16 = 60;
/// AMQP short strings (names, routing keys) hold at most this many bytes.
const SHORT_STRING_MAX: usize = 255;

/// A self-healing link to one RabbitMQ virtual host, over amqprs.
#[derive(Clone)]
pub struct RsBroker {
    inner: Arc<Inner>,
}

struct Inner {
    hosts: Vec<AmqpHost>,
    vhost: String,
    /// How `amqps` hosts are verified, read once from the options' files.
    tls: Option<TlsSetup>,
    label: String,
    options: RabbitOptions,
    publish_timeout: Duration,
    live: ArcSwapOption<Live>,
    state: watch::Sender<LinkState>,
    declared: Mutex<Vec<Declaration>>,
    closing: AtomicBool,
    consumers: std::sync::Mutex<Vec<ConsumerTasks>>,
}

struct Live {
    connection: Connection,
    /// What the broker said if it closed the connection.
    said: Said,
    generation: u64,
    /// The shared publisher's queue, while its task runs.
    publisher: std::sync::Mutex<Option<mpsc::UnboundedSender<Request>>>,
    /// The confirm channels opened on this connection, told when it is lost.
    feeds: std::sync::Mutex<Vec<Weak<Feed>>>,
}

impl Live {
    fn track(&self, feed: &Arc<Feed>) {
        let mut feeds = lock(&self.feeds);
        feeds.retain(|f| f.strong_count() > 0);
        feeds.push(Arc::downgrade(feed));
    }
}

/// One publish for the shared publisher's task, and who hears its verdict.
struct Request {
    publication: Publication,
    verdict: oneshot::Sender<Verdict>,
}

#[derive(Clone)]
enum Declaration {
    Exchange(ExchangeSpec),
    Queue(QueueSpec, String, String),
}

struct ConsumerTasks {
    settle: Option<mpsc::UnboundedSender<(u64, Outcome)>>,
    acks: JoinHandle<()>,
}

/// Keeps what the broker said when it closed a channel or a connection,
/// and counts the channels it closed on a connection: amqprs does not take
/// back the id of such a channel, so a connection runs out of ids after
/// about 2 000 of them, and is replaced well before.
#[derive(Clone, Default)]
struct Said {
    words: Arc<std::sync::Mutex<Option<(u16, String)>>>,
    /// Shared by a connection's callback and its channels'.
    channels_closed: Arc<AtomicU32>,
}

/// A connection is replaced once the broker has closed this many of its
/// channels.
const CHANNELS_CLOSED_MAX: u32 = 1_000;

impl Said {
    fn keep(&self, code: u16, text: &str) {
        *lock(&self.words) = Some((code, text.to_string()));
    }

    fn take(&self) -> Option<(u16, String)> {
        lock(&self.words).take()
    }

    /// A fresh record for one channel of this connection.
    fn for_channel(&self) -> Said {
        Said {
            words: Arc::default(),
            channels_closed: self.channels_closed.clone(),
        }
    }

    fn channel_closed(&self) {
        self.channels_closed.fetch_add(1, Ordering::Relaxed);
    }

    fn too_many_channels_closed(&self) -> bool {
        self.channels_closed.load(Ordering::Relaxed) >= CHANNELS_CLOSED_MAX
    }
}

type CallbackResult<T> = std::result::Result<T, amqprs::error::Error>;

#[async_trait]
impl ChannelCallback for Said {
    async fn close(&mut self, _: &Channel, close: CloseChannel) -> CallbackResult<()> {
        self.keep(close.reply_code(), close.reply_text());
        self.channel_closed();
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, cancel: Cancel) -> CallbackResult<()> {
        tracing::warn!(consumer = %cancel.consumer_tag(), "the broker cancelled a consumer");
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> CallbackResult<bool> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, _: Ack) {}
    async fn publish_nack(&mut self, _: &Channel, _: Nack) {}
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

#[async_trait]
impl ConnectionCallback for Said {
    async fn close(&mut self, _: &Connection, close: Close) -> CallbackResult<()> {
        self.keep(close.reply_code(), close.reply_text());
        Ok(())
    }
    async fn blocked(&mut self, _: &Connection, reason: String) {
        tracing::warn!(reason, "the broker blocked the connection");
    }
    async fn unblocked(&mut self, _: &Connection) {}
    async fn secret_updated(&mut self, _: &Connection) {}
}

/// Runs `request` in a task of its own and waits for it at most `timeout`:
/// amqprs must not see a request of its own cancelled.
async fn detached<T, F>(timeout: Duration, what: &str, request: F) -> Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    match tokio::time::timeout(timeout, tokio::spawn(request)).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => bail!("{what}: the request's task failed: {e}"),
        Err(_) => bail!("{what}: no answer within {timeout:?}"),
    }
}

/// `tag:queue`, cut to what AMQP carries.
fn consumer_tag(tag: &str, queue: &str) -> String {
    let mut full = format!("{tag}:{queue}");
    if full.len() > SHORT_STRING_MAX {
        let mut end = SHORT_STRING_MAX;
        while !full.is_char_boundary(end) {
            end -= 1;
        }
        full.truncate(end);
    }
    full
}

/// Refuses a name amqprs could not send.
fn short(what: &str, name: &str) -> Result<()> {
    if name.len() > SHORT_STRING_MAX {
        bail!(
            "{what} {:?}... is {} bytes long; AMQP allows at most {SHORT_STRING_MAX}",
            name.chars().take(40).collect::<String>(),
            name.len()
        );
    }
    Ok(())
}

impl RsBroker {
    /// Opens a link and waits for its first connection, as
    /// [`super::amqp::AmqpBroker::connect`] does.
    pub async fn connect(
        url: &TransportUrl,
        options: &RabbitOptions,
        label: &str,
        publish_timeout: Duration,
    ) -> Result<RsBroker> {
        let broker = RsBroker::new(url, options, label, publish_timeout)?;
        let connection = broker.open_any().await?;
        broker.go_live(connection).await?;
        tokio::spawn(broker.clone().supervise(false));
        Ok(broker)
    }

    /// Opens a link that connects in the background and keeps trying.
    pub fn connect_in_background(
        url: &TransportUrl,
        options: &RabbitOptions,
        label: &str,
        publish_timeout: Duration,
    ) -> Result<RsBroker> {
        let broker = RsBroker::new(url, options, label, publish_timeout)?;
        tokio::spawn(broker.clone().supervise(true));
        Ok(broker)
    }

    fn new(
        url: &TransportUrl,
        options: &RabbitOptions,
        label: &str,
        publish_timeout: Duration,
    ) -> Result<RsBroker> {
        let TransportUrl::Amqp { hosts, vhost, .. } = url else {
            bail!("{label}: not an AMQP transport URL");
        };
        if hosts.is_empty() {
            bail!("no AMQP host configured for {label}");
        }
        let tls = if url.uses_tls(options) {
            Some(TlsSetup::from_options(options, label)?)
        } else {
            None
        };
        Ok(RsBroker {
            inner: Arc::new(Inner {
                hosts: hosts.clone(),
                vhost: vhost.clone(),
                tls,
                label: label.to_string(),
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

    pub fn options(&self) -> &RabbitOptions {
        &self.inner.options
    }

    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.inner.state.subscribe()
    }

    pub fn down_because(&self) -> Option<String> {
        let state = self.inner.state.borrow();
        (!state.up).then(|| state.last_error.clone().unwrap_or_default())
    }

    pub fn publish_timeout(&self) -> Duration {
        self.inner.publish_timeout
    }

    /// Tries each host in turn and returns the first connection that opens.
    async fn open_any(&self) -> Result<(Connection, Said)> {
        let label = &self.inner.label;
        let heartbeat = match self.inner.options.heartbeat_timeout_threshold {
            0 => DEFAULT_HEARTBEAT,
            h => h,
        };
        let mut errors = Vec::new();
        for host in &self.inner.hosts {
            let mut args =
                OpenConnectionArguments::new(&host.host, host.port, &host.user, &host.password);
            args.virtual_host(&self.inner.vhost)
                .heartbeat(heartbeat)
                .connection_name(&format!("cellhost {label}"));
            let attempt = self.inner.tls.as_ref().map(|setup| {
                let attempt = setup.attempt();
                let connector = tokio_rustls::TlsConnector::from(attempt.rustls_config());
                args.tls_adaptor(TlsAdaptor::new(connector, host.host.clone()));
                (setup, attempt)
            });
            let (name, port) = (host.host.clone(), host.port);
            let opened = detached(CONNECT_TIMEOUT, "connecting", async move {
                let connection = Connection::open(&args).await?;
                Ok(connection)
            })
            .await;
            let opened = match opened {
                Ok(connection) => {
                    let said = Said::default();
                    match connection.register_callback(said.clone()).await {
                        Ok(()) => Ok((connection, said)),
                        Err(e) => Err(anyhow::Error::new(e)),
                    }
                }
                Err(e) => Err(match &attempt {
                    Some((setup, attempt)) => setup.explain_text(e, attempt, label, &name, port),
                    None => e.context(format!(
                        "AMQP connection to the broker of {label} at {name}:{port} failed"
                    )),
                }),
            };
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

    async fn go_live(&self, (connection, said): (Connection, Said)) -> Result<()> {
        let declared = self.inner.declared.lock().await;
        for declaration in declared.iter() {
            let made = match declaration {
                Declaration::Exchange(spec) => {
                    declare_exchange_on(&connection, &said, &self.inner.label, spec).await
                }
                Declaration::Queue(spec, exchange, key) => {
                    declare_queue_on(&connection, &said, &self.inner.label, spec, exchange, key)
                        .await
                }
            };
            if let Err(e) = made {
                close_in_background(connection);
                return Err(e);
            }
        }
        let generation = self.inner.state.borrow().generation + 1;
        self.inner.live.store(Some(Arc::new(Live {
            connection,
            said,
            generation,
            publisher: std::sync::Mutex::new(None),
            feeds: std::sync::Mutex::new(Vec::new()),
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

    /// Waits until the connection in use is lost, then marks the link down
    /// and tells every confirm channel on it.
    async fn until_lost(&self) {
        let Some(live) = self.inner.live.load_full() else {
            return;
        };
        let failed = {
            let connection = live.connection.clone();
            tokio::spawn(async move { connection.listen_network_io_failure().await })
        };
        tokio::pin!(failed);
        let error = loop {
            tokio::select! {
                _ = &mut failed => break "connection lost".to_string(),
                _ = tokio::time::sleep(LIVENESS_CHECK) => {
                    if !live.connection.is_open() {
                        break "connection closed".to_string();
                    }
                    if live.said.too_many_channels_closed() {
                        close_in_background(live.connection.clone());
                        break format!(
                            "replaced after the broker closed {CHANNELS_CLOSED_MAX} of its channels"
                        );
                    }
                }
            }
        };
        failed.abort();
        let error = match live.said.take() {
            Some((code, text)) => format!("the broker closed the connection: {code} {text}"),
            None => error,
        };
        self.inner.live.store(None);
        for feed in lock(&live.feeds).drain(..) {
            if let Some(feed) = feed.upgrade() {
                feed.closed(&error);
            }
        }
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

    pub async fn declare_exchange(&self, exchange: &ExchangeSpec) -> Result<()> {
        short("exchange", &exchange.name)?;
        let mut declared = self.inner.declared.lock().await;
        if let Some(live) = self.inner.live.load_full() {
            declare_exchange_on(&live.connection, &live.said, &self.inner.label, exchange).await?;
        }
        declared.push(Declaration::Exchange(exchange.clone()));
        Ok(())
    }

    pub async fn declare_queue(
        &self,
        queue: &QueueSpec,
        exchange: &str,
        routing_key: &str,
    ) -> Result<()> {
        short("queue", &queue.name)?;
        short("exchange", exchange)?;
        short("routing key", routing_key)?;
        let mut declared = self.inner.declared.lock().await;
        if let Some(live) = self.inner.live.load_full() {
            declare_queue_on(
                &live.connection,
                &live.said,
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

    /// Consumes `queues` now and on every connection to come.
    pub async fn consume(&self, queues: &[String], prefetch: u16, tag: &str) -> Result<Inbox> {
        for queue in queues {
            short("queue", queue)?;
        }
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

    async fn subscribe(
        &self,
        live: &Live,
        queues: &[String],
        prefetch: u16,
        tag: &str,
    ) -> Result<(ConsumerTasks, Vec<Deliveries>)> {
        let connection = live.connection.clone();
        let said = live.said.for_channel();
        let label = self.inner.label.clone();
        let queues = queues.to_vec();
        let tag = tag.to_string();
        let (channel, receivers) = detached(CONNECT_TIMEOUT, "subscribing", async move {
            let channel = open_channel(&connection, said.clone()).await?;
            channel
                .basic_qos(BasicQosArguments::new(0, prefetch, false))
                .await?;
            let mut receivers = Vec::new();
            for queue in &queues {
                let args = BasicConsumeArguments::new(queue, &consumer_tag(&tag, queue))
                    .manual_ack(true)
                    .finish();
                let (_, rx) = channel.basic_consume_rx(args).await.map_err(|e| {
                    let why = said
                        .take()
                        .map(|(code, text)| format!("{code} {text}"))
                        .unwrap_or_else(|| e.to_string());
                    anyhow::anyhow!("consuming queue {queue:?} on {label}: {why}")
                })?;
                receivers.push((queue.clone(), rx));
            }
            Ok((channel, receivers))
        })
        .await?;
        let (settle, settled) = mpsc::unbounded_channel();
        let acks = tokio::spawn(acknowledge(channel, settled));
        let consumers = receivers
            .into_iter()
            .map(|(queue, rx)| deliveries(rx, queue, settle.downgrade()))
            .collect();
        Ok((
            ConsumerTasks {
                settle: Some(settle),
                acks,
            },
            consumers,
        ))
    }

    /// Publishes `p` and waits for its verdict, at most the publish timeout.
    pub async fn publish(&self, p: &Publication) -> std::result::Result<(), PublishError> {
        let label = &self.inner.label;
        let timeout = self.inner.publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        if let Err(e) = short("routing key", &p.routing_key).and(short("exchange", &p.exchange)) {
            return Err(PublishError::Unroutable {
                broker: label.clone(),
                exchange: p.exchange.clone(),
                routing_key: p.routing_key.chars().take(40).collect(),
                reason: format!("{e:#}"),
            });
        }
        let timed_out = || {
            PublishError::Unavailable(format!(
                "publishing to {} on {label}: no confirm within {timeout:?} (is the link stalled?)",
                p.routing_key
            ))
        };
        let live = self.live()?;
        let running = lock(&live.publisher).clone().filter(|tx| !tx.is_closed());
        let tx = match running {
            Some(tx) => tx,
            None => match tokio::time::timeout_at(deadline, self.start_publisher(&live)).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(e)) => {
                    return Err(PublishError::Unavailable(format!(
                        "publishing to {} on {label}: no publisher channel: {e:#}",
                        p.routing_key
                    )))
                }
                Ok(Ok(tx)) => tx,
            },
        };
        let (verdict, heard) = oneshot::channel();
        let request = Request {
            publication: p.clone(),
            verdict,
        };
        if tx.send(request).is_err() {
            return Err(PublishError::Unavailable(format!(
                "publishing to {} on {label}: the publisher channel closed",
                p.routing_key
            )));
        }
        let verdict = match tokio::time::timeout_at(deadline, heard).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(_)) => Verdict::Failed("the publisher channel closed".into()),
            Ok(Ok(verdict)) => verdict,
        };
        self.judge(p, verdict)
    }

    /// Opens the shared publisher's channel and starts its task, unless
    /// another publish did meanwhile.
    async fn start_publisher(&self, live: &Arc<Live>) -> Result<mpsc::UnboundedSender<Request>> {
        let lane: RsLane<oneshot::Sender<Verdict>> = self.lane_on(live).await?;
        let mut publisher = lock(&live.publisher);
        if let Some(tx) = publisher.as_ref().filter(|tx| !tx.is_closed()) {
            let tx = tx.clone();
            drop(publisher);
            tokio::spawn(lane.close());
            return Ok(tx);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        *publisher = Some(tx.clone());
        tokio::spawn(run_publisher(lane, rx));
        Ok(tx)
    }

    pub fn judge(
        &self,
        p: &Publication,
        verdict: Verdict,
    ) -> std::result::Result<(), PublishError> {
        super::judge(&self.inner.label, p, verdict)
    }

    /// Opens a confirm channel of its own on the connection in use, for
    /// one task's lane.
    pub async fn open_lane<T>(&self) -> Result<RsLane<T>> {
        let live = self.live()?;
        self.lane_on(&live).await
    }

    async fn lane_on<T>(&self, live: &Arc<Live>) -> Result<RsLane<T>> {
        let feed = Feed::new(live.said.channels_closed.clone());
        let connection = live.connection.clone();
        let callback = feed.callback();
        let channel = detached(CONNECT_TIMEOUT, "opening a confirm channel", async move {
            let channel = open_channel(&connection, callback).await?;
            channel
                .confirm_select(ConfirmSelectArguments::default())
                .await?;
            Ok(channel)
        })
        .await?;
        live.track(&feed);
        Ok(RsLane::new(channel, feed, &self.inner.label))
    }

    /// Stops reconnecting, lets every settled acknowledgement reach the
    /// broker, and closes the connection.
    pub async fn close(&self) {
        self.inner.closing.store(true, Ordering::Relaxed);
        let consumers: Vec<ConsumerTasks> = std::mem::take(&mut *lock(&self.inner.consumers));
        let mut acks = Vec::new();
        for tasks in consumers {
            drop(tasks.settle);
            acks.push(tasks.acks);
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, futures::future::join_all(acks)).await;
        if let Some(live) = self.inner.live.swap(None) {
            let connection = live.connection.clone();
            let closing = tokio::spawn(async move { connection.close().await });
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
        }
        self.inner.state.send_modify(|s| s.up = false);
    }
}

/// The shared publisher's task: publishes what comes on `requests` on its
/// lane and hands each verdict to its caller, until the channel closes or
/// the link drops the queue.
async fn run_publisher(
    mut lane: RsLane<oneshot::Sender<Verdict>>,
    mut requests: mpsc::UnboundedReceiver<Request>,
) {
    let mut decided = Vec::new();
    let mut open = true;
    loop {
        tokio::select! {
            request = requests.recv(), if open && lane.is_open() => match request {
                Some(request) => lane.publish(RsOutgoing::new(&request.publication), request.verdict),
                None => open = false,
            },
            () = std::future::poll_fn(|cx| lane.poll_decided(cx, &mut decided)) => {
                for (to, verdict) in decided.drain(..) {
                    let _ = to.send(verdict);
                }
            }
        }
        if (!open || !lane.is_open()) && lane.is_empty() {
            break;
        }
    }
    // Whatever still waits in the queue was never published.
    requests.close();
    while let Ok(request) = requests.try_recv() {
        let _ = request
            .verdict
            .send(Verdict::Failed("the publisher channel closed".into()));
    }
    lane.close().await;
}

async fn open_channel<C: ChannelCallback + Send + 'static>(
    connection: &Connection,
    callback: C,
) -> Result<Channel> {
    let channel = connection.open_channel(None).await?;
    channel.register_callback(callback).await?;
    Ok(channel)
}

fn close_in_background(connection: Connection) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close()).await;
    });
}

/// Declares `exchange` on a channel of its own, closed afterwards.
async fn declare_exchange_on(
    connection: &Connection,
    said: &Said,
    label: &str,
    exchange: &ExchangeSpec,
) -> Result<()> {
    let connection = connection.clone();
    let said = said.for_channel();
    let spec = exchange.clone();
    let label = label.to_string();
    detached(CONNECT_TIMEOUT, "declaring an exchange", async move {
        let channel = open_channel(&connection, said.clone()).await?;
        let kind = match spec.kind {
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
        };
        let args = ExchangeDeclareArguments::new(&spec.name, kind)
            .durable(spec.durable)
            .auto_delete(spec.auto_delete)
            .finish();
        if let Err(e) = channel.exchange_declare(args).await {
            let declared = format!("durable={}, auto_delete={}", spec.durable, spec.auto_delete);
            return Err(refused(
                &label, &said, e, "exchange", &spec.name, spec.role, &declared,
            ));
        }
        let _ = channel.close().await;
        Ok(())
    })
    .await
}

/// Declares and binds `queue` on a channel of its own.
async fn declare_queue_on(
    connection: &Connection,
    said: &Said,
    label: &str,
    queue: &QueueSpec,
    exchange: &str,
    routing_key: &str,
) -> Result<()> {
    let connection = connection.clone();
    let said = said.for_channel();
    let spec = queue.clone();
    let (label, exchange, routing_key) = (
        label.to_string(),
        exchange.to_string(),
        routing_key.to_string(),
    );
    detached(CONNECT_TIMEOUT, "declaring a queue", async move {
        let channel = open_channel(&connection, said.clone()).await?;
        let mut arguments = FieldTable::new();
        for (key, value) in &spec.arguments {
            arguments.insert(field_name(key)?, field_value(value)?);
        }
        let args = QueueDeclareArguments::new(&spec.name)
            .durable(spec.durable)
            .auto_delete(spec.auto_delete)
            .arguments(arguments)
            .finish();
        if let Err(e) = channel.queue_declare(args).await {
            let declared = format!(
                "durable={}, auto_delete={}, arguments={:?}",
                spec.durable, spec.auto_delete, spec.arguments
            );
            return Err(refused(
                &label, &said, e, "queue", &spec.name, spec.role, &declared,
            ));
        }
        if !exchange.is_empty() {
            let bind = QueueBindArguments::new(&spec.name, &exchange, &routing_key);
            if let Err(e) = channel.queue_bind(bind).await {
                let why = said
                    .take()
                    .map(|(code, text)| format!("{code} {text}"))
                    .unwrap_or_else(|| e.to_string());
                bail!(
                    "binding queue {:?} to {exchange:?} on {label}: {why}",
                    spec.name
                );
            }
        }
        let _ = channel.close().await;
        Ok(())
    })
    .await
}

/// Explains a failed declaration by what the broker said when it closed
/// the channel.
fn refused(
    broker: &str,
    said: &Said,
    error: amqprs::error::Error,
    what: &str,
    name: &str,
    role: super::Role,
    declared: &str,
) -> anyhow::Error {
    match said.take() {
        Some((code, text)) => explain_refusal(broker, code, &text, what, name, role, declared)
            .unwrap_or_else(|| {
                anyhow::anyhow!(
                    "declaring {what} {name:?} on the broker of {broker}: {code} {text}"
                )
            }),
        None => anyhow::Error::new(error).context(format!(
            "declaring {what} {name:?} on the broker of {broker}"
        )),
    }
}

fn field_name(name: &str) -> Result<amqprs::FieldName> {
    amqprs::FieldName::try_from(name).map_err(|e| anyhow::anyhow!("field name {name:?}: {e:?}"))
}

/// As py-amqp sends them: a Python int as a 32-bit signed integer when it
/// fits.
fn field_value(value: &ArgValue) -> Result<FieldValue> {
    Ok(match value {
        ArgValue::Text(text) => FieldValue::S(
            text.as_str()
                .try_into()
                .map_err(|e| anyhow::anyhow!("argument {text:?}: {e:?}"))?,
        ),
        ArgValue::Int(n) => match i32::try_from(*n) {
            Ok(small) => FieldValue::I(small),
            Err(_) => FieldValue::l(i64::try_from(*n).unwrap_or(i64::MAX)),
        },
    })
}

/// The deliveries of one consumer until its channel or connection ends.
fn deliveries(
    rx: mpsc::UnboundedReceiver<ConsumerMessage>,
    queue: String,
    settle: mpsc::WeakUnboundedSender<(u64, Outcome)>,
) -> Deliveries {
    let stream = tokio_stream_of(rx).filter_map(move |message| {
        let settle = settle.clone();
        let queue = queue.clone();
        async move {
            let (Some(deliver), Some(body)) = (message.deliver, message.content) else {
                tracing::warn!(queue = %queue, "amqprs handed over a delivery without its method or body");
                return None;
            };
            let properties = message.basic_properties;
            Some(Inbound {
                expiration_ms: properties
                    .as_ref()
                    .and_then(|p| p.expiration())
                    .and_then(|ms| ms.trim().parse().ok()),
                headers: string_headers(properties.as_ref().and_then(|p| p.headers())),
                body,
                redelivered: deliver.redelivered(),
                settle: Settle::Amqp(super::amqp::Settler::new(
                    deliver.delivery_tag(),
                    settle.upgrade(),
                )),
            })
        }
    });
    Box::pin(stream)
}

/// `rx` as a stream.
fn tokio_stream_of<T: Send + 'static>(
    rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

fn string_headers(table: Option<&FieldTable>) -> Vec<(String, String)> {
    let Some(table) = table else {
        return Vec::new();
    };
    table
        .as_ref()
        .iter()
        .filter_map(|(k, v)| match v {
            FieldValue::S(s) => Some((k.to_string(), s.to_string())),
            _ => None,
        })
        .collect()
}

/// Acknowledges settled deliveries in batches, as the lapin link does.
async fn acknowledge(channel: Channel, mut settled: mpsc::UnboundedReceiver<(u64, Outcome)>) {
    let mut tracker = AckTracker::default();
    while let Some(first) = settled.recv().await {
        // A consumer settles a batch back to back: let the rest of it in,
        // so that one ack frame (one write, for amqprs) covers it.
        tokio::task::yield_now().await;
        let mut next = Some(first);
        while let Some((tag, outcome)) = next {
            if outcome != Outcome::Ack {
                let requeue = outcome == Outcome::Requeue;
                if let Err(e) = channel
                    .basic_nack(BasicNackArguments::new(tag, false, requeue))
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
            if !channel.is_open() {
                return;
            }
            if let Err(e) = channel.basic_ack(BasicAckArguments::new(upto, true)).await {
                tracing::debug!(error = %e, "ack failed; the broker will redeliver");
                return;
            }
        }
    }
}
