//! What oslo.messaging 18.3.1 declares for each role of an exchange or queue,
//! under a broker's `[oslo_messaging_rabbit]` options (impl_rabbit.py:
//! `Connection.durable`, `declare_topic_consumer`, `declare_fanout_consumer`,
//! `declare_direct_consumer`, `topic_send`, `fanout_send`,
//! `_get_queue_arguments`).
//!
//! RabbitMQ refuses a second declaration of a name with other properties
//! (PRECONDITION_FAILED), so wherever an oslo peer may declare the same name
//! first, cellhost must declare exactly what oslo would. This file is the one
//! place that knows those rules; it also names the option an operator most
//! likely has to change when the broker refuses a declaration. It knows
//! oslo's roles, not cells: which names play which role is the caller's.

use std::collections::BTreeMap;

use crate::config::RabbitOptions;

use super::{ArgValue, ExchangeKind, ExchangeSpec, QueueSpec};

/// The part an exchange or queue plays in an oslo.messaging deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The control exchange (`nova`), a topic exchange.
    ControlExchange,
    /// A topic queue `T` or `T.<server>` of an RPC server.
    TopicQueue,
    /// The fanout exchange `T_fanout` of a topic.
    FanoutExchange,
    /// A server's own queue on the fanout exchange, `T_fanout_<uuid hex>`.
    FanoutQueue,
    /// A caller's reply queue `reply_<uuid hex>`.
    ReplyQueue,
    /// cellhost's own dead-letter queue (no oslo counterpart).
    DeadLetterQueue,
    /// cellhost's queue of relays parked for a neighbour (no oslo counterpart).
    ParkQueue,
}

impl Role {
    /// The `[oslo_messaging_rabbit]` option that most likely differs between
    /// whoever declared the name first and us, given the argument the broker
    /// says is inequivalent (`durable`, `x-queue-type`, ...).
    pub fn likely_option(self, argument: &str) -> &'static str {
        let transient = matches!(
            self,
            Role::FanoutExchange | Role::FanoutQueue | Role::ReplyQueue
        );
        match argument {
            "durable" | "x-queue-type" if self == Role::DeadLetterQueue => {
                "rabbit_quorum_queue (the dead-letter queue is quorum when it is true; an existing classic one must be drained and deleted first)"
            }
            "durable" | "x-queue-type" if self == Role::ParkQueue => {
                "rabbit_quorum_queue (park queues are quorum when it is true; an existing classic one must be drained and deleted first)"
            }
            "durable" if transient => "rabbit_transient_quorum_queue",
            "durable" => "amqp_durable_queues or rabbit_quorum_queue",
            "x-queue-type" if transient => "rabbit_transient_quorum_queue",
            "x-queue-type" => "rabbit_quorum_queue",
            "auto_delete" => "amqp_auto_delete",
            "x-expires" => "rabbit_transient_queues_ttl",
            "x-ha-policy" => "rabbit_ha_queues",
            "x-delivery-limit" => "rabbit_quorum_delivery_limit",
            "x-max-in-memory-length" => "rabbit_quorum_max_memory_length",
            "x-max-in-memory-bytes" => "rabbit_quorum_max_memory_bytes",
            _ => "amqp_durable_queues, rabbit_quorum_queue or rabbit_transient_quorum_queue",
        }
    }
}

/// The declarations oslo.messaging makes under one set of options.
#[derive(Debug, Clone, Copy)]
pub struct OsloDeclarations<'a> {
    options: &'a RabbitOptions,
}

impl<'a> OsloDeclarations<'a> {
    pub fn new(options: &'a RabbitOptions) -> Self {
        OsloDeclarations { options }
    }

    /// oslo's `Connection.durable`: quorum queues imply durability.
    fn durable(&self) -> bool {
        self.options.amqp_durable_queues || self.options.rabbit_quorum_queue
    }

    /// `topic_send` / `declare_topic_consumer`: the control exchange.
    pub fn control_exchange(&self, name: &str) -> ExchangeSpec {
        ExchangeSpec {
            name: name.to_string(),
            kind: ExchangeKind::Topic,
            durable: self.durable(),
            auto_delete: self.options.amqp_auto_delete,
            role: Role::ControlExchange,
        }
    }

    /// `declare_topic_consumer`: the shared queue `T` and the server's `T.S`.
    pub fn topic_queue(&self, name: &str) -> QueueSpec {
        QueueSpec {
            name: name.to_string(),
            durable: self.durable(),
            auto_delete: self.options.amqp_auto_delete,
            // Topic queues never get a TTL: they hold work for any server.
            arguments: self.arguments(self.options.rabbit_quorum_queue, 0),
            role: Role::TopicQueue,
        }
    }

