//! Publishes on an amqprs confirm channel, each paired with its verdict.
//!
//! amqprs hands a channel's frames from the broker to the channel's
//! callback one at a time, in the order the broker sent them. RabbitMQ
//! returns an unroutable mandatory message (`basic.return`) before it
//! confirms it, so read in that order, a publish's return is always known
//! before the confirm that decides it. The callback files each frame in the
//! channel's [`Feed`]; the lane's owner reads the feed in its own loop and
//! gives verdicts in publication order. A returned message is matched to
//! its publish by the number stamped in its headers, as on the lapin link.
//!
//! The broker numbers a confirm channel's publishes 1, 2, 3... in the order
//! their frames reach it; a lane sends its frames in its own numbering's
//! order, one publish after the other on amqprs's outgoing queue.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicPublishArguments, Channel};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use async_trait::async_trait;
use futures::task::AtomicWaker;

use crate::lock;

use super::{Publication, Verdict, STAMP_HEADER};

/// What the broker said on a confirm channel, in its order.
enum Event {
    Confirm { tag: u64, multiple: bool, ack: bool },
    Returned { stamp: Option<i64>, reason: String },
    Closed(String),
}

/// A confirm channel's frames, from its callback (or from the link, when
/// the connection is lost) to the lane's owner.
pub(super) struct Feed {
    events: std::sync::Mutex<Vec<Event>>,
    owner: AtomicWaker,
    /// The connection's count of channels the broker closed.
    channels_closed: Arc<AtomicU32>,
}

impl Feed {
    pub(super) fn new(channels_closed: Arc<AtomicU32>) -> Arc<Feed> {
        Arc::new(Feed {
            events: std::sync::Mutex::new(Vec::new()),
            owner: AtomicWaker::new(),
            channels_closed,
        })
    }

    /// The callback to register on the channel this feed is for.
    pub(super) fn callback(self: &Arc<Self>) -> FeedCallback {
        FeedCallback(self.clone())
    }

    /// The channel is gone with its connection: nothing more will come.
    pub(super) fn closed(&self, why: &str) {
        self.push(Event::Closed(why.to_string()));
    }

    fn push(&self, event: Event) {
        lock(&self.events).push(event);
        self.owner.wake();
    }
}

/// Wakes the lane's owner, for the publishes amqprs had to queue.
impl Wake for Feed {
    fn wake(self: Arc<Self>) {
        self.owner.wake();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.owner.wake();
    }
}

/// Files a confirm channel's frames in its [`Feed`].
pub(super) struct FeedCallback(Arc<Feed>);

type CallbackResult<T> = std::result::Result<T, amqprs::error::Error>;

#[async_trait]
impl ChannelCallback for FeedCallback {
    async fn close(&mut self, _: &Channel, close: CloseChannel) -> CallbackResult<()> {
        self.0.channels_closed.fetch_add(1, Ordering::Relaxed);
        self.0.push(Event::Closed(format!(
            "the broker closed the channel: {} {}",
            close.reply_code(),
            close.reply_text()
        )));
        Ok(())
    }

    async fn cancel(&mut self, _: &Channel, _: Cancel) -> CallbackResult<()> {
        Ok(())
    }

    async fn flow(&mut self, _: &Channel, active: bool) -> CallbackResult<bool> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        self.0.push(Event::Confirm {
            tag: ack.delivery_tag(),
            multiple: ack.mutiple(),
            ack: true,
        });
    }

    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        self.0.push(Event::Confirm {
            tag: nack.delivery_tag(),
            multiple: nack.multiple(),
            ack: false,
        });
    }

    async fn publish_return(
        &mut self,
        _: &Channel,
        ret: Return,
        properties: BasicProperties,
        _: Vec<u8>,
    ) {
        let stamp = properties
            .headers()
            .and_then(|h| h.get(&stamp_name()?))
            .and_then(|v| match v {
                FieldValue::l(stamp) => Some(*stamp),
                _ => None,
            });
        self.0.push(Event::Returned {
            stamp,
            reason: format!("{} {}", ret.reply_code(), ret.reply_text()),
        });
    }
}

fn stamp_name() -> Option<amqprs::FieldName> {
    amqprs::FieldName::try_from(STAMP_HEADER).ok()
}

