//! A consumer's own lanes to the brokers its plans publish to: the road most
//! messages take.
//!
//! Most plans are one publication (a relay to one neighbour, or a delivery
//! here) and nothing else to do. A consumer publishes those on a confirm
//! channel of its own per broker (a [`Lane`]) and collects their verdicts in
//! its own loop, in order: no task between the broker's confirm and the
//! source's acknowledgement, and no future per message.
//!
//! Anything else takes the links' road ([`crate::links::Links::send`]), which
//! parks, dead-letters and requeues: a plan that is more than one plain
//! publication, and a target whose link is down or has no lane open yet.
//! A publish a lane does not see confirmed and routed is concluded there
//! too ([`crate::links::Links::failed`]) without being published again:
//! parked, dead-lettered or requeued as the links' road decides for any
//! publication its broker did not take. A parked copy of one the lane's
//! broker took after all is a duplicate, which the next cell drops by its
//! uuid.
//!
//! A lane is opened in the background the first time a target is used, and
//! again whenever its channel or its connection is gone. A lane whose
//! oldest publish waits longer than the broker's publish timeout (a stalled
//! link) is given up: every publish in it takes the links' road.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::FutureExt;
use tokio::task::JoinHandle;

use crate::links::Links;
use crate::router::{Plan, Target};
use crate::transport::amqp::AmqpBroker;
use crate::transport::{Broker, Inbound, Lane, PublishError, Verdict};

/// How long after a lane failed to open the next attempt is made.
const REOPEN_PAUSE: Duration = Duration::from_secs(1);
/// How long closing a given-up lane's channel may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// One message on a lane: its plan (with the publication, should it take
/// the links' road after all), its source, and when it was published.
pub struct Carried {
    pub plan: Plan,
    pub inbound: Inbound,
    at: Instant,
}

/// A consumer's lanes, one per target at most.
pub struct Lanes {
    links: Arc<Links>,
    lanes: Vec<(Target, LaneState)>,
    /// Publishes decided or given up, with their outcome, not taken yet.
    decided: Vec<(Carried, Result<(), PublishError>)>,
    /// A lane's verdicts, before they are judged.
    verdicts: Vec<(Carried, Verdict)>,
    /// Undecided publishes on all lanes.
    in_flight: usize,
}

enum LaneState {
    Opening(JoinHandle<Result<Lane<Carried>>>),
    Open {
        lane: Lane<Carried>,
        amqp: AmqpBroker,
        /// The neighbour's broker the lane was opened on: a lane outlives
        /// no change of neighbours.
        broker: Option<Arc<Broker>>,
    },
    Closed {
        retry_at: Instant,
    },
}

impl Lanes {
    pub fn new(links: Arc<Links>) -> Lanes {
        Lanes {
            links,
            lanes: Vec::new(),
            decided: Vec::new(),
            verdicts: Vec::new(),
            in_flight: 0,
        }
    }

    /// Publishes not decided yet, on every lane.
    pub fn len(&self) -> usize {
        self.in_flight
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight == 0 && self.decided.is_empty()
    }

    /// Takes `plan` onto a lane if it is one plain publication and the lane
    /// to its target is open; gives it back otherwise, for the links' road.
    pub fn offer(&mut self, plan: Plan, inbound: Inbound) -> Option<(Plan, Inbound)> {
        let plain = plan.sends.len() == 1
            && plan.respond.is_none()
            && plan.arrived.is_none()
            && plan.requeue_after.is_none()
            && !plan.reject;
        if !plain {
            return Some((plan, inbound));
        }
        let target = &plan.sends[0].0;
        let Some((amqp, neighbour)) = self.broker_of(target) else {
            return Some((plan, inbound));
        };
        let at = match self.lanes.iter().position(|(t, _)| t == target) {
            Some(at) => at,
            None => {
                self.lanes.push((
                    target.clone(),
                    LaneState::Closed {
                        retry_at: Instant::now(),
                    },
                ));
                self.lanes.len() - 1
            }
        };
        if !self.ready(at, &amqp, neighbour.as_ref()) {
            return Some((plan, inbound));
        }
        let LaneState::Open { lane, .. } = &mut self.lanes[at].1 else {
            return Some((plan, inbound));
        };
        let outgoing = AmqpBroker::outgoing(&plan.sends[0].1);
        let carried = Carried {
            plan,
            inbound,
            at: Instant::now(),
        };
        lane.publish(outgoing, carried);
        self.in_flight += 1;
        None
    }

