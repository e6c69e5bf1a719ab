//! The in-process transport behind `memory://<name>`: a small broker with the
//! AMQP routing the host relies on (the default exchange, topic exchanges
//! matched on the exact routing key, fanout exchanges), so several cells run
//! in one process on the same code paths as over RabbitMQ.
//!
//! Brokers are found by name in a process-wide registry, so every cell whose
//! URL says `memory://demo` shares one broker, as cells sharing a RabbitMQ
//! would. Publishing is confirmed as soon as the message is queued.

use crate::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Result};
use tokio::sync::mpsc;

use super::{ExchangeKind, Inbound, Inbox, Outcome, Publication, PublishError, Settle};

/// A queued message: its body and the per-message TTL it was published with,
/// which the consumer sees as an AMQP consumer sees `expiration`.
struct Body {
    bytes: Vec<u8>,
    expiration_ms: Option<u64>,
    headers: Vec<(String, String)>,
}

/// A handle on one named in-process broker.
#[derive(Clone)]
pub struct MemoryBroker {
    name: Arc<str>,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    exchanges: HashMap<String, ExchangeKind>,
    /// Exchange name to its bindings: (routing key, queue).
    bindings: HashMap<String, Vec<(String, String)>>,
    queues: HashMap<String, Queue>,
}

struct Queue {
    tx: mpsc::UnboundedSender<Body>,
    /// Taken by the one consumer a memory queue may have.
    rx: Option<mpsc::UnboundedReceiver<Body>>,
}

fn registry() -> &'static Mutex<HashMap<String, MemoryBroker>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, MemoryBroker>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

impl MemoryBroker {
    /// The broker called `name` in this process, created on first use.
    pub fn named(name: &str) -> MemoryBroker {
        let mut brokers = lock(registry());
        brokers
            .entry(name.to_string())
            .or_insert_with(|| MemoryBroker {
                name: name.into(),
                state: Arc::default(),
            })
            .clone()
    }

    pub fn declare_exchange(&self, name: &str, kind: ExchangeKind) {
        lock(&self.state)
            .exchanges
            .entry(name.to_string())
            .or_insert(kind);
    }

    pub fn declare_queue(&self, queue: &str, exchange: &str, routing_key: &str) {
        let mut state = lock(&self.state);
        state.queues.entry(queue.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            Queue { tx, rx: Some(rx) }
        });
        if !exchange.is_empty() {
            let bindings = state.bindings.entry(exchange.to_string()).or_default();
            let binding = (routing_key.to_string(), queue.to_string());
            if !bindings.contains(&binding) {
                bindings.push(binding);
            }
        }
    }

    pub fn consume(&self, queues: &[String]) -> Result<Inbox> {
        let mut state = lock(&self.state);
        let mut streams = Vec::new();
        for name in queues {
            let Some(queue) = state.queues.get_mut(name) else {
                bail!("memory://{}: no queue {name:?}", self.name);
            };
            let Some(rx) = queue.rx.take() else {
                bail!(
                    "memory://{}: queue {name:?} already has a consumer",
                    self.name
                );
            };
            let requeue = queue.tx.clone();
            streams.push(futures::stream::unfold(
                (rx, requeue),
                |(mut rx, requeue)| async move {
                    let body = rx.recv().await?;
                    let inbound = Inbound {
                        body: body.bytes,
                        expiration_ms: body.expiration_ms,
                        headers: body.headers,
                        redelivered: false,
                        settle: Settle::Memory(Settler {
                            requeue: requeue.clone(),
                        }),
                    };
                    Some((inbound, (rx, requeue)))
                },
            ));
        }
        Ok(Box::pin(futures::stream::select_all(
            streams.into_iter().map(Box::pin),
        )))
    }

    pub fn publish(&self, p: &Publication) -> Result<(), PublishError> {
        let state = lock(&self.state);
        let targets: Vec<&str> = if p.exchange.is_empty() {
            vec![p.routing_key.as_str()]
        } else {
            let fanout = state.exchanges.get(&p.exchange) == Some(&ExchangeKind::Fanout);
            match state.bindings.get(&p.exchange) {
                Some(bindings) => bindings
                    .iter()
                    .filter(|(key, _)| fanout || *key == p.routing_key)
                    .map(|(_, queue)| queue.as_str())
                    .collect(),
                None if state.exchanges.contains_key(&p.exchange) => Vec::new(),
                None => {
                    return Err(PublishError::Unavailable(format!(
                        "memory://{}: no exchange {:?}",
                        self.name, p.exchange
                    )))
                }
            }
        };
        let mut routed = false;
        for target in targets {
            if let Some(queue) = state.queues.get(target) {
                let body = Body {
                    bytes: p.body.to_vec(),
                    expiration_ms: p.expiration_ms,
                    headers: p
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect(),
                };
                routed |= queue.tx.send(body).is_ok();
            }
        }
        if !routed && p.mandatory {
            return Err(PublishError::Unroutable {
                broker: format!("memory://{}", self.name),
                exchange: p.exchange.clone(),
                routing_key: p.routing_key.clone(),
                reason: "312 NO_ROUTE".into(),
            });
        }
        if !routed {
            // As a broker does with an unroutable message that is not mandatory.
            tracing::debug!(broker = %self.name, exchange = %p.exchange, key = %p.routing_key, "unroutable message dropped");
        }
        Ok(())
    }
}

/// Puts a requeued message back on its queue.
pub(super) struct Settler {
    requeue: mpsc::UnboundedSender<Body>,
}

impl Settler {
    pub(super) fn settle(
        self,
        bytes: Vec<u8>,
        expiration_ms: Option<u64>,
        headers: Vec<(String, String)>,
        outcome: Outcome,
    ) {
        if outcome == Outcome::Requeue {
            let _ = self.requeue.send(Body {
                bytes,
                expiration_ms,
                headers,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    /// A memory message is requeued from its `Inbound`, so letting go of
    /// what a plan no longer needs must keep it here: it comes back whole.
    #[tokio::test]
    async fn a_planned_message_requeued_comes_back_whole() {
        let broker = MemoryBroker::named("planned-requeue");
        broker.declare_queue("q", "", "");
        let mut inbox = broker.consume(&["q".to_string()]).expect("consume");
        let mut sent = Publication::new("", "q", b"{\"oslo.version\": \"2.0\"}".to_vec());
        sent.expiration_ms = Some(1500);
        sent.headers = vec![("x-why", "kept".to_string())];
        broker.publish(&sent).expect("queued");

        let mut first = inbox.next().await.expect("delivered");
        first.planned();
        first.settle(Outcome::Requeue);

        let again = inbox.next().await.expect("redelivered");
        assert_eq!(again.body, sent.body.to_vec());
        assert_eq!(again.expiration_ms, Some(1500));
        assert_eq!(again.header("x-why"), Some("kept"));
    }
}
