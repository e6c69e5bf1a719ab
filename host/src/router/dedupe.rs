//! Duplicate detection by cells message `uuid`, for one host.
//!
//! Delivery is at-least-once, so the same message can reach a host twice: a
//! neighbour that republished after a lost confirm, an application that sent
//! again, an operator who replayed a queue. This module owns the memory that
//! tells such a copy from a new message, and nothing else: the router decides
//! what counts as carried out, the host's consumer loop says when.
//!
//! A uuid goes through three states:
//! - **claimed** when the router starts planning its message: a second
//!   delivery of it meanwhile is told to come back later
//!   ([`Seen::InFlight`]), so one message is never carried out twice at once;
//! - **remembered** when the plan was carried out (its publications are
//!   confirmed) and it was a message worth remembering; a later copy is then a
//!   duplicate ([`Seen::Remembered`]);
//! - **forgotten** when the plan was not carried out (dead-lettered,
//!   rejected, a publication failed), so a redelivery or an operator's replay
//!   is carried out; and when it is older than the window, or pushed out by
//!   newer ones.
//!
//! The window is bounded by count and by age, oldest forgotten first. Claims
//! in flight are not counted: there are at most as many as messages a host
//! has unacknowledged (its consumers' prefetch).
//!
//! Cost per message: two short holds of one mutex (claim, then settle), and
//! no allocation for a uuid as oslo writes them: such a uuid is kept as its
//! 128 bits. The window's table is touched at random on every message, so
//! it is kept small: 16 bytes a uuid, nothing else (at the default 65,536
//! uuids, 2 MiB instead of the 6 MiB a table of states took), and the
//! claims in flight, which change twice per message, live in a table of
//! their own that stays in the cache.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lock;

/// A uuid as the window keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// The 128 bits of a uuid written as oslo and Nova write them: lowercase
    /// hex in the `8-4-4-4-12` form. Only that one spelling maps to these
    /// bits, so two keys are equal exactly when their texts are.
    Bits([u64; 2]),
    /// Any other text, kept as it is.
    Text(Arc<str>),
}

impl Key {
    fn new(uuid: &str) -> Key {
        let canonical = uuid.len() == 36 && !uuid.bytes().any(|b| b.is_ascii_uppercase());
        match canonical.then(|| uuid::Uuid::try_parse_ascii(uuid.as_bytes())) {
            Some(Ok(parsed)) => {
                let (high, low) = parsed.as_u64_pair();
                Key::Bits([high, low])
            }
            _ => Key::Text(Arc::from(uuid)),
        }
    }
}

/// The window's hasher: keyed at random per process, as std's, and cheaper
/// on keys this short.
type Hasher = foldhash::fast::RandomState;

/// The uuids this host is carrying out or carried out recently.
pub struct Dedupe {
    /// Most uuids remembered; 0 turns duplicate detection off.
    capacity: usize,
    /// How long a uuid is remembered; `None`: until pushed out by count.
    max_age: Option<Duration>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Claimed and not settled yet: at most the messages unacknowledged.
    in_flight: HashSet<Key, Hasher>,
    /// Remembered uuids kept as their bits, and the others.
    remembered_bits: HashSet<[u64; 2], Hasher>,
    remembered_texts: HashSet<Arc<str>, Hasher>,
    /// Remembered uuids in the order they were remembered, oldest first:
    /// exactly one slot for each uuid remembered (a uuid is remembered only
    /// after a claim, and never claimed while it is remembered).
    order: VecDeque<(Instant, Key)>,
}

impl State {
    fn is_remembered(&self, key: &Key) -> bool {
        match key {
            Key::Bits(bits) => self.remembered_bits.contains(bits),
            Key::Text(text) => self.remembered_texts.contains(text),
        }
    }

    fn remember(&mut self, key: &Key) {
        match key {
            Key::Bits(bits) => self.remembered_bits.insert(*bits),
            Key::Text(text) => self.remembered_texts.insert(text.clone()),
        };
    }

    fn forget(&mut self, key: &Key) {
        match key {
            Key::Bits(bits) => self.remembered_bits.remove(bits),
            Key::Text(text) => self.remembered_texts.remove(text),
        };
    }
}

/// Why a uuid cannot be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Carried out within the window: the copy is a duplicate.
    Remembered,
    /// Another delivery of it is being carried out right now.
    InFlight,
}

impl Dedupe {
    /// A window of at most `capacity` uuids (0: no duplicate detection), each
    /// kept at most `max_age` (`None` or zero: no age limit).
    pub fn new(capacity: usize, max_age: Option<Duration>) -> Arc<Dedupe> {
        Arc::new(Dedupe {
            capacity,
            max_age: max_age.filter(|age| !age.is_zero()),
            state: Mutex::new(State::default()),
        })
    }