type Sending = Pin<Box<dyn Future<Output = Result<(), amqprs::error::Error>> + Send>>;

/// One publish on its way to its verdict.
struct Slot<T> {
    /// Its number on the channel, the broker's delivery tag; 0 for one
    /// that was never sent.
    number: u64,
    stamp: Option<i64>,
    to: T,
    /// Confirmed (`Ok(acked)`) or failed.
    outcome: Option<Result<bool, String>>,
}

/// A confirm channel owned by one task, which publishes on it and collects
/// each publish's verdict in order, with the `T` it carried along.
pub struct RsLane<T> {
    channel: Channel,
    feed: Arc<Feed>,
    waker: Waker,
    label: String,
    next: u64,
    pending: VecDeque<Slot<T>>,
    /// Publishes amqprs has not taken yet (its outgoing queue was full),
    /// in order, with their numbers.
    sending: VecDeque<(u64, Sending)>,
    returned: HashMap<i64, String>,
    events: Vec<Event>,
    /// Why the channel is gone, once it is.
    closed: Option<String>,
}

impl<T> RsLane<T> {
    pub(super) fn new(channel: Channel, feed: Arc<Feed>, label: &str) -> RsLane<T> {
        RsLane {
            channel,
            waker: Waker::from(feed.clone()),
            feed,
            label: label.to_string(),
            next: 1,
            pending: VecDeque::new(),
            sending: VecDeque::new(),
            returned: HashMap::new(),
            events: Vec::new(),
            closed: None,
        }
    }

