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
//! before the runtime starts its workers.

use std::fmt;

/// The scheduling class asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CpuScheduling {
    /// Linux's `SCHED_BATCH`: a woken thread waits for its turn instead of
    /// preempting; for throughput, the default.
    #[default]
    Batch,
    /// The operating system's default class (Linux's `SCHED_OTHER`).
    Normal,
}

impl fmt::Display for CpuScheduling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuScheduling::Batch => "batch",
            CpuScheduling::Normal => "normal",
        })
    }
}

impl std::str::FromStr for CpuScheduling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "batch" => Ok(CpuScheduling::Batch),
            "normal" => Ok(CpuScheduling::Normal),
            other => Err(format!(
                "no CPU scheduling class {other:?}: batch or normal"
            )),
        }
    }
}

/// Puts the calling thread, and so every thread it starts from now on, in
/// `class`. Only Linux has a batch class; elsewhere this does nothing.
pub fn apply(class: CpuScheduling) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let policy = match class {
            CpuScheduling::Batch => libc::SCHED_BATCH,
            CpuScheduling::Normal => libc::SCHED_OTHER,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param for the call's duration;
        // pid 0 is the calling thread. Moving between the normal and batch
        // classes needs no privilege.
        let result = unsafe { libc::sched_setscheduler(0, policy, &param) };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = class;
    Ok(())
}

/// The class of the calling thread, where the operating system tells it
/// and it is one of those above.
pub fn current() -> Option<CpuScheduling> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: no pointers; pid 0 is the calling thread.
        match unsafe { libc::sched_getscheduler(0) } {
            libc::SCHED_BATCH => Some(CpuScheduling::Batch),
            libc::SCHED_OTHER => Some(CpuScheduling::Normal),
            _ => None,
        }
    }
    #[cfg(not(target_os = "linux"))]
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn threads_started_after_apply_inherit_the_class() {
        // On a thread of its own, so the test harness's threads keep theirs.
        let seen = std::thread::spawn(|| {
            let mut seen = Vec::new();
            for class in [CpuScheduling::Batch, CpuScheduling::Normal] {
                apply(class).expect("moving between batch and normal needs no privilege");
                let here = current();
                let child = std::thread::spawn(current).join().expect("child thread");
                seen.push((class, here, child));
            }
            seen
        })
        .join()
        .expect("test thread");
        for (class, here, child) in seen {
            assert_eq!(here, Some(class));
            assert_eq!(child, Some(class), "a thread started after apply({class})");
        }
    }
}
