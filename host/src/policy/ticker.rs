//! The engine's epoch ticker: the thread that advances wasmtime's epoch every
//! [`TICK`], so that a policy call running past its budget is interrupted.
//!
//! Only a call in progress needs the ticks, so the ticker parks once no call
//! has run for [`IDLE_TICKS`] ticks, and the next call wakes it: an idle host
//! is not woken a thousand times a second. Under traffic calls start between
//! any two ticks and the ticker never parks.
//!
//! A call announces itself ([`Ticker::enter`]) before its guest code runs and
//! for as long as it runs. The ticker parks only after it has said so
//! (`parked`) and then seen no call running; a call says it runs and then
//! looks at `parked`. Both in sequentially consistent order, so either the
//! ticker sees the call or the call sees the ticker parked and unparks it (a
//! pending unpark makes the next park return at once): a running call always
//! has a ticking ticker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::Duration;

use anyhow::{Context, Result};
use wasmtime::Engine;

/// One epoch tick; deadlines are counted in ticks.
pub const TICK: Duration = Duration::from_millis(1);

/// Ticks without any call before the ticker parks.
const IDLE_TICKS: u32 = 50;

/// The calls in progress, in the low 32 bits, and the calls started (the
/// high 32 bits, wrapping), in one word so that entering is one update.
const STARTED: u64 = 1 << 32;
const RUNNING: u64 = STARTED - 1;

/// The ticker of one engine.
pub struct Ticker {
    calls: AtomicU64,
    parked: AtomicBool,
    stop: AtomicBool,
    thread: Thread,
}

/// A call in progress: the ticker keeps ticking while one exists.
pub struct ActiveCall<'a>(&'a Ticker);

impl Ticker {
    /// Starts ticking `engine`'s epoch on a thread of its own, which ends
    /// when [`Ticker::stop`] is called.
    pub fn start(engine: Engine) -> Result<Arc<Ticker>> {
        let (handing, handed) = std::sync::mpsc::channel::<Arc<Ticker>>();
        let thread = std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                if let Ok(ticker) = handed.recv() {
                    ticker.run(&engine);
                }
            })
            .context("starting the epoch ticker")?;
        let ticker = Arc::new(Ticker {
            calls: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            thread: thread.thread().clone(),
        });
        handing
            .send(ticker.clone())
            .context("starting the epoch ticker: the thread is gone")?;
        Ok(ticker)
    }

    /// Announces a call about to run guest code; the ticker ticks until the
    /// returned guard is dropped.
    pub fn enter(&self) -> ActiveCall<'_> {
        self.calls.fetch_add(STARTED + 1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
        ActiveCall(self)
    }

    /// Ends the ticker's thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }

    /// Whether the ticker is parked now.
    #[cfg(test)]
    pub fn is_parked(&self) -> bool {
        self.parked.load(Ordering::SeqCst)
    }

    fn run(&self, engine: &Engine) {
        let mut idle = 0;
        let mut last = self.calls.load(Ordering::SeqCst);
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            engine.increment_epoch();
            let calls = self.calls.load(Ordering::SeqCst);
            if calls & RUNNING != 0 || calls != last {
                last = calls;
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < IDLE_TICKS {
                continue;
            }
            self.parked.store(true, Ordering::SeqCst);
            if self.calls.load(Ordering::SeqCst) & RUNNING == 0 && !self.stop.load(Ordering::SeqCst)
            {
                std::thread::park();
            }
            self.parked.store(false, Ordering::SeqCst);
            last = self.calls.load(Ordering::SeqCst);
            idle = 0;
        }
    }
}

impl Drop for ActiveCall<'_> {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        Engine::new(&config).expect("engine")
    }

    /// Waits up to `within` for `condition`.
    fn eventually(within: Duration, condition: impl Fn() -> bool) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if condition() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        condition()
    }

    #[test]
    fn an_idle_ticker_parks_and_a_call_wakes_it() {
        let ticker = Ticker::start(engine()).expect("ticker");
        assert!(
            eventually(Duration::from_secs(5), || ticker.is_parked()),
            "no call ran, yet the ticker kept ticking"
        );
        let call = ticker.enter();
        assert!(
            eventually(Duration::from_secs(5), || !ticker.is_parked()),
            "a call started, yet the ticker stayed parked"
        );
        // A call that runs on (a policy in a loop) keeps it ticking, however
        // long it runs.
        std::thread::sleep(TICK * (IDLE_TICKS * 3));
        assert!(!ticker.is_parked(), "parked while a call was running");
        drop(call);
        assert!(eventually(Duration::from_secs(5), || ticker.is_parked()));
        ticker.stop();
    }

    #[test]
    fn every_call_that_finds_the_ticker_parked_wakes_it() {
        // Park and wake, again and again: no wake-up is lost.
        let ticker = Ticker::start(engine()).expect("ticker");
        for _ in 0..20 {
            assert!(eventually(Duration::from_secs(5), || ticker.is_parked()));
            let call = ticker.enter();
            assert!(
                eventually(Duration::from_secs(5), || !ticker.is_parked()),
                "a call is running with the ticker parked"
            );
            drop(call);
        }
        ticker.stop();
    }
}
