//! A publisher channel whose confirms each reach their own publish, with the
//! broker's return when there was one.
//!
//! lapin numbers a publish and queues its frames under two locks, and it
//! gives a returned message (`basic.return`) to whichever confirm it resolves
//! next, not to the publish the broker returned. Under concurrent publishing
//! both pair an outcome with the wrong message: an unroutable relay counted
//! as delivered is lost. So a [`Publisher`]:
//!
//! - numbers each publish and queues its frames under one lock, so that the
//!   broker's delivery tags follow our numbers;
//! - stamps each mandatory publish with its number in a header, which the
//!   broker sends back on a return, so a returned message names its publish
//!   whichever confirm lapin hands it to;
//! - gives each publish its verdict from one task per channel, in number
//!   order, and only once every earlier confirm is in.
//!
//! Why the last step is enough: the broker sends a message's return before
//! its confirm, and returns in publication order; lapin queues returns as
//! they come and hands the oldest to each confirm it resolves, one at a
//! time, on its one I/O thread. Once every confirm up to number `n` has
//! resolved, every return of a publish up to `n` has therefore been handed
//! to a confirm that resolved no later. The task polls every confirm still
//! open after it saw that prefix resolve, so it has read every stamp the
//! prefix's verdicts depend on before it gives them.
//!
//! A [`Lane`] is the same pairing owned by one task: a confirm channel of
//! its own, whose verdicts its owner collects in its own loop with
//! [`Lane::poll_decided`], each with what the owner carried along with the
//! publish. No task of its own, no channel to hand a verdict over: the
//! confirm wakes the owner directly.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use futures::task::AtomicWaker;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, PublisherConfirm};
use tokio::sync::oneshot;

use crate::lock;

/// The header a mandatory publish carries its number in.
pub const STAMP_HEADER: &str = "x-cellhost-publish";

/// What became of one publish.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The broker confirmed it and did not return it.
    Delivered,
    /// The broker returned it (no queue took it): its reply code and text.
    Returned(String),
    /// The broker confirmed it negatively.
    Refused,
    /// The channel or the connection failed before the broker confirmed it.
    Failed(String),
}

/// A publisher channel in confirm mode and the task that pairs its confirms.
pub struct Publisher {
    channel: Arc<Channel>,
    shared: Arc<Shared>,
}

/// What a publisher and its pairing task share.
struct Shared {
    /// Held while a publish is numbered, its frames queued and its slot
    /// left for the pairing task, so that the task, once it has taken the
    /// lock, knows of every publish the broker could have confirmed.
    numbering: std::sync::Mutex<Numbering>,
    wakes: Arc<Wakes>,
}

/// The publishes whose confirm (or frames) may have moved on, and the task
/// that pairs them.
struct Wakes {
    numbers: std::sync::Mutex<Vec<i64>>,
    task: AtomicWaker,
}

impl Wakes {
    fn new() -> Arc<Wakes> {
        Arc::new(Wakes {
            numbers: std::sync::Mutex::new(Vec::new()),
            task: AtomicWaker::new(),
        })
    }
}

struct Numbering {
    next: i64,
    /// Publishes the task has not taken yet, in number order.
    arrived: Vec<Slot<oneshot::Sender<Verdict>>>,
    /// The publisher is gone: no more will arrive.
    closed: bool,
}

