//! A policy call's deadline, counted in the CPU time of the thread that
//! runs it rather than in wall-clock time.
//!
//! The deadline is there to stop a policy that runs away (a loop that does
//! not end). Counted on the wall clock, it also stopped sound policies
//! whenever the host's thread was not scheduled for a few milliseconds,
//! which on a busy machine (a broker failing over beside the host) happens
//! often enough to dead-letter messages that did nothing wrong.
//!
//! The epoch ticker still drives it: a call starts with its epoch deadline
//! one tick away, and at each tick it reaches wasmtime asks [`CallClock`]
//! whether it may go on. The first tick of a call takes the thread's CPU
//! time as the reference; later ticks compare against it. Calls shorter
//! than a tick (nearly all) never read a clock. A policy gets at least its
//! budget of CPU time and at most one tick more, as the wall-clock deadline
//! gave before. A call that has held its thread for [`wall_cap`] of wall
//! time is stopped whatever its CPU time, so no call holds a worker forever.

use std::time::{Duration, Instant};

use wasmtime::UpdateDeadline;

/// Where one call stands against its deadline.
#[derive(Debug)]
pub struct CallClock {
    budget: Duration,
    /// The thread's CPU time and the wall clock at the call's first tick.
    first_tick: Option<(Duration, Instant)>,
}

impl CallClock {
    pub fn new() -> Self {
        CallClock {
            budget: Duration::ZERO,
            first_tick: None,
        }
    }

    /// Starts a call that may use `budget` of CPU time; the store's epoch
    /// deadline goes one tick away beside it (`policy::start_call`).
    pub fn start(&mut self, budget: Duration) {
        self.budget = budget;
        self.first_tick = None;
    }

    /// At an epoch tick during the call: go on for another tick, or stop.
    pub fn tick(&mut self) -> UpdateDeadline {
        let (cpu, now) = (thread_cpu_time(), Instant::now());
        match self.first_tick {
            None => {
                self.first_tick = Some((cpu, now));
                UpdateDeadline::Continue(1)
            }
            Some((cpu_then, then)) => {
                let used = cpu.saturating_sub(cpu_then);
                if over(self.budget, used, now.duration_since(then)) {
                    UpdateDeadline::Interrupt
                } else {
                    UpdateDeadline::Continue(1)
                }
            }
        }
    }
}

impl Default for CallClock {
    fn default() -> Self {
        CallClock::new()
    }
}

/// The wall time a call with `budget` may hold its thread, however little
/// of it the call was scheduled.
pub fn wall_cap(budget: Duration) -> Duration {
    (budget * 20).max(Duration::from_secs(1))
}

/// Whether a call with `budget` has used it up: `used` CPU time and
/// `elapsed` wall time since its first tick.
fn over(budget: Duration, used: Duration, elapsed: Duration) -> bool {
    used >= budget || elapsed >= wall_cap(budget)
}

/// The CPU time the calling thread has used. Where the platform has no such
/// clock, the wall clock since the first call stands in for it.
///
/// On Linux through the C library, whose clock_gettime also works under
/// valgrind (`scripts/plan-instructions`): rustix's own reading of the vDSO
/// faults there, on the first tick that lands inside a policy call.
#[cfg(target_os = "linux")]
fn thread_cpu_time() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is a
    // clock every Linux has. On failure (none is documented for it) no CPU
    // time is counted, and the call is still bounded by its wall-time cap.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

#[cfg(all(unix, not(target_os = "linux")))]
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

#[cfg(not(unix))]
fn thread_cpu_time() -> Duration {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_millis(5);

    #[test]
    fn a_call_descheduled_for_longer_than_its_budget_goes_on() {
        // 2 ms of CPU over 40 ms of wall time: the thread waited, the
        // policy did not run away.
        assert!(!over(
            BUDGET,
            Duration::from_millis(2),
            Duration::from_millis(40)
        ));
    }

    #[test]
    fn a_call_that_used_its_budget_of_cpu_is_stopped() {
        assert!(over(BUDGET, BUDGET, BUDGET));
        assert!(over(BUDGET, Duration::from_millis(7), BUDGET * 3));
    }

    #[test]
    fn a_call_starved_past_the_wall_cap_is_stopped() {
        assert_eq!(wall_cap(BUDGET), Duration::from_secs(1));
        assert!(over(BUDGET, Duration::ZERO, Duration::from_secs(1)));
        assert_eq!(wall_cap(Duration::from_millis(200)), Duration::from_secs(4));
    }

    #[test]
    fn the_first_tick_only_takes_the_reference() {
        let mut clock = CallClock::new();
        clock.start(Duration::ZERO);
        assert!(matches!(clock.tick(), UpdateDeadline::Continue(1)));
        assert!(matches!(clock.tick(), UpdateDeadline::Interrupt));
        clock.start(Duration::from_secs(3600));
        assert!(matches!(clock.tick(), UpdateDeadline::Continue(1)));
        assert!(matches!(clock.tick(), UpdateDeadline::Continue(1)));
    }

    #[test]
    fn the_thread_clock_counts_work_not_sleep() {
        let before = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(30));
        let slept = thread_cpu_time().saturating_sub(before);
        assert!(slept < Duration::from_millis(15), "sleeping used {slept:?}");
        let before = thread_cpu_time();
        let started = Instant::now();
        let mut x: u64 = 1;
        while started.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        assert!(thread_cpu_time() > before, "working used no CPU time ({x})");
    }
}
