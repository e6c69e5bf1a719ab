//! A deliberately misbehaving policy, for testing the host's defences.
//!
//! This crate owns the misbehaviours: each is chosen by the message's
//! `method_name` and attacks one invariant the host must enforce whatever a
//! policy does: traps, runaway CPU, memory and stack, memory that creeps up, oversized or illegal
//! action lists, policy errors, and attempts to reach the filesystem and
//! environment the host does not grant. Any other method is routed as Nova
//! would, so the adversary can stand in for the default policy in a working
//! network until a test triggers it.

use std::hint::black_box;
use std::sync::Mutex;

use cellhost_guest::{Action, Cell, Message, Policy};

/// How many relays `flood` asks for: far beyond any sane bound on the list.
const FLOOD_ACTIONS: usize = 100_000;

/// What `hog` grows by each step.
const HOG_CHUNK: usize = 1 << 20;

/// The `init` config that makes the adversary refuse to start.
const REFUSE_INIT_CONFIG: &str = "fail-init";

/// Where `hog` keeps what it allocates, so none of it can be freed or
/// optimised away.
static HOARD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// The misbehaving policy.
pub struct Adversary;

impl Policy for Adversary {
    fn init(config: &str) -> Result<Self, String> {
        if config == REFUSE_INIT_CONFIG {
            return Err("adversary: init refused by config".to_owned());
        }
        Ok(Adversary)
    }

    fn route(&self, message: &Message, cell: &Cell) -> Result<Vec<Action>, String> {
        match message.method_name.as_str() {
            "trap" => panic!("adversary: trap requested"),
            "spin" => spin(),
            "hog" => hog(),
            "leak" => {
                leak();
                nova_cells::route(message, cell)
            }
            "recurse" => Ok(vec![Action::Drop(format!("depth {}", recurse(0)))]),
            "flood" => Ok(flood(cell)),
            "stray" => Ok(vec![Action::Relay("no-such-cell".to_owned())]),
            "bloat" => Ok(vec![Action::Drop("x".repeat(1 << 20))]),
            "fail" => Err("adversary: refused by request".to_owned()),
            "read-file" => Err(read_file()),
            "read-env" => Err(read_env()),
            "read-data" => Err(read_data()),
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(30));
                Err("adversary: slept 30 s unhindered".to_owned())
            }
            "write-data" => Err(write_data()),
            _ => nova_cells::route(message, cell),
        }
    }
}

cellhost_guest::export_policy!(Adversary);