impl Publisher {
    /// Wraps `channel` (already in confirm mode) and starts its pairing
    /// task, which ends once the publisher is dropped and every publish made
    /// through it has its verdict.
    pub fn new(channel: Channel, label: &str) -> Self {
        let shared = Arc::new(Shared {
            numbering: std::sync::Mutex::new(Numbering {
                next: 1,
                arrived: Vec::new(),
                closed: false,
            }),
            wakes: Wakes::new(),
        });
        tokio::spawn(pair_confirms(shared.clone(), label.to_string()));
        Publisher {
            channel: Arc::new(channel),
            shared,
        }
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `outgoing`; the receiver hears the verdict. Dropping the
    /// receiver does not stop the publish: its confirm is still awaited, so
    /// that it cannot take another publish's return.
    pub fn publish(&self, outgoing: Outgoing) -> oneshot::Receiver<Verdict> {
        let (verdict, heard) = oneshot::channel();
        let mut numbering = lock(&self.shared.numbering);
        let number = numbering.next;
        numbering.next += 1;
        let (stamp, publishing) = outgoing.begin(&self.channel, number);
        // The first poll numbers the publish and queues its frames; the
        // pairing task polls it on from there, first when it takes it.
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        numbering.arrived.push(Slot {
            number,
            stamp,
            state: first_poll(publishing, &mut cx),
            to: verdict,
            waker: None,
        });
        drop(numbering);
        self.shared.wakes.task.wake();
        heard
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        lock(&self.shared.numbering).closed = true;
        self.shared.wakes.task.wake();
    }
}

type Publishing = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// One publish as it goes to the broker, before its number is stamped.
pub struct Outgoing {
    pub(super) exchange: ShortString,
    pub(super) routing_key: ShortString,
    pub(super) options: BasicPublishOptions,
    pub(super) body: Bytes,
    pub(super) headers: FieldTable,
    pub(super) properties: BasicProperties,
}

impl Outgoing {
    /// Its stamp (`number`, when it is mandatory) and its future on
    /// `channel`, not yet polled: lapin numbers it and queues its frames on
    /// the first poll.
    fn begin(self, channel: &Arc<Channel>, number: i64) -> (Option<i64>, Publishing) {
        let Outgoing {
            exchange,
            routing_key,
            options,
            body,
            mut headers,
            properties,
        } = self;
        let stamp = options.mandatory.then_some(number);
        if let Some(stamp) = stamp {
            headers.insert(STAMP_HEADER.into(), AMQPValue::LongLongInt(stamp));
        }
        let properties = properties.with_headers(headers);
        let channel = channel.clone();
        let publishing = Box::pin(async move {
            channel
                .basic_publish(exchange, routing_key, options, &body, properties)
                .await
        });
        (stamp, publishing)
    }
}

/// Polls a publish for the first time, which numbers it and queues its
/// frames: where it stands after that.
fn first_poll(mut publishing: Publishing, cx: &mut Context<'_>) -> State {
    match publishing.as_mut().poll(cx) {
        Poll::Pending => State::Publishing(publishing),
        Poll::Ready(Ok(confirm)) => State::Confirming(confirm),
        Poll::Ready(Err(e)) => State::Done(Err(format!("publish failed: {e}"))),
    }
}

/// One publish on its way to its verdict, and `to`, who hears it.
struct Slot<R> {
    number: i64,
    stamp: Option<i64>,
    state: State,
    to: R,
    /// Files the slot's number in [`Wakes`]; given when the pairing task
    /// takes the slot.
    waker: Option<Waker>,
}

enum State {
    /// Frames not yet written.
    Publishing(Publishing),
    /// Waiting for the broker's confirm.
    Confirming(PublisherConfirm),
    /// Confirmed (`Ok(acked)`) or failed.
    Done(Result<bool, String>),
}

/// Wakes the pairing task with the number of the publish that moved.
struct SlotWaker {
    number: i64,
    wakes: Arc<Wakes>,
}

impl SlotWaker {
    fn waker(number: i64, wakes: &Arc<Wakes>) -> Waker {
        Waker::from(Arc::new(SlotWaker {
            number,
            wakes: wakes.clone(),
        }))
    }
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        lock(&self.wakes.numbers).push(self.number);
        self.wakes.task.wake();
    }
}

impl<R> Slot<R> {
    fn is_done(&self) -> bool {
        matches!(self.state, State::Done(_))
    }