    /// Claims `uuid` for the delivery being planned. `Ok(None)` when there is
    /// nothing to claim: detection is off, or `wants_answer` and the uuid is
    /// remembered (a message someone waits an answer for is carried out
    /// again, see [`Claim::remember`]).
    pub fn claim(self: &Arc<Self>, uuid: &str, wants_answer: bool) -> Result<Option<Claim>, Seen> {
        self.claim_at(uuid, wants_answer, Instant::now())
    }

    fn claim_at(
        self: &Arc<Self>,
        uuid: &str,
        wants_answer: bool,
        now: Instant,
    ) -> Result<Option<Claim>, Seen> {
        if self.capacity == 0 {
            return Ok(None);
        }
        let key = Key::new(uuid);
        let mut state = lock(&self.state);
        // Expired uuids go first, so one found below is within the window.
        self.evict(&mut state, now);
        if state.in_flight.contains(&key) {
            return Err(Seen::InFlight);
        }
        if state.is_remembered(&key) {
            return if wants_answer {
                Ok(None)
            } else {
                Err(Seen::Remembered)
            };
        }
        state.in_flight.insert(key.clone());
        Ok(Some(Claim {
            dedupe: self.clone(),
            key,
            remember: false,
            settled: false,
        }))
    }

    /// How many uuids are remembered or claimed now.
    pub fn len(&self) -> usize {
        let state = lock(&self.state);
        state.in_flight.len() + state.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn commit(&self, key: &Key, now: Instant) {
        let mut state = lock(&self.state);
        if state.in_flight.remove(key) {
            state.remember(key);
            state.order.push_back((now, key.clone()));
        }
        self.evict(&mut state, now);
    }

    fn release(&self, key: &Key) {
        lock(&self.state).in_flight.remove(key);
    }

    /// Forgets the oldest remembered uuids while there are more than the
    /// capacity or they are older than the age limit.
    fn evict(&self, state: &mut State, now: Instant) {
        while let Some((at, _)) = state.order.front() {
            let too_many = state.order.len() > self.capacity;
            let too_old = self
                .max_age
                .is_some_and(|age| now.saturating_duration_since(*at) > age);
            if !too_many && !too_old {
                break;
            }
            if let Some((_, key)) = state.order.pop_front() {
                state.forget(&key);
            }
        }
    }
}

/// A uuid claimed by one delivery. Settling it remembers the uuid when the
/// router marked the message as one to remember, and lets it go otherwise;
/// dropping it unsettled (a publication failed, the plan was abandoned) lets
/// it go, so the next delivery is carried out.
pub struct Claim {
    dedupe: Arc<Dedupe>,
    key: Key,
    remember: bool,
    settled: bool,
}

impl Claim {
    /// Whether the uuid is remembered once the plan is carried out.
    pub fn remember(&mut self, remember: bool) {
        self.remember = remember;
    }

    /// The plan's publications are confirmed: remember the uuid, or let it go.
    pub fn settled(self) {
        self.settled_at(Instant::now());
    }

