//! What the router decides for one message: the [`Plan`] the consumer loop
//! carries out (publications, and how the source is settled), the
//! [`Respond`] part for a message that wants an answer, and the
//! [`Disposition`] that logs and tests read.

use std::time::{Duration, Instant};

use super::Claim;
use crate::transport::Publication;
use crate::wire::{CallInfo, CellResponse, CellsMessage};

/// Where a publication goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// This cell's own broker (local delivery, dead letters).
    Own,
    /// The broker of the named neighbour.
    Neighbour(String),
}

/// What to do with one received message.
#[derive(Debug)]
pub struct Plan {
    /// The message's uuid, for logs.
    pub uuid: Option<String>,
    /// The uuid claimed for this delivery: settle it once the plan is
    /// carried out (it is then remembered or let go, as the router decided);
    /// dropping it unsettled lets the uuid go.
    pub claim: Option<Claim>,
    /// Put the source back on its queue after this pause instead of
    /// settling it: another delivery of the message is in flight.
    pub requeue_after: Option<Duration>,
    pub sends: Vec<(Target, Publication)>,
    pub disposition: Disposition,
    /// How this cell answers, when an answer is wanted. Boxed: a plan is
    /// held by its message's future while its publications are in flight,
    /// and most plans answer nothing.
    pub respond: Option<Box<Respond>>,
    /// Responses that reached their destination here: (`response_uuid`,
    /// the neighbour that sent them, the responses).
    pub arrived: Option<(String, String, Vec<CellResponse>)>,
    /// Reject the source back to the broker instead of acknowledging it.
    pub reject: bool,
}

/// The extra key carrying the time left to answer, in milliseconds. Nova
/// peers ignore it and give every hop the full `call_timeout`.
pub const BUDGET_KEY: &str = "cellhost_timeout_ms";

/// How long a second delivery of a message whose first is still being
/// carried out waits before it goes back to its queue: long enough not to
/// spin, short next to a publication's confirm.
pub const IN_FLIGHT_RETRY: Duration = Duration::from_millis(250);

/// The longest budget taken from a caller: a day.
pub(super) const MAX_BUDGET_MS: u64 = 86_400_000;

/// What a cell does to answer a message that wants a response.
#[derive(Debug)]
pub struct Respond {
    /// The message as this cell saw it (its hop appended).
    pub message: CellsMessage,
    pub is_origin: bool,
    /// The application's call, at the origin.
    pub reply_to: Option<CallInfo>,
    /// The `_msg_id` of the call made to the local application, if any.
    pub local_call: Option<String>,
    /// Neighbours whose response lists this cell waits for.
    pub awaiting: Vec<String>,
    /// An answer known at once (a routing or policy error).
    pub failure: Option<CellResponse>,
    /// When the message was received here.
    pub received: Instant,
    /// The time this cell has to answer, from `received`.
    pub budget: Duration,
}

impl Respond {
    /// How long to wait for neighbours: long enough for their own shares,
    /// short enough to answer in time.
    pub fn wait_until(&self) -> Instant {
        self.received + self.budget.mul_f64(0.9)
    }

    /// How long the local application may take.
    pub fn local_timeout(&self) -> Duration {
        Respond::local_timeout_of(self.budget)
    }
}

/// How a message was dealt with, for logs, metrics and the demo.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    Routed {
        routing_path: String,
        local: bool,
        relays: Vec<String>,
    },
    DeadLettered {
        code: &'static str,
        reason: String,
    },
    Dropped {
        reason: String,
    },
    /// Rejected back to the broker (`policy.on_failure = "reject"`).
    Rejected {
        reason: String,
    },
    /// Refused with a failure response to whoever waits for one.
    Refused {
        code: &'static str,
        reason: String,
    },
    Duplicate,
    /// Another delivery of the same uuid is being carried out: this one goes
    /// back to its queue, and is a duplicate or is carried out when it returns.
    InFlight,
}

impl Disposition {
    /// Whether this outcome carries the message out, so that a later copy is
    /// a duplicate: it was routed (relayed, delivered, or its responses
    /// arrived), dropped by the policy's decision, or refused with a failure
    /// response. Not a dead letter or a rejection: an operator who replays
    /// those wants them carried out.
    pub fn carries_out(&self) -> bool {
        matches!(
            self,
            Disposition::Routed { .. } | Disposition::Dropped { .. } | Disposition::Refused { .. }
        )
    }
}

impl Respond {
    pub(super) fn local_timeout_of(budget: Duration) -> Duration {
        budget.mul_f64(0.8)
    }
}

impl Plan {
    pub(super) fn nothing(uuid: Option<String>, disposition: Disposition) -> Plan {
        Plan {
            uuid,
            sends: Vec::new(),
            disposition,
            respond: None,
            arrived: None,
            reject: false,
            claim: None,
            requeue_after: None,
        }
    }
}