    pub fn is_open(&self) -> bool {
        self.closed.is_none() && self.channel.is_open()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn oldest(&self) -> Option<&T> {
        self.pending.front().map(|slot| &slot.to)
    }

    /// Publishes `outgoing`, stamped when mandatory; its verdict comes
    /// with `carried` from [`RsLane::poll_decided`].
    pub fn publish(&mut self, outgoing: RsOutgoing, carried: T) {
        if !self.is_open() {
            let why = self
                .closed
                .clone()
                .unwrap_or_else(|| "channel closed".into());
            self.failed(carried, why);
            return;
        }
        if outgoing.exchange.len() > 255 || outgoing.routing_key.len() > 255 {
            self.failed(
                carried,
                "an exchange or routing key over 255 bytes, which AMQP cannot carry".into(),
            );
            return;
        }
        let number = self.next;
        self.next += 1;
        let stamp = outgoing
            .mandatory
            .then(|| i64::try_from(number).unwrap_or(i64::MAX));
        let RsOutgoing {
            exchange,
            routing_key,
            mandatory,
            mut properties,
            mut headers,
            body,
        } = outgoing;
        if let (Some(stamp), Some(name)) = (stamp, stamp_name()) {
            headers.insert(name, FieldValue::l(stamp));
        }
        if !headers.as_ref().is_empty() {
            properties.with_headers(headers);
        }
        let args = BasicPublishArguments::new(&exchange, &routing_key)
            .mandatory(mandatory)
            .finish();
        let channel = self.channel.clone();
        let sending: Sending =
            Box::pin(async move { channel.basic_publish(properties, body, args).await });
        self.pending.push_back(Slot {
            number,
            stamp,
            to: carried,
            outcome: None,
        });
        self.sending.push_back((number, sending));
        self.send_queued();
    }

    fn failed(&mut self, carried: T, why: String) {
        self.pending.push_back(Slot {
            number: 0,
            stamp: None,
            to: carried,
            outcome: Some(Err(why)),
        });
        self.feed.owner.wake();
    }

    /// Hands amqprs the queued publishes, in order, as far as it takes them.
    fn send_queued(&mut self) {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        while let Some((number, sending)) = self.sending.front_mut() {
            let number = *number;
            match sending.as_mut().poll(&mut cx) {
                Poll::Pending => return,
                Poll::Ready(sent) => {
                    self.sending.pop_front();
                    if let Err(e) = sent {
                        self.mark(number, false, Err(format!("publish failed: {e}")));
                    }
                }
            }
        }
    }

    /// Gives `outcome` to publish `tag`, or with `multiple` to every one up
    /// to it still undecided.
    fn mark(&mut self, tag: u64, multiple: bool, outcome: Result<bool, String>) {
        for slot in self.pending.iter_mut() {
            if slot.number > tag {
                break;
            }
            if slot.number == 0 || slot.outcome.is_some() {
                continue;
            }
            if multiple || slot.number == tag {
                slot.outcome = Some(outcome.clone());
            }
        }
    }

    /// Moves every verdict that can be given now into `decided`, in
    /// publication order; pending while there is none.
    pub fn poll_decided(
        &mut self,
        cx: &mut Context<'_>,
        decided: &mut Vec<(T, Verdict)>,
    ) -> Poll<()> {
        self.feed.owner.register(cx.waker());
        self.send_queued();
        std::mem::swap(&mut self.events, &mut *lock(&self.feed.events));
        let mut events = std::mem::take(&mut self.events);
        for event in events.drain(..) {
            match event {
                Event::Returned {
                    stamp: Some(stamp),
                    reason,
                } => {
                    self.returned.insert(stamp, reason);
                }
                Event::Returned {
                    stamp: None,
                    reason,
                } => tracing::warn!(
                    broker = %self.label,
                    reason,
                    "the broker returned a message this host did not stamp"
                ),
                Event::Confirm { tag, multiple, ack } => self.mark(tag, multiple, Ok(ack)),
                Event::Closed(why) => {
                    if self.closed.is_none() {
                        self.closed = Some(why);
                    }
                }
            }
        }
        self.events = events;
        if let Some(why) = &self.closed {
            // Nothing more will be confirmed: what was not, failed.
            self.sending.clear();
            for slot in self.pending.iter_mut().filter(|s| s.outcome.is_none()) {
                slot.outcome = Some(Err(format!("no confirm: {why}")));
            }
        }
        let before = decided.len();
        while self.pending.front().is_some_and(|s| s.outcome.is_some()) {
            let Some(slot) = self.pending.pop_front() else {
                break;
            };
            let returned = slot.stamp.and_then(|stamp| self.returned.remove(&stamp));
            let verdict = match (slot.outcome, returned) {
                (Some(Err(e)), _) => Verdict::Failed(e),
                (Some(Ok(false)), _) => Verdict::Refused,
                (Some(Ok(true)), Some(reason)) => Verdict::Returned(reason),
                (Some(Ok(true)), None) => Verdict::Delivered,
                (None, _) => Verdict::Failed("decided before its confirm".into()),
            };
            decided.push((slot.to, verdict));
        }
        if decided.len() > before {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Gives up on the lane: what every undecided publish carried, in
    /// order, and the closing of its channel, to run in the background.
    pub fn abandon(self) -> (Vec<T>, impl Future<Output = ()> + Send + 'static) {
        let carried = self.pending.into_iter().map(|slot| slot.to).collect();
        (carried, close_channel(self.channel))
    }

    /// Closes the channel (in the background: amqprs must see the close
    /// through to its answer).
    pub async fn close(self) {
        close_channel(self.channel).await;
    }
}

async fn close_channel(channel: Channel) {
    if channel.is_open() {
        let _ = tokio::spawn(async move { channel.close().await }).await;
    }
}

/// One publish as it goes to the broker, before its number is stamped.
pub struct RsOutgoing {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    properties: BasicProperties,
    headers: FieldTable,
    body: Vec<u8>,
}

impl RsOutgoing {
    /// `p` with what oslo.messaging sets on a message (content type and
    /// encoding, persistent) and its own headers and expiration.
    pub fn new(p: &Publication) -> RsOutgoing {
        let mut properties = BasicProperties::default();
        properties
            .with_content_type("application/json")
            .with_content_encoding("utf-8")
            .with_delivery_mode(2)
            .with_priority(0);
        if let Some(ms) = p.expiration_ms {
            properties.with_expiration(&ms.to_string());
        }
        let mut headers = FieldTable::new();
        for (name, value) in &p.headers {
            if let (Ok(name), Ok(value)) = (
                amqprs::FieldName::try_from(*name),
                amqprs::LongStr::try_from(value.as_str()),
            ) {
                headers.insert(name, FieldValue::S(value));
            }
        }
        RsOutgoing {
            exchange: p.exchange.clone(),
            routing_key: p.routing_key.clone(),
            mandatory: p.mandatory,
            properties: properties.finish(),
            headers,
            body: Vec::from(p.body.as_ref()),
        }
    }
}