    /// `fanout_send` / `declare_fanout_consumer`: `T_fanout`, gone with its last queue.
    pub fn fanout_exchange(&self, name: &str) -> ExchangeSpec {
        ExchangeSpec {
            name: name.to_string(),
            kind: ExchangeKind::Fanout,
            durable: self.options.rabbit_transient_quorum_queue,
            auto_delete: true,
            role: Role::FanoutExchange,
        }
    }

    /// `declare_fanout_consumer`: a server's `T_fanout_<hex>`. Not
    /// auto-delete: it outlives a lost connection, and `x-expires` removes it
    /// once nobody has used it for `rabbit_transient_queues_ttl` seconds.
    pub fn fanout_queue(&self, name: &str) -> QueueSpec {
        QueueSpec {
            role: Role::FanoutQueue,
            ..self.transient_queue(name)
        }
    }

    /// `declare_direct_consumer`: a caller's `reply_<hex>`, like a fanout queue.
    pub fn reply_queue(&self, name: &str) -> QueueSpec {
        QueueSpec {
            role: Role::ReplyQueue,
            ..self.transient_queue(name)
        }
    }

    /// cellhost's dead-letter queue. It holds the only copy of messages that
    /// could not be routed, so it is durable, and quorum when the deployment
    /// uses quorum queues, so that it survives the loss of a cluster node.
    pub fn dead_letter_queue(&self, name: &str) -> QueueSpec {
        let mut arguments = BTreeMap::new();
        if self.options.rabbit_quorum_queue {
            arguments.insert("x-queue-type".to_string(), ArgValue::text("quorum"));
        } else if self.options.rabbit_ha_queues {
            arguments.insert("x-ha-policy".to_string(), ArgValue::text("all"));
        }
        QueueSpec {
            name: name.to_string(),
            durable: true,
            auto_delete: false,
            arguments,
            role: Role::DeadLetterQueue,
        }
    }