    /// Moves the publish on as far as it goes now, filing the stamp of any
    /// returned message its confirm carries (whichever publish that was).
    /// `decided` is the number of the first publish not yet decided.
    fn poll(&mut self, returned: &mut HashMap<i64, String>, decided: i64, label: &str) {
        let Some(waker) = &self.waker else {
            return;
        };
        let mut cx = Context::from_waker(waker);
        if let State::Publishing(publishing) = &mut self.state {
            match publishing.as_mut().poll(&mut cx) {
                Poll::Pending => return,
                Poll::Ready(Ok(confirm)) => self.state = State::Confirming(confirm),
                Poll::Ready(Err(e)) => {
                    self.state = State::Done(Err(format!("publish failed: {e}")));
                    return;
                }
            }
        }
        let State::Confirming(confirm) = &mut self.state else {
            return;
        };
        let confirmation = match Pin::new(confirm).poll(&mut cx) {
            Poll::Pending => return,
            Poll::Ready(confirmation) => confirmation,
        };
        self.waker = None;
        self.state = State::Done(match confirmation {
            Ok(confirmation) => {
                let acked = !confirmation.is_nack();
                if let Some(message) = confirmation.take_message() {
                    let reason = format!("{} {}", message.reply_code, message.reply_text);
                    match stamp_of(message.delivery.properties.headers().as_ref()) {
                        // Not seen with RabbitMQ, which returns a message
                        // before confirming it; said aloud if ever seen.
                        Some(stamp) if stamp < decided => tracing::error!(
                            broker = %label,
                            stamp,
                            reason,
                            "a message was returned after it was counted delivered"
                        ),
                        Some(stamp) => {
                            returned.insert(stamp, reason);
                        }
                        None => tracing::warn!(
                            broker = %label,
                            reason,
                            "the broker returned a message this host did not stamp"
                        ),
                    }
                }
                Ok(acked)
            }
            Err(e) => Err(format!("no confirm: {e}")),
        });
    }

    /// The verdict, once done; every return filed so far is all there will
    /// be for this publish.
    fn decide(self, returned: &mut HashMap<i64, String>) -> (R, Verdict) {
        let return_reason = self.stamp.and_then(|stamp| returned.remove(&stamp));
        let verdict = match (self.state, return_reason) {
            (State::Done(Err(e)), _) => Verdict::Failed(e),
            (State::Done(Ok(false)), _) => Verdict::Refused,
            (State::Done(Ok(true)), Some(reason)) => Verdict::Returned(reason),
            (State::Done(Ok(true)), None) => Verdict::Delivered,
            // Not reached: only a slot seen done is decided.
            (_, _) => Verdict::Failed("decided before its confirm".into()),
        };
        (self.to, verdict)
    }
}

/// The stamp a returned message carries, if it is one of ours.
fn stamp_of(headers: Option<&FieldTable>) -> Option<i64> {
    match headers?.inner().get(STAMP_HEADER)? {
        AMQPValue::LongLongInt(stamp) => Some(*stamp),
        _ => None,
    }
}

