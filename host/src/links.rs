//! A cell's links: its own broker and each neighbour's, and what happens to
//! a publication that a link cannot take now.
//!
//! A relay to a neighbour that is down, stalled or refusing is *parked*: it
//! is published to a durable queue of its own on the cell's own broker,
//! `<queue_base>.park.<neighbour>`, with where it was going in its headers,
//! and the source message is then done with: it is never routed again, so
//! the local delivery and the other neighbours' relays are not repeated. A
//! drainer per neighbour moves parked relays on when the link is back,
//! retrying with backoff and never faster than the neighbour confirms.
//!
//! A mandatory publication that the broker returns (no queue bound for it)
//! is not a delivery: that one action is dead-lettered with the reason.
//!
//! This module knows brokers, queues and headers; it knows nothing of cells
//! semantics: the router decided what to publish where.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use crate::router::{Router, Target, CELL_HEADER, REASON_CODE_HEADER, REASON_HEADER};
use crate::transport::{Broker, Outcome, Publication, PublishError};

/// Where a parked relay was going: the neighbour's exchange and routing key.
pub const PARKED_EXCHANGE_HEADER: &str = "x-cellhost-exchange";
pub const PARKED_ROUTING_KEY_HEADER: &str = "x-cellhost-routing-key";
/// The neighbour a parked or dead-lettered relay was for.
pub const NEIGHBOUR_HEADER: &str = "x-cellhost-neighbour";

/// Parked relays a drainer has in hand at once.
const DRAIN_PREFETCH: u16 = 32;
/// A drainer that cannot publish waits between this and the cap.
const DRAIN_BACKOFF_FIRST: Duration = Duration::from_millis(200);
const DRAIN_BACKOFF_CAP: Duration = Duration::from_secs(10);

/// What became of one publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Confirmed by the broker it was meant for.
    Delivered,
    /// Its neighbour could not take it; it waits in the park queue.
    Parked,
    /// No queue takes it; it went to the dead-letter queue with the reason.
    DeadLettered,
}

/// The brokers a cell publishes to.
pub struct Links {
    cell: String,
    queue_base: String,
    pub own: Broker,
    /// Swapped whole when the neighbours change. Each broker is shared
    /// with the publications using it, so a removed one is closed only once
    /// no relay to it is in flight.
    neighbours: ArcSwap<HashMap<String, Arc<Broker>>>,
    /// Where parked, unparked and unroutable publications are counted.
    router: Arc<Router>,
}

impl Links {
    pub fn new(router: Arc<Router>, own: Broker, neighbours: HashMap<String, Broker>) -> Links {
        Links {
            cell: router.cell_name().to_string(),
            queue_base: router.config().cell.queue_base.clone(),
            own,
            neighbours: ArcSwap::from_pointee(
                neighbours
                    .into_iter()
                    .map(|(name, broker)| (name, Arc::new(broker)))
                    .collect(),
            ),
            router,
        }
    }

    /// The queue on the own broker where relays for `neighbour` wait.
    pub fn park_queue(&self, neighbour: &str) -> String {
        park_queue(&self.queue_base, neighbour)
    }

    fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue_base)
    }

    /// The neighbours' brokers now.
    pub fn neighbours(&self) -> Arc<HashMap<String, Arc<Broker>>> {
        self.neighbours.load_full()
    }

    /// The broker of neighbour `name` now, if it has one.
    pub fn neighbour(&self, name: &str) -> Option<Arc<Broker>> {
        self.neighbours.load().get(name).cloned()
    }

    /// Makes `neighbours` the brokers relays go to.
    pub fn set_neighbours(&self, neighbours: HashMap<String, Arc<Broker>>) {
        self.neighbours.store(Arc::new(neighbours));
    }

    /// Publishes one publication of a plan where it goes; parks a relay
    /// whose neighbour cannot take it; dead-letters what no queue takes.
    /// An error means it is nowhere safe: the source must not be acked.
    /// Parking and dead-lettering wait in futures of their own, so that the
    /// common road keeps a small future per message in flight.
    pub async fn send(
        &self,
        target: &Target,
        publication: Publication,
    ) -> Result<Sent, PublishError> {
        let published = match target {
            Target::Own => self.own.publish(&publication).await,
            Target::Neighbour(name) => {
                let Some(broker) = self.neighbours.load().get(name).cloned() else {
                    let reason = format!("no link to neighbour {name}");
                    return Box::pin(self.dead_letter(publication.body, Some(name), &reason)).await;
                };
                if let Some(error) = broker.down_because() {
                    let reason = if error.is_empty() {
                        format!("the link to {name} is down")
                    } else {
                        format!("the link to {name} is down: {error}")
                    };
                    return Box::pin(self.park(name, publication, &reason)).await;
                }
                broker.publish(&publication).await
            }
        };
        match published {
            Ok(()) => Ok(Sent::Delivered),
            Err(e) => Box::pin(self.failed(target, publication, e)).await,
        }
    }

    /// What becomes of a publication its broker did not take (`error`): one
    /// that no queue takes is dead-lettered, a relay the neighbour could not
    /// take is parked, and a failure of the own broker is the caller's.
    pub async fn failed(
        &self,
        target: &Target,
        publication: Publication,
        error: PublishError,
    ) -> Result<Sent, PublishError> {
        match (target, error) {
            (Target::Own, e @ PublishError::Unroutable { .. })
                if publication.routing_key != self.dead_letter_queue() =>
            {
                self.dead_letter(publication.body, None, &e.to_string())
                    .await
            }
            (Target::Own, e) => Err(e),
            (Target::Neighbour(name), e @ PublishError::Unroutable { .. }) => {
                self.dead_letter(publication.body, Some(name), &e.to_string())
                    .await
            }
            (Target::Neighbour(name), e) => self.park(name, publication, &e.to_string()).await,
        }
    }

    /// Puts a relay for `neighbour` in its park queue on the own broker.
    async fn park(
        &self,
        neighbour: &str,
        relay: Publication,
        reason: &str,
    ) -> Result<Sent, PublishError> {
        let parked = Publication::new("", self.park_queue(neighbour), relay.body)
            .with_header(PARKED_EXCHANGE_HEADER, relay.exchange)
            .with_header(PARKED_ROUTING_KEY_HEADER, relay.routing_key)
            .with_header(NEIGHBOUR_HEADER, neighbour)
            .with_header(REASON_HEADER, truncate(reason))
            .with_header(CELL_HEADER, self.cell.clone())
            .mandatory();
        self.own.publish(&parked).await?;
        self.router.stats.parked.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(cell = %self.cell, neighbour, reason, "relay parked");
        Ok(Sent::Parked)
    }

    /// Dead-letters one publication that no queue takes.
    async fn dead_letter(
        &self,
        body: Bytes,
        neighbour: Option<&str>,
        reason: &str,
    ) -> Result<Sent, PublishError> {
        self.router.stats.unroutable.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(cell = %self.cell, neighbour = neighbour.unwrap_or("-"), reason, "publication dead-lettered");
        let mut dead = Publication::new("", self.dead_letter_queue(), body)
            .with_header(REASON_HEADER, truncate(reason))
            .with_header(REASON_CODE_HEADER, "unroutable")
            .with_header(CELL_HEADER, self.cell.clone())
            .mandatory();
        if let Some(neighbour) = neighbour {
            dead = dead.with_header(NEIGHBOUR_HEADER, neighbour);
        }
        self.own.publish(&dead).await?;
        Ok(Sent::DeadLettered)
    }

    /// Moves the relays parked for `neighbour` on to it, for as long as the
    /// cell runs: each is acked from the park queue only once the
    /// neighbour's broker confirmed it.
    pub async fn drain_parked(
        self: Arc<Self>,
        neighbour: String,
        broker: Arc<Broker>,
        mut stop: watch::Receiver<bool>,
    ) {
        let queue = self.park_queue(&neighbour);
        let tag = format!("cellhost-{}-park-{neighbour}", self.cell);
        let mut inbox = match self
            .own
            .consume(std::slice::from_ref(&queue), DRAIN_PREFETCH, &tag)
            .await
        {
            Ok(inbox) => inbox,
            Err(e) => {
                tracing::error!(cell = %self.cell, %queue, error = %format!("{e:#}"), "cannot drain parked relays");
                return;
            }
        };
        let mut failures: u32 = 0;
        loop {
            let mut parked = tokio::select! {
                _ = stop.changed() => return,
                parked = inbox.next() => match parked {
                    Some(parked) => parked,
                    None => return,
                },
            };
            tokio::select! {
                _ = stop.changed() => return,
                _ = broker.until_up() => {}
            }
            let exchange = parked
                .header(PARKED_EXCHANGE_HEADER)
                .unwrap_or_default()
                .to_string();
            let routing_key = parked
                .header(PARKED_ROUTING_KEY_HEADER)
                .unwrap_or_default()
                .to_string();
            let relay = Publication::new(exchange, routing_key, std::mem::take(&mut parked.body))
                .mandatory();
            let outcome = match broker.publish(&relay).await {
                Ok(()) => Ok(Sent::Delivered),
                Err(e @ PublishError::Unroutable { .. }) => {
                    // The body is shared, not copied: the parked one is
                    // kept for a retry should this fail too.
                    let reason = e.to_string();
                    self.dead_letter(relay.body.clone(), Some(&neighbour), &reason)
                        .await
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(_) => {
                    failures = 0;
                    self.router.stats.unparked.fetch_add(1, Ordering::Relaxed);
                    parked.settle(Outcome::Ack);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures % 50 == 0 {
                        tracing::warn!(cell = %self.cell, %neighbour, error = %e, attempts = failures, "parked relay not moved yet");
                    }
                    let wait = DRAIN_BACKOFF_FIRST
                        .saturating_mul(1u32 << failures.min(8))
                        .min(DRAIN_BACKOFF_CAP);
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    parked.body = relay.body.into();
                    parked.settle(Outcome::Requeue);
                }
            }
        }
    }
}

/// The park queue of `neighbour` for a cell whose queues start with `queue_base`.
pub fn park_queue(queue_base: &str, neighbour: &str) -> String {
    format!("{queue_base}.park.{neighbour}")
}

fn truncate(s: &str) -> String {
    s.chars().take(1000).collect()
}