    /// The AMQP broker `target` publishes to now, while its link is up, and
    /// for a neighbour its shared handle.
    fn broker_of(&self, target: &Target) -> Option<(AmqpBroker, Option<Arc<Broker>>)> {
        let (broker, neighbour) = match target {
            Target::Own => (self.links.own.clone(), None),
            Target::Neighbour(name) => {
                let shared = self.links.neighbour(name)?;
                ((*shared).clone(), Some(shared))
            }
        };
        match broker {
            Broker::Amqp(amqp) if amqp.down_because().is_none() => Some((amqp, neighbour)),
            _ => None,
        }
    }

    /// Whether lane `at` is open on `amqp` (the same neighbour's broker as
    /// `neighbour`); opens it in the background, or gives it up, as needed.
    fn ready(&mut self, at: usize, amqp: &AmqpBroker, neighbour: Option<&Arc<Broker>>) -> bool {
        if let LaneState::Opening(opening) = &mut self.lanes[at].1 {
            let Some(opened) = opening.now_or_never() else {
                return false;
            };
            self.lanes[at].1 = match opened {
                Ok(Ok(lane)) => LaneState::Open {
                    lane,
                    amqp: amqp.clone(),
                    broker: neighbour.cloned(),
                },
                Ok(Err(e)) => {
                    tracing::debug!(error = %format!("{e:#}"), "a relay lane did not open; the links' road is taken meanwhile");
                    closed()
                }
                Err(_) => closed(),
            };
        }
        if let LaneState::Open { lane, broker, .. } = &self.lanes[at].1 {
            let same_broker = match (broker, neighbour) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if lane.is_open() && same_broker {
                return true;
            }
            self.give_up(at, "its channel closed or its broker changed");
        }
        if let LaneState::Closed { retry_at } = &self.lanes[at].1 {
            if Instant::now() >= *retry_at {
                let amqp = amqp.clone();
                let timeout = amqp.publish_timeout();
                self.lanes[at].1 = LaneState::Opening(tokio::spawn(async move {
                    tokio::time::timeout(timeout, amqp.open_lane())
                        .await
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("opening took over {timeout:?}")))
                }));
            }
        }
        false
    }

    /// Gives up lane `at`: every publish still in it takes the links' road,
    /// and its channel is closed in the background.
    fn give_up(&mut self, at: usize, why: &str) {
        let state = std::mem::replace(&mut self.lanes[at].1, closed());
        let LaneState::Open { lane, amqp, .. } = state else {
            self.lanes[at].1 = state;
            return;
        };
        let (carried, channel) = lane.abandon();
        if !carried.is_empty() {
            tracing::warn!(
                target = ?self.lanes[at].0,
                publishes = carried.len(),
                why,
                "a relay lane was given up; its publishes take the links' road"
            );
        }
        self.in_flight -= carried.len();
        self.decided.extend(carried.into_iter().map(|c| {
            let verdict = Verdict::Failed(format!("the lane was given up: {why}"));
            let outcome = amqp.judge(&c.plan.sends[0].1, verdict);
            (c, outcome)
        }));
        tokio::spawn(async move {
            let closing = channel.close(200, "cellhost gave the lane up".into());
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
        });
    }

    /// Gives up every lane whose oldest publish has waited past its
    /// broker's publish timeout; `timeout` is that of the own broker, which
    /// every link shares.
    pub fn expire(&mut self, timeout: Duration) {
        for at in 0..self.lanes.len() {
            let late = match &self.lanes[at].1 {
                LaneState::Open { lane, .. } => {
                    lane.oldest().is_some_and(|c| c.at.elapsed() > timeout)
                }
                _ => false,
            };
            if late {
                self.give_up(
                    at,
                    "no confirm within the publish timeout (is the link stalled?)",
                );
            }
        }
    }

    /// Ready once there are verdicts to take.
    pub fn poll_decided(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        for (_, state) in &mut self.lanes {
            if let LaneState::Open { lane, amqp, .. } = state {
                let _ = lane.poll_decided(cx, &mut self.verdicts);
                self.in_flight -= self.verdicts.len();
                self.decided
                    .extend(self.verdicts.drain(..).map(|(c, verdict)| {
                        let outcome = amqp.judge(&c.plan.sends[0].1, verdict);
                        (c, outcome)
                    }));
            }
        }
        if self.decided.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// The outcomes of the publishes decided so far, in each lane's order.
    pub fn take_decided(&mut self, into: &mut Vec<(Carried, Result<(), PublishError>)>) {
        into.append(&mut self.decided);
    }
}

fn closed() -> LaneState {
    LaneState::Closed {
        retry_at: Instant::now() + REOPEN_PAUSE,
    }
}