/// Burns CPU forever; only the host's fuel or epoch limit can stop it.
fn spin() -> ! {
    let mut counter = 0_u64;
    loop {
        // `black_box` makes each step observable, so the loop cannot be
        // proven side-effect free and deleted.
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Allocates without bound; only the host's memory limit can stop it.
fn hog() -> ! {
    loop {
        // Touching every page makes the memory real, not just reserved.
        let chunk = black_box(vec![0xA5_u8; HOG_CHUNK]);
        match HOARD.lock() {
            Ok(mut hoard) => hoard.push(chunk),
            // Poisoning needs a panic, which aborts in this build; if it
            // happens anyway, leaking is just as good as hoarding.
            Err(_) => std::mem::forget(chunk),
        }
    }
}

/// Keeps one more [`HOG_CHUNK`] for good on every call, then routes as
/// Nova would: a runtime whose memory creeps up call after call, which the
/// host renews before it reaches its cap.
fn leak() {
    let chunk = black_box(vec![0x5A_u8; HOG_CHUNK]);
    match HOARD.lock() {
        Ok(mut hoard) => hoard.push(chunk),
        Err(_) => std::mem::forget(chunk),
    }
}

/// Recurses without bound; only the host's stack limit can stop it.
fn recurse(depth: u64) -> u64 {
    // Never true, but opaque to the compiler, which would otherwise reject
    // (and could exploit) recursion with no way out.
    if black_box(depth) == u64::MAX {
        return depth;
    }
    // A frame-sized buffer kept live across the call makes every frame cost
    // stack, and using the result afterwards prevents tail-call elimination.
    let frame = black_box([depth; 16]);
    let below = recurse(black_box(depth + 1));
    black_box(below.wrapping_add(frame[black_box(0)]))
}

/// Far more actions than the host will accept.
///
/// The relays go to real neighbours where there are any, so that the only
/// thing wrong with the list is its length.
fn flood(cell: &Cell) -> Vec<Action> {
    let neighbours: Vec<&str> = cell
        .parents
        .iter()
        .chain(&cell.children)
        .map(|n| n.name.as_str())
        .collect();
    (0..FLOOD_ACTIONS)
        .map(|i| {
            let name = neighbours.get(i % neighbours.len().max(1)).copied();
            Action::Relay(name.unwrap_or("flood").to_owned())
        })
        .collect()
}

/// Tries to read a file the host never granted access to.
fn read_file() -> String {
    match std::fs::read_to_string("/etc/hostname") {
        Ok(contents) => format!(
            "adversary: read /etc/hostname ({} bytes): the sandbox leaks files",
            contents.len()
        ),
        Err(e) => format!("adversary: reading /etc/hostname failed: {e}"),
    }
}

/// Reads the folder an operator may grant, seen as `/data`.
fn read_data() -> String {
    match std::fs::read_to_string("/data/greeting.txt") {
        Ok(contents) => format!("adversary: /data/greeting.txt says {:?}", contents.trim()),
        Err(e) => format!("adversary: reading /data/greeting.txt failed: {e}"),
    }
}

/// Tries to write into the granted folder, which is read-only.
fn write_data() -> String {
    match std::fs::write("/data/graffiti.txt", b"was here") {
        Ok(()) => "adversary: wrote /data/graffiti.txt: the grant is writable".to_owned(),
        Err(e) => format!("adversary: writing /data/graffiti.txt failed: {e}"),
    }
}

/// Reports how much of the host's environment is visible.
fn read_env() -> String {
    let count = std::env::vars_os().count();
    let home = std::env::var_os("HOME").is_some();
    format!("adversary: {count} environment variables visible, HOME visible: {home}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellhost_guest::{Direction, MessageType};

    fn message(method_name: &str) -> Message {
        Message {
            uuid: "u".into(),
            message_type: MessageType::Targeted,
            direction: Direction::Down,
            method_name: method_name.into(),
            routing_path: "api-cell".into(),
            hop_count: 1,
            max_hop_count: 10,
            target_cell: Some("api-cell".into()),
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
            name: "api-cell".into(),
            parents: Vec::new(),
            children: Vec::new(),
        }
    }

    fn route(method_name: &str) -> Result<Vec<Action>, String> {
        Adversary.route(&message(method_name), &cell())
    }

    #[test]
    fn init_refuses_only_the_fail_init_config() {
        assert_eq!(
            Adversary::init("fail-init").err().as_deref(),
            Some("adversary: init refused by config")
        );
        assert!(Adversary::init("").is_ok());
    }

    #[test]
    fn flood_returns_a_hundred_thousand_relays_to_neighbours() {
        let mut cell = cell();
        cell.children = ["child-cell1", "child-cell2"]
            .map(|name| cellhost_guest::Neighbour {
                name: name.into(),
                is_parent: false,
                weight_offset: 0.0,
                weight_scale: 1.0,
                capabilities: Vec::new(),
            })
            .into();
        let actions = Adversary
            .route(&message("flood"), &cell)
            .unwrap_or_default();
        assert_eq!(actions.len(), FLOOD_ACTIONS);
        assert!(actions
            .iter()
            .all(|a| matches!(a, Action::Relay(to) if to.starts_with("child-cell"))));
    }

    #[test]
    fn stray_relays_to_a_cell_that_is_not_a_neighbour() {
        let actions = route("stray").unwrap_or_default();
        assert!(matches!(actions.as_slice(), [Action::Relay(to)] if to == "no-such-cell"));
    }

    #[test]
    fn fail_and_probes_are_policy_errors() {
        assert_eq!(
            route("fail").err().as_deref(),
            Some("adversary: refused by request")
        );
        assert!(route("read-file").is_err());
        assert!(route("read-env")
            .err()
            .is_some_and(|e| e.contains("environment variables visible")));
    }

    #[test]
    fn other_methods_are_routed_as_nova_would() {
        assert!(matches!(
            route("build_instances").as_deref(),
            Ok([Action::ProcessHere])
        ));
    }

    #[test]
    #[should_panic(expected = "adversary: trap requested")]
    fn trap_panics() {
        let _ = route("trap");
    }
}