    fn settled_at(mut self, now: Instant) {
        self.settled = true;
        if self.remember {
            self.dedupe.commit(&self.key, now);
        } else {
            self.dedupe.release(&self.key);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.settled {
            self.dedupe.release(&self.key);
        }
    }
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("uuid", &self.key)
            .field("remember", &self.remember)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(d: &Arc<Dedupe>, uuid: &str, now: Instant) -> Claim {
        match d.claim_at(uuid, false, now) {
            Ok(Some(claim)) => claim,
            other => panic!("{uuid} not claimed: {other:?}"),
        }
    }

    fn carried_out(d: &Arc<Dedupe>, uuid: &str, now: Instant) {
        let mut claim = claimed(d, uuid, now);
        claim.remember(true);
        claim.settled_at(now);
    }

    #[test]
    fn a_carried_out_uuid_is_a_duplicate_afterwards() {
        let d = Dedupe::new(10, None);
        let now = Instant::now();
        carried_out(&d, "a", now);
        assert_eq!(d.claim_at("a", false, now).unwrap_err(), Seen::Remembered);
        assert!(matches!(d.claim_at("b", false, now), Ok(Some(_))));
    }

    #[test]
    fn a_uuid_is_told_apart_from_its_other_spellings() {
        let d = Dedupe::new(10, None);
        let now = Instant::now();
        let uuid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
        carried_out(&d, uuid, now);
        assert_eq!(d.claim_at(uuid, false, now).unwrap_err(), Seen::Remembered);
        let others = [
            uuid.to_uppercase(),
            uuid.replace('-', ""),
            format!("{{{uuid}}}"),
            format!("urn:uuid:{uuid}"),
        ];
        for other in &others {
            let mut claim = claimed(&d, other, now);
            claim.remember(true);
            claim.settled_at(now);
            assert_eq!(d.claim_at(other, false, now).unwrap_err(), Seen::Remembered);
        }
        assert_eq!(d.len(), 5);
    }

    #[test]
    fn a_second_delivery_waits_while_the_first_is_in_flight() {
        let d = Dedupe::new(10, None);
        let now = Instant::now();
        let first = claimed(&d, "a", now);
        assert_eq!(d.claim_at("a", false, now).unwrap_err(), Seen::InFlight);
        // Even a message wanting an answer is not carried out twice at once.
        assert_eq!(d.claim_at("a", true, now).unwrap_err(), Seen::InFlight);
        drop(first);
    }

    #[test]
    fn a_released_claim_lets_the_next_delivery_through() {
        let d = Dedupe::new(10, None);
        let now = Instant::now();
        // Settled without being marked: dead-lettered, rejected.
        claimed(&d, "a", now).settled_at(now);
        let again = claimed(&d, "a", now);
        // Dropped unsettled: a publication failed.
        drop(again);
        let mut third = claimed(&d, "a", now);
        third.remember(true);
        third.settled_at(now);
        assert_eq!(d.claim_at("a", false, now).unwrap_err(), Seen::Remembered);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn a_message_wanting_an_answer_is_carried_out_again() {
        let d = Dedupe::new(10, None);
        let now = Instant::now();
        carried_out(&d, "a", now);
        assert!(matches!(d.claim_at("a", true, now), Ok(None)));
        // And it is still a duplicate for a copy that wants no answer.
        assert_eq!(d.claim_at("a", false, now).unwrap_err(), Seen::Remembered);
    }

    #[test]
    fn the_oldest_are_forgotten_past_the_count() {
        let d = Dedupe::new(3, None);
        let now = Instant::now();
        for uuid in ["a", "b", "c", "d"] {
            carried_out(&d, uuid, now);
        }
        assert_eq!(d.len(), 3);
        assert!(matches!(d.claim_at("a", false, now), Ok(Some(_))));
        for uuid in ["b", "c", "d"] {
            assert_eq!(d.claim_at(uuid, false, now).unwrap_err(), Seen::Remembered);
        }
    }

    #[test]
    fn uuids_older_than_the_age_limit_are_forgotten() {
        let d = Dedupe::new(100, Some(Duration::from_secs(60)));
        let start = Instant::now();
        carried_out(&d, "old", start);
        carried_out(&d, "newer", start + Duration::from_secs(30));
        let later = start + Duration::from_secs(61);
        assert!(matches!(d.claim_at("old", false, later), Ok(Some(_))));
        assert_eq!(
            d.claim_at("newer", false, later).unwrap_err(),
            Seen::Remembered
        );
        let much_later = start + Duration::from_secs(200);
        assert!(matches!(
            d.claim_at("newer", false, much_later),
            Ok(Some(_))
        ));
        assert_eq!(d.len(), 0, "expired uuids and dropped claims leave nothing");
    }

    #[test]
    fn a_zero_age_means_no_age_limit_and_a_zero_count_turns_detection_off() {
        let d = Dedupe::new(10, Some(Duration::ZERO));
        let start = Instant::now();
        carried_out(&d, "a", start);
        let years = start + Duration::from_secs(100_000_000);
        assert_eq!(d.claim_at("a", false, years).unwrap_err(), Seen::Remembered);

        let off = Dedupe::new(0, None);
        assert!(matches!(off.claim_at("a", false, start), Ok(None)));
        assert!(matches!(off.claim_at("a", false, start), Ok(None)));
        assert!(off.is_empty());
    }

    #[test]
    fn an_expired_uuid_claimed_again_is_not_evicted_by_its_old_slot() {
        let d = Dedupe::new(2, Some(Duration::from_secs(10)));
        let start = Instant::now();
        carried_out(&d, "a", start);
        // Expired, claimed again, remembered again: one live entry.
        let later = start + Duration::from_secs(11);
        carried_out(&d, "a", later);
        carried_out(&d, "b", later);
        assert_eq!(d.claim_at("a", false, later).unwrap_err(), Seen::Remembered);
        // A claim in flight is never evicted by the count.
        let c = claimed(&d, "c", later);
        carried_out(&d, "e", later);
        carried_out(&d, "f", later);
        assert_eq!(d.claim_at("c", false, later).unwrap_err(), Seen::InFlight);
        drop(c);
    }

    #[test]
    fn concurrent_deliveries_of_one_uuid_claim_it_once() {
        let d = Dedupe::new(1000, Some(Duration::from_secs(600)));
        for round in 0..200 {
            let uuid = format!("uuid-{round}");
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let (d, uuid, barrier) = (d.clone(), uuid.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        match d.claim(&uuid, false) {
                            Ok(Some(mut claim)) => {
                                claim.remember(true);
                                claim.settled();
                                1
                            }
                            Ok(None) => panic!("detection is on"),
                            Err(_) => 0,
                        }
                    })
                })
                .collect();
            let winners: i32 = threads
                .into_iter()
                .map(|t| t.join().expect("claiming thread"))
                .sum();
            assert_eq!(winners, 1, "round {round}");
        }
        assert_eq!(d.len(), 200);
    }
}
