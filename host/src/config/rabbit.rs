//! `[oslo_messaging_rabbit]`: the RabbitMQ options of oslo.messaging 18.3.1,
//! under oslo's own names, with oslo's meanings and defaults, so an operator
//! copies them from `nova.conf`. They decide how a broker's exchanges and
//! queues are declared (durable, quorum, `x-expires`, ...), the AMQP
//! heartbeat, and TLS. A neighbour's broker may carry options of its own.
//!
//! This file owns the option names, their defaults and the checks between
//! them; the transport applies them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Deserialize;

/// oslo.messaging's `[oslo_messaging_rabbit]` options that cellhost honours.
/// Any other key is refused by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitOptions {
    /// Durable control exchange and topic queues.
    pub amqp_durable_queues: bool,
    /// Auto-delete control exchange and topic queues.
    pub amqp_auto_delete: bool,
    /// Topic queues of type quorum (durable whatever `amqp_durable_queues` says).
    pub rabbit_quorum_queue: bool,
    /// Reply and fanout queues of type quorum, and durable.
    pub rabbit_transient_quorum_queue: bool,
    /// `x-delivery-limit` of quorum queues; 0: none.
    pub rabbit_quorum_delivery_limit: u32,
    /// `x-max-in-memory-length` of quorum queues; 0: none.
    pub rabbit_quorum_max_memory_length: u32,
    /// `x-max-in-memory-bytes` of quorum queues; 0: none.
    pub rabbit_quorum_max_memory_bytes: u64,
    /// Seconds an unused reply or fanout queue lives (`x-expires`); 0: forever.
    pub rabbit_transient_queues_ttl: u32,
    /// `x-ha-policy: all` on every queue (RabbitMQ before 3.0's policies).
    pub rabbit_ha_queues: bool,
    /// Seconds without traffic before the connection is taken for dead
    /// (the AMQP heartbeat proposed to the broker; the lower of the two
    /// proposals wins). 0 proposes none, but lapin then follows the
    /// broker's own (RabbitMQ: 60 s).
    pub heartbeat_timeout_threshold: u16,
    /// Connect over TLS (as `amqps://` or `?ssl=1` in the URL does).
    pub ssl: bool,
    /// The CA that signs the broker's certificate, PEM; `""`: the system's.
    pub ssl_ca_file: String,
    /// A client certificate, PEM; `""`: none.
    pub ssl_cert_file: String,
    /// The client certificate's key, PEM; `""`: none.
    pub ssl_key_file: String,
}

impl Default for RabbitOptions {
    fn default() -> Self {
        RabbitOptions {
            amqp_durable_queues: false,
            amqp_auto_delete: false,
            rabbit_quorum_queue: false,
            rabbit_transient_quorum_queue: false,
            rabbit_quorum_delivery_limit: 0,
            rabbit_quorum_max_memory_length: 0,
            rabbit_quorum_max_memory_bytes: 0,
            rabbit_transient_queues_ttl: 1800,
            rabbit_ha_queues: false,
            heartbeat_timeout_threshold: 60,
            ssl: false,
            ssl_ca_file: String::new(),
            ssl_cert_file: String::new(),
            ssl_key_file: String::new(),
        }
    }
}

impl RabbitOptions {
    /// Checks what oslo itself refuses, and what cannot work; `section`
    /// names where the options were written, for the error.
    pub fn validate(&self, section: &str) -> Result<()> {
        if self.rabbit_quorum_queue && self.rabbit_ha_queues {
            bail!(
                "`{section}`: `rabbit_quorum_queue` and `rabbit_ha_queues` are both true; a queue is quorum or mirrored, not both (oslo.messaging refuses this too)"
            );
        }
        if self.ssl_cert_file.is_empty() != self.ssl_key_file.is_empty() {
            bail!(
                "`{section}`: `ssl_cert_file` and `ssl_key_file` go together; set both or neither"
            );
        }
        for (key, value) in [
            ("ssl_ca_file", &self.ssl_ca_file),
            ("ssl_cert_file", &self.ssl_cert_file),
            ("ssl_key_file", &self.ssl_key_file),
        ] {
            if !value.is_empty() && !Path::new(value).is_file() {
                bail!("`{section}.{key}`: no file at {value}");
            }
        }
        Ok(())
    }

    /// Makes the TLS file paths absolute, taken from `base`.
    pub(super) fn resolve_paths(&mut self, base: &Path) {
        for value in [
            &mut self.ssl_ca_file,
            &mut self.ssl_cert_file,
            &mut self.ssl_key_file,
        ] {
            if !value.is_empty() && Path::new(value.as_str()).is_relative() {
                *value = base.join(value.as_str()).to_string_lossy().into_owned();
            }
        }
    }

    /// `ssl_ca_file`, if set.
    pub fn ca_file(&self) -> Option<PathBuf> {
        non_empty(&self.ssl_ca_file)
    }

    /// `ssl_cert_file` and `ssl_key_file`, if set.
    pub fn client_certificate(&self) -> Option<(PathBuf, PathBuf)> {
        Some((
            non_empty(&self.ssl_cert_file)?,
            non_empty(&self.ssl_key_file)?,
        ))
    }
}

fn non_empty(value: &str) -> Option<PathBuf> {
    (!value.is_empty()).then(|| PathBuf::from(value))
}