    /// cellhost's queue of relays parked for a neighbour that cannot take
    /// them: like the dead-letter queue, it may hold the only copy. A relay
    /// older than `max_age_ms` goes to `dead_letter_queue` (the broker's own
    /// dead-lettering); past `max_length`, new relays are refused (nacked).
    pub fn park_queue(
        &self,
        name: &str,
        dead_letter_queue: &str,
        max_age_ms: u64,
        max_length: u64,
    ) -> QueueSpec {
        let mut spec = QueueSpec {
            role: Role::ParkQueue,
            ..self.dead_letter_queue(name)
        };
        let arguments = &mut spec.arguments;
        arguments.insert("x-message-ttl".into(), ArgValue::Int(max_age_ms));
        arguments.insert("x-max-length".into(), ArgValue::Int(max_length));
        arguments.insert("x-overflow".into(), ArgValue::text("reject-publish"));
        arguments.insert("x-dead-letter-exchange".into(), ArgValue::text(""));
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            ArgValue::text(dead_letter_queue),
        );
        spec
    }

    fn transient_queue(&self, name: &str) -> QueueSpec {
        QueueSpec {
            name: name.to_string(),
            durable: self.options.rabbit_transient_quorum_queue,
            auto_delete: false,
            arguments: self.arguments(
                self.options.rabbit_transient_quorum_queue,
                self.options.rabbit_transient_queues_ttl,
            ),
            role: Role::ReplyQueue,
        }
    }

    /// oslo's `_get_queue_arguments` (without stream fanout, which cellhost
    /// does not offer).
    fn arguments(&self, quorum: bool, ttl_s: u32) -> BTreeMap<String, ArgValue> {
        let o = self.options;
        let mut arguments = BTreeMap::new();
        let mut set = |key: &str, value: ArgValue| {
            arguments.insert(key.to_string(), value);
        };
        if o.rabbit_ha_queues {
            set("x-ha-policy", ArgValue::text("all"));
        }
        if quorum {
            set("x-queue-type", ArgValue::text("quorum"));
            for (key, value) in [
                (
                    "x-delivery-limit",
                    u64::from(o.rabbit_quorum_delivery_limit),
                ),
                (
                    "x-max-in-memory-length",
                    u64::from(o.rabbit_quorum_max_memory_length),
                ),
                ("x-max-in-memory-bytes", o.rabbit_quorum_max_memory_bytes),
            ] {
                if value > 0 {
                    set(key, ArgValue::Int(value));
                }
            }
        }
        if ttl_s > 0 {
            set("x-expires", ArgValue::Int(u64::from(ttl_s) * 1000));
        }
        arguments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, ArgValue)]) -> BTreeMap<String, ArgValue> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn default_options_declare_classic_transient_entities_and_expiring_reply_queues() {
        let options = RabbitOptions::default();
        let oslo = OsloDeclarations::new(&options);
        let nova = oslo.control_exchange("nova");
        assert_eq!(
            (nova.kind, nova.durable, nova.auto_delete),
            (ExchangeKind::Topic, false, false)
        );
        for name in [
            "cells.intercell.targeted",
            "cells.intercell.targeted.h1",
            "cells.local",
        ] {
            let q = oslo.topic_queue(name);
            assert_eq!((q.durable, q.auto_delete), (false, false), "{name}");
            assert!(q.arguments.is_empty(), "{name}: {:?}", q.arguments);
        }
        let fanout = oslo.fanout_exchange("cells.intercell.targeted_fanout");
        assert_eq!(
            (fanout.kind, fanout.durable, fanout.auto_delete),
            (ExchangeKind::Fanout, false, true)
        );
        // Where cellhost used to differ from oslo: not auto-delete, but expiring.
        let expiring = args(&[("x-expires", ArgValue::Int(1_800_000))]);
        for q in [
            oslo.fanout_queue("t_fanout_ab"),
            oslo.reply_queue("reply_ab"),
        ] {
            assert_eq!((q.durable, q.auto_delete), (false, false), "{}", q.name);
            assert_eq!(q.arguments, expiring, "{}", q.name);
        }
        let dead = oslo.dead_letter_queue("cells.intercell.dead");
        assert_eq!((dead.durable, dead.auto_delete), (true, false));
        assert!(dead.arguments.is_empty());
    }

    #[test]
    fn quorum_makes_the_exchange_and_topic_queues_durable_quorum_but_not_replies() {
        let options = RabbitOptions {
            rabbit_quorum_queue: true,
            rabbit_quorum_delivery_limit: 5,
            ..RabbitOptions::default()
        };
        let oslo = OsloDeclarations::new(&options);
        assert!(oslo.control_exchange("nova").durable);
        let topic = oslo.topic_queue("cells.local");
        assert!(topic.durable && !topic.auto_delete);
        assert_eq!(
            topic.arguments,
            args(&[
                ("x-delivery-limit", ArgValue::Int(5)),
                ("x-queue-type", ArgValue::text("quorum")),
            ])
        );
        let reply = oslo.reply_queue("reply_ab");
        assert!(!reply.durable);
        assert_eq!(
            reply.arguments,
            args(&[("x-expires", ArgValue::Int(1_800_000))])
        );
        assert!(!oslo.fanout_exchange("t_fanout").durable);
        let dead = oslo.dead_letter_queue("cells.intercell.dead");
        assert_eq!(
            dead.arguments,
            args(&[("x-queue-type", ArgValue::text("quorum"))])
        );
    }

    #[test]
    fn durable_queues_make_the_exchange_and_topic_queues_durable_and_classic() {
        let options = RabbitOptions {
            amqp_durable_queues: true,
            ..RabbitOptions::default()
        };
        let oslo = OsloDeclarations::new(&options);
        assert!(oslo.control_exchange("nova").durable);
        let topic = oslo.topic_queue("cells.local");
        assert!(topic.durable && topic.arguments.is_empty());
        assert!(!oslo.fanout_queue("t_fanout_ab").durable);
    }

    #[test]
    fn transient_quorum_makes_fanout_and_reply_entities_durable_quorum() {
        let options = RabbitOptions {
            rabbit_transient_quorum_queue: true,
            rabbit_transient_queues_ttl: 0,
            ..RabbitOptions::default()
        };
        let oslo = OsloDeclarations::new(&options);
        assert!(oslo.fanout_exchange("t_fanout").durable);
        let reply = oslo.reply_queue("reply_ab");
        assert!(reply.durable && !reply.auto_delete);
        assert_eq!(
            reply.arguments,
            args(&[("x-queue-type", ArgValue::text("quorum"))])
        );
        assert!(!oslo.control_exchange("nova").durable);
    }

    #[test]
    fn a_refusal_names_the_option_for_the_role() {
        assert_eq!(
            Role::ControlExchange.likely_option("durable"),
            "amqp_durable_queues or rabbit_quorum_queue"
        );
        assert_eq!(
            Role::ReplyQueue.likely_option("durable"),
            "rabbit_transient_quorum_queue"
        );
        assert_eq!(
            Role::TopicQueue.likely_option("x-queue-type"),
            "rabbit_quorum_queue"
        );
        assert_eq!(
            Role::FanoutQueue.likely_option("x-expires"),
            "rabbit_transient_queues_ttl"
        );
    }
}
