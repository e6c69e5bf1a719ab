//! How the host's threads ask the operating system to schedule them.
//!
//! A relayed message wakes a thread at every step: the worker that plans it
//! wakes the AMQP client's I/O thread to write the publish, the I/O thread
//! wakes a worker when the confirm comes back, and so on. On Linux a woken
//! thread of the normal class preempts the one that woke it when it has
//! waited longer, so on a busy machine each publish can cost two context
//! switches: the worker is stopped after queuing one message, the I/O
//! thread writes that one alone, and the worker resumes. Threads of the
//! batch class (`SCHED_BATCH`) get the same share of the CPU but never
//! preempt on wake-up: the worker queues every publish it has in hand before
//! the I/O thread runs, and the I/O thread writes them together. A thread a
//! woken batch thread would have preempted keeps running; an idle core still
//! takes the woken thread at once, so an idle host answers as fast as
//! before.
//!
//! The class is set on the calling thread and every thread it starts
//! afterwards inherits it, so the binary sets it first thing in `main`,
//! before the runtime starts its workers. Only a process in the normal class
//! is moved: one an operator started in another class keeps it.

use std::fmt;

use clap::ValueEnum;

/// What the binary does with its scheduling class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum CpuScheduling {
    /// Move from the normal class to Linux's `SCHED_BATCH`, where a woken
    /// thread waits for its turn instead of preempting: for throughput, the
    /// default. A process started in another class (by systemd's
    /// `CPUSchedulingPolicy=`, by `chrt`) keeps it.
    #[default]
    Batch,
    /// Keep the class the process was started in.
    Keep,
}

/// Named as on the command line (clap's names for the variants).
impl fmt::Display for CpuScheduling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_possible_value() {
            Some(value) => f.write_str(value.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

/// Read by the command line's names, as the benches' environment gives them.
impl std::str::FromStr for CpuScheduling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        <Self as ValueEnum>::from_str(s, false)
    }
}

/// A Linux scheduling class, as `sched_getscheduler` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `SCHED_OTHER`, the default.
    Normal,
    /// `SCHED_BATCH`.
    Batch,
    /// Any other (`SCHED_IDLE`, the real-time classes).
    Other,
}

/// Applies `choice` to the calling thread; every thread it starts from now on
/// inherits the class. Only Linux has a batch class; elsewhere this does
/// nothing.
pub fn apply(choice: CpuScheduling) -> std::io::Result<()> {
    if choice == CpuScheduling::Batch && current() == Some(Class::Normal) {
        #[cfg(target_os = "linux")]
        set(libc::SCHED_BATCH)?;
    }
    Ok(())
}

/// Puts the calling thread in `policy`.
#[cfg(target_os = "linux")]
fn set(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call's duration; pid 0
    // is the calling thread. Moving between the normal, batch and idle
    // classes needs no privilege.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The class of the calling thread, where the operating system tells it.
pub fn current() -> Option<Class> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: no pointers; pid 0 is the calling thread.
        match unsafe { libc::sched_getscheduler(0) } {
            libc::SCHED_OTHER => Some(Class::Normal),
            libc::SCHED_BATCH => Some(Class::Batch),
            -1 => None,
            _ => Some(Class::Other),
        }
    }
    #[cfg(not(target_os = "linux"))]
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Runs `f` on a thread of its own, so the test harness's threads keep
    /// their class.
    fn on_own_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("test thread")
    }

    #[test]
    fn choices_read_and_print_by_their_command_line_names() {
        for (name, choice) in [
            ("batch", CpuScheduling::Batch),
            ("keep", CpuScheduling::Keep),
        ] {
            assert_eq!(name.parse::<CpuScheduling>(), Ok(choice));
            assert_eq!(choice.to_string(), name);
        }
        assert!("normal".parse::<CpuScheduling>().is_err());
    }

    #[test]
    fn batch_moves_a_normal_thread_and_the_threads_it_starts() {
        let (here, child) = on_own_thread(|| {
            set(libc::SCHED_OTHER).expect("moving to the normal class");
            apply(CpuScheduling::Batch).expect("moving to batch needs no privilege");
            (
                current(),
                std::thread::spawn(current).join().expect("child"),
            )
        });
        assert_eq!(here, Some(Class::Batch));
        assert_eq!(child, Some(Class::Batch), "a thread started after apply");
    }

    #[test]
    fn keep_and_other_classes_are_left_alone() {
        let kept = on_own_thread(|| {
            set(libc::SCHED_OTHER).expect("moving to the normal class");
            apply(CpuScheduling::Keep).expect("keep does nothing");
            current()
        });
        assert_eq!(kept, Some(Class::Normal));
        let idle = on_own_thread(|| {
            set(libc::SCHED_IDLE).expect("moving to the idle class needs no privilege");
            apply(CpuScheduling::Batch).expect("another class is left alone");
            current()
        });
        assert_eq!(idle, Some(Class::Other));
    }
}