/// Gives each publish of one channel its verdict, in number order.
///
/// A publish is decided once it and every earlier one are seen done, and
/// after that, every publish that arrived or was woken has been polled
/// again: lapin wakes a confirm's waker when it resolves it, on the same
/// thread and before it resolves the next, so by then every confirm lapin
/// resolved before the decided ones has been seen, with its return.
async fn pair_confirms(shared: Arc<Shared>, label: String) {
    let mut pending: VecDeque<Slot<oneshot::Sender<Verdict>>> = VecDeque::new();
    // Stamps of returned messages, with the broker's reason, until their
    // publish is decided.
    let mut returned: HashMap<i64, String> = HashMap::new();
    let mut closed = false;
    let mut woken = Vec::new();
    // Swapped with the publisher's list of new publishes each round, so
    // that neither list is allocated again as publishes keep coming.
    let mut arrived: Vec<Slot<oneshot::Sender<Verdict>>> = Vec::new();
    // The number of the first publish not decided yet.
    let mut decided: i64 = 1;
    std::future::poll_fn(|cx| {
        shared.wakes.task.register(cx.waker());
        loop {
            // The publishes at the front already seen done: decided at the
            // end of this round.
            let seen_done = pending.iter().take_while(|s| s.is_done()).count();
            {
                let mut numbering = lock(&shared.numbering);
                closed = numbering.closed;
                std::mem::swap(&mut arrived, &mut numbering.arrived);
            }
            for mut slot in arrived.drain(..) {
                slot.waker = Some(SlotWaker::waker(slot.number, &shared.wakes));
                slot.poll(&mut returned, decided, &label);
                pending.push_back(slot);
            }
            poll_woken(
                &shared.wakes,
                &mut woken,
                &mut pending,
                &mut returned,
                decided,
                &label,
            );
            for slot in pending.drain(..seen_done) {
                decided = slot.number + 1;
                let (verdict, given) = slot.decide(&mut returned);
                // The caller may have given up waiting (publish timeout).
                let _ = verdict.send(given);
            }
            if !pending.front().is_some_and(Slot::is_done) {
                break;
            }
        }
        if closed && pending.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    if !returned.is_empty() {
        tracing::warn!(broker = %label, stamps = ?returned.keys().collect::<Vec<_>>(), "returned messages matched no publish");
    }
}

/// Polls every publish woken since the last call (and any woken meanwhile)
/// until no more wakes are filed.
fn poll_woken<R>(
    wakes: &Wakes,
    woken: &mut Vec<i64>,
    pending: &mut VecDeque<Slot<R>>,
    returned: &mut HashMap<i64, String>,
    decided: i64,
    label: &str,
) {
    let first = pending.front().map_or(0, |s| s.number);
    loop {
        std::mem::swap(woken, &mut *lock(&wakes.numbers));
        if woken.is_empty() {
            return;
        }
        for number in woken.drain(..) {
            let at = usize::try_from(number - first).ok();
            if let Some(slot) = at.and_then(|at| pending.get_mut(at)) {
                slot.poll(returned, decided, label);
            }
        }
    }
}

/// A confirm channel owned by one task, which publishes on it and collects
/// each publish's verdict in order, with the `T` it carried along, by
/// polling [`Lane::poll_decided`] in its own loop. Verdicts are given by
/// the same rule as the shared [`Publisher`]'s pairing task.
pub struct Lane<T> {
    channel: Arc<Channel>,
    label: String,
    wakes: Arc<Wakes>,
    next: i64,
    /// Publishes not decided yet, in number order.
    pending: VecDeque<Slot<T>>,
    returned: HashMap<i64, String>,
    decided: i64,
    woken: Vec<i64>,
}

impl<T> Lane<T> {
    /// Wraps `channel`, already in confirm mode and used by nothing else.
    pub fn new(channel: Channel, label: &str) -> Lane<T> {
        Lane {
            channel: Arc::new(channel),
            label: label.to_string(),
            wakes: Wakes::new(),
            next: 1,
            pending: VecDeque::new(),
            returned: HashMap::new(),
            decided: 1,
            woken: Vec::new(),
        }
    }

    /// Whether the channel is open: a lane whose channel closed publishes
    /// nothing more, and gives its undecided publishes failed verdicts.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes not decided yet.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// What the oldest undecided publish carries.
    pub fn oldest(&self) -> Option<&T> {
        self.pending.front().map(|slot| &slot.to)
    }

    /// Publishes `outgoing`, stamped when mandatory; its verdict comes
    /// with `carried` from [`Lane::poll_decided`]. The frames are queued
    /// before this returns.
    pub fn publish(&mut self, outgoing: Outgoing, carried: T) {
        let number = self.next;
        self.next += 1;
        let (stamp, publishing) = outgoing.begin(&self.channel, number);
        let waker = SlotWaker::waker(number, &self.wakes);
        let state = first_poll(publishing, &mut Context::from_waker(&waker));
        let mut slot = Slot {
            number,
            stamp,
            state,
            to: carried,
            waker: Some(waker),
        };
        if let State::Confirming(_) = slot.state {
            // Its frames are queued: poll the confirm, so a confirm lapin
            // resolves from now on files a wake.
            slot.poll(&mut self.returned, self.decided, &self.label);
        }
        self.pending.push_back(slot);
    }

    /// Moves every verdict that can be given now into `decided`, in
    /// publication order; pending while there is none.
    pub fn poll_decided(
        &mut self,
        cx: &mut Context<'_>,
        decided: &mut Vec<(T, Verdict)>,
    ) -> Poll<()> {
        self.wakes.task.register(cx.waker());
        let before = decided.len();
        loop {
            // As the pairing task: what is seen done before the wakes are
            // drained is decided after.
            let seen_done = self.pending.iter().take_while(|s| s.is_done()).count();
            poll_woken(
                &self.wakes,
                &mut self.woken,
                &mut self.pending,
                &mut self.returned,
                self.decided,
                &self.label,
            );
            for slot in self.pending.drain(..seen_done) {
                self.decided = slot.number + 1;
                decided.push(slot.decide(&mut self.returned));
            }
            if !self.pending.front().is_some_and(Slot::is_done) {
                break;
            }
        }
        if decided.len() > before {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Gives up on the lane: what every undecided publish carried, in
    /// order, and the channel, for the caller to close (its publishes may
    /// still reach the broker).
    pub fn abandon(self) -> (Vec<T>, Arc<Channel>) {
        let carried = self.pending.into_iter().map(|slot| slot.to).collect();
        (carried, self.channel)
    }
}
