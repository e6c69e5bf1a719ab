//! The glue [`export_policy!`](crate::export_policy) expands to: it adapts a
//! [`Policy`] to the generated `Guest` trait and owns the policy value between
//! calls.
//!
//! Public only so the macro can reach it from plugin crates; not part of the
//! API a policy author should use.

use std::any::Any;
use std::cell::OnceCell;
use std::marker::PhantomData;

use crate::bindings::Guest;
use crate::{Action, Cell, Message, Policy};

/// Implements the component's exports for the policy type `P`.
pub struct Exporter<P>(PhantomData<P>);

/// Fails to compile unless `P` is a [`Policy`], so that `export_policy!`
/// checks its argument on every target, not only where it exports.
pub const fn assert_policy<P: Policy>() {}

thread_local! {
    // A component instance runs on one thread, so a thread-local is simply
    // the instance's global state, with no locking and no `Sync` bound on
    // policies. `Any` because the exporter is generic but a static cannot
    // be; exactly one policy type is exported per component.
    static POLICY: OnceCell<Box<dyn Any>> = const { OnceCell::new() };
}

impl<P: Policy> Guest for Exporter<P> {
    fn init(config: String) -> Result<(), String> {
        init::<P>(&config)
    }

    fn route(message: Message, cell: Cell) -> Result<Vec<Action>, String> {
        route::<P>(&message, &cell)
    }
}

/// Builds the policy and keeps it for [`route`].
pub fn init<P: Policy>(config: &str) -> Result<(), String> {
    // Before `P::init`, so that a panic while building the policy is
    // reported too.
    install_panic_hook();
    if POLICY.with(|slot| slot.get().is_some()) {
        // The contract says once per instance; a second call would silently
        // drop state the first built, so refuse it instead.
        return Err("policy init called twice on one instance".to_owned());
    }
    let policy = P::init(config)?;
    POLICY.with(|slot| {
        slot.set(Box::new(policy))
            .map_err(|_| "policy init called twice on one instance".to_owned())
    })
}

/// Routes one message with the policy [`init`] built.
pub fn route<P: Policy>(message: &Message, cell: &Cell) -> Result<Vec<Action>, String> {
    POLICY.with(|slot| {
        let policy = slot
            .get()
            .ok_or_else(|| "policy route called before a successful init".to_owned())?;
        let policy = policy
            .downcast_ref::<P>()
            .ok_or_else(|| "policy route called with a different policy type".to_owned())?;
        policy.route(message, cell)
    })
}

/// Sends panic messages to the host log.
///
/// The host grants no stderr, so without this a guest panic reaches the
/// operator only as an anonymous trap. Natively, the default hook (stderr)
/// is already right and test harnesses rely on it, so it is left alone.
fn install_panic_hook() {
    #[cfg(target_arch = "wasm32")]
    std::panic::set_hook(Box::new(|info| {
        crate::log::error(&format!("policy {info}"));
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Direction, MessageType};

    /// Counts routes, to prove the same value is kept between calls.
    struct Counter(std::cell::Cell<u32>);

    impl Policy for Counter {
        fn init(config: &str) -> Result<Self, String> {
            match config {
                "refuse" => Err("refused".to_owned()),
                _ => Ok(Counter(std::cell::Cell::new(0))),
            }
        }

        fn route(&self, _: &Message, _: &Cell) -> Result<Vec<Action>, String> {
            self.0.set(self.0.get() + 1);
            Ok(vec![Action::Drop(self.0.get().to_string())])
        }
    }

    fn message() -> Message {
        Message {
            uuid: "u".into(),
            message_type: MessageType::Targeted,
            direction: Direction::Down,
            method_name: "m".into(),
            routing_path: "api".into(),
            hop_count: 1,
            max_hop_count: 10,
            target_cell: Some("api".into()),
            need_response: false,
            fanout: false,
            is_origin: true,
            run_locally: false,
            ctxt: "{}".into(),
            method_kwargs: "{}".into(),
        }
    }

    fn cell() -> Cell {
        Cell {
            name: "api".into(),
            parents: Vec::new(),
            children: Vec::new(),
        }
    }

    fn dropped(actions: Result<Vec<Action>, String>) -> Option<String> {
        match actions.ok()?.as_slice() {
            [Action::Drop(reason)] => Some(reason.clone()),
            _ => None,
        }
    }

    // Each test runs on its own thread, so each sees a fresh instance.

    #[test]
    fn route_before_init_is_an_error() {
        assert!(route::<Counter>(&message(), &cell()).is_err());
    }

    #[test]
    fn init_keeps_the_policy_between_routes() {
        assert_eq!(<Exporter<Counter> as Guest>::init(String::new()), Ok(()));
        assert_eq!(
            dropped(route::<Counter>(&message(), &cell())).as_deref(),
            Some("1")
        );
        assert_eq!(
            dropped(<Exporter<Counter> as Guest>::route(message(), cell())).as_deref(),
            Some("2")
        );
    }

    #[test]
    fn refused_init_leaves_route_failing_and_init_retryable() {
        assert_eq!(init::<Counter>("refuse"), Err("refused".to_owned()));
        assert!(route::<Counter>(&message(), &cell()).is_err());
        assert_eq!(init::<Counter>(""), Ok(()));
        assert!(route::<Counter>(&message(), &cell()).is_ok());
    }

    #[test]
    fn second_init_is_refused() {
        assert_eq!(init::<Counter>(""), Ok(()));
        assert!(init::<Counter>("").is_err());
    }
}
