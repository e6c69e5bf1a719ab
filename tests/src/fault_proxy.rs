//! A fault-injecting TCP proxy for the tests: it sits on loopback between a
//! client (a cellhost, a lapin connection) and a RabbitMQ broker, forwards
//! bytes both ways, and on command breaks the link the ways real links break.
//!
//! - [`FaultProxy::cut`] resets every open connection, both sides, with a TCP
//!   RST (an abortive close, `SO_LINGER` 0). RST rather than FIN because it is
//!   the harsher and the deterministic case: bytes still in flight are thrown
//!   away, as when a broker host reboots or a middlebox drops its state, and
//!   Linux would send RST anyway when closing a socket with unread input, so a
//!   "clean" cut could not be promised. The client's next read fails with
//!   `ECONNRESET` (its next write with `EPIPE`/`ECONNRESET`); RabbitMQ sees the
//!   client vanish ("closed abruptly") and drops its exclusive queues.
//! - [`FaultProxy::refuse`] makes new connections fail: each one is accepted and
//!   reset at once, before a byte is forwarded. The listener itself stays open,
//!   because closing it and binding the same port again later could race with
//!   another socket taking that port. To a client this is a connection that
//!   fails during its handshake, as quickly as a refused `connect()`.
//! - [`FaultProxy::stall`] holds every byte, both ways, on every connection,
//!   without closing anything: a hung network. Bytes already read wait in the
//!   proxy, the rest wait in the kernel's buffers (TCP flow control then holds
//!   the sender); nothing is dropped, and when the stall ends they flow on in
//!   order. The client sees no error until a heartbeat times out.
//!
//! The proxy owns the sockets and the fault switches and knows nothing of
//! AMQP. Its counters ([`Traffic`]) and waits ([`FaultProxy::wait_connections`],
//! [`FaultProxy::wait_accepted`]) let a test know, without sleeping, that a
//! client connected again or that a cut took effect. Dropping the proxy
//! resets every connection and closes the listener.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long [`FaultProxy::cut`] waits for its connections to be gone; they
/// go within microseconds, so reaching this means a proxy task is stuck.
const CUT_PATIENCE: Duration = Duration::from_secs(5);

/// A TCP proxy from a port on 127.0.0.1 to one upstream address.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    switches: Arc<Switches>,
    accept: JoinHandle<()>,
}

/// What the proxy's tasks share with the handle the test holds.
struct Switches {
    upstream: SocketAddr,
    refusing: AtomicBool,
    stalled: watch::Sender<bool>,
    /// Bumped by every cut; each connection watches it.
    cuts: watch::Sender<u64>,
    traffic: watch::Sender<Traffic>,
}

/// What the proxy has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Connections accepted and forwarded (refused ones are not counted).
    pub accepted: u64,
    /// Connections reset on arrival because [`FaultProxy::refuse`] was on.
    pub refused: u64,
    /// Connections reset by [`FaultProxy::cut`] (or by dropping the proxy).
    pub cut: u64,
    /// Ids (order of acceptance) of the connections open now.
    live: BTreeSet<u64>,
}

impl Traffic {
    /// Connections open now: accepted and not yet closed on both sides.
    pub fn open(&self) -> usize {
        self.live.len()
    }
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards every connection to
    /// `upstream`, which must be a loopback address.
    pub async fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        if !upstream.ip().is_loopback() {
            bail!("the fault proxy only forwards to loopback, not to {upstream}");
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("fault proxy: binding a listener on 127.0.0.1")?;
        let addr = listener
            .local_addr()
            .context("fault proxy: reading the listener's address")?;
        let switches = Arc::new(Switches {
            upstream,
            refusing: AtomicBool::new(false),
            stalled: watch::Sender::new(false),
            cuts: watch::Sender::new(0),
            traffic: watch::Sender::new(Traffic::default()),
        });
        let accept = tokio::spawn(accept_loop(listener, switches.clone()));
        Ok(FaultProxy {
            addr,
            upstream,
            switches,
            accept,
        })
    }

    /// Where clients connect: 127.0.0.1 and the proxy's port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A snapshot of the counters.
    pub fn traffic(&self) -> Traffic {
        self.switches.traffic.borrow().clone()
    }

    /// Resets every connection open now, both sides (TCP RST), and returns
    /// how many there were once they are all closed. New connections are
    /// accepted as before.
    pub async fn cut(&self) -> Result<usize> {
        // Every connection with an id below this one subscribed to `cuts`
        // before it was counted, so the bump below reaches it.
        let (first_spared, victims) = {
            let traffic = self.switches.traffic.borrow();
            (traffic.accepted, traffic.live.len())
        };
        self.switches
            .cuts
            .send_modify(|generation| *generation += 1);
        self.wait_until(
            "every connection open at the cut to close",
            CUT_PATIENCE,
            |t| t.live.range(..first_spared).next().is_none(),
        )
        .await?;
        Ok(victims)
    }

    /// While on, each new connection is reset as soon as it arrives; open
    /// connections are left alone.
    pub fn refuse(&self, on: bool) {
        self.switches.refusing.store(on, Ordering::SeqCst);
    }

    /// While on, no byte moves in either direction on any connection (old or
    /// new), and nothing is closed; when off, the held bytes flow on in order.
    pub fn stall(&self, on: bool) {
        self.switches.stalled.send_replace(on);
    }

    /// The broker as a client sees it when it goes down for `outage`: open
    /// connections reset, new ones fail, then it is back.
    pub async fn down_for(&self, outage: Duration) -> Result<()> {
        self.refuse(true);
        let cut = self.cut().await;
        // The outage itself is the thing being simulated, not a wait for an event.
        tokio::time::sleep(outage).await;
        self.refuse(false);
        cut.map(|_| ())
    }

    /// Waits until exactly `n` connections are open.
    pub async fn wait_connections(&self, n: usize, timeout: Duration) -> Result<()> {
        self.wait_until(&format!("{n} open connection(s)"), timeout, |t| {
            t.open() == n
        })
        .await
    }

    /// Waits until at least `n` connections have been accepted since the
    /// start, e.g. to know that a client reconnected after a cut.
    pub async fn wait_accepted(&self, n: u64, timeout: Duration) -> Result<()> {
        self.wait_until(&format!("{n} accepted connection(s)"), timeout, |t| {
            t.accepted >= n
        })
        .await
    }

    async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Traffic) -> bool,
    ) -> Result<()> {
        let mut traffic = self.switches.traffic.subscribe();
        let outcome = tokio::time::timeout(timeout, async {
            traffic.wait_for(|t| done(t)).await.map(|_| ())
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => bail!(
                "fault proxy {} -> {}: stopped while waiting for {what}",
                self.addr,
                self.upstream
            ),
            Err(_) => {
                let now = self.traffic();
                bail!(
                    "fault proxy {} -> {}: no {what} within {timeout:?} \
                     (now {} open, {} accepted, {} refused, {} cut)",
                    self.addr,
                    self.upstream,
                    now.open(),
                    now.accepted,
                    now.refused,
                    now.cut
                )
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.switches
            .cuts
            .send_modify(|generation| *generation += 1);
    }
}

async fn accept_loop(listener: TcpListener, switches: Arc<Switches>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _peer)) => client,
            Err(e) => {
                // Out of file descriptors and the like: the client waits in the
                // backlog; retrying at once would spin.
                eprintln!("fault proxy: accept failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if switches.refusing.load(Ordering::SeqCst) {
            reset(&client);
            drop(client);
            switches.traffic.send_modify(|t| t.refused += 1);
            continue;
        }
        // Subscribed before the connection is counted: see `FaultProxy::cut`.
        let cuts = switches.cuts.subscribe();
        let mut id = 0;
        switches.traffic.send_modify(|t| {
            id = t.accepted;
            t.accepted += 1;
            t.live.insert(id);
        });
        tokio::spawn(serve(client, id, switches.clone(), cuts));
    }
}

/// How one connection ended.
enum Ending {
    /// Both sides closed their end; the proxy closed each with FIN.
    Clean,
    Cut,
    Failed(&'static str, io::Error),
}

/// Forwards one connection until it ends, then counts it closed.
async fn serve(
    mut client: TcpStream,
    id: u64,
    switches: Arc<Switches>,
    mut cuts: watch::Receiver<u64>,
) {
    let upstream = tokio::select! {
        biased;
        _ = cuts.changed() => Err(Ending::Cut),
        connected = TcpStream::connect(switches.upstream) => {
            connected.map_err(|e| Ending::Failed("connecting to the broker", e))
        }
    };
    let ending = match upstream {
        Err(ending) => {
            reset(&client);
            ending
        }
        Ok(mut upstream) => {
            // Small AMQP frames (confirms, heartbeats) must not wait for
            // Nagle; failing to set it only costs latency.
            let _ = upstream.set_nodelay(true);
            let _ = client.set_nodelay(true);
            let ending = tokio::select! {
                biased;
                _ = cuts.changed() => Ending::Cut,
                pumped = pump_both(&mut client, &mut upstream, &switches.stalled) => match pumped {
                    Ok(()) => Ending::Clean,
                    Err(failure) => failure,
                },
            };
            if !matches!(ending, Ending::Clean) {
                // Whatever broke one side, the other side learns it at once.
                reset(&client);
                reset(&upstream);
            }
            drop(upstream);
            ending
        }
    };
    drop(client);
    if let Ending::Failed(doing, e) = &ending {
        // Often ordinary (lapin resets its socket after a clean AMQP close),
        // but it tells a failing test which side broke a link, and when.
        eprintln!(
            "fault proxy: connection {id} to {} ended, the other side reset too: {doing}: {e}",
            switches.upstream
        );
    }
    switches.traffic.send_modify(|t| {
        t.live.remove(&id);
        if matches!(ending, Ending::Cut) {
            t.cut += 1;
        }
    });
}

/// Forwards both directions until both have ended, or one fails.
async fn pump_both(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    stalled: &watch::Sender<bool>,
) -> std::result::Result<(), Ending> {
    let (client_in, client_out) = client.split();
    let (upstream_in, upstream_out) = upstream.split();
    tokio::try_join!(
        pump(
            (client_in, "reading from the client"),
            (upstream_out, "writing to the broker"),
            stalled.subscribe(),
        ),
        pump(
            (upstream_in, "reading from the broker"),
            (client_out, "writing to the client"),
            stalled.subscribe(),
        ),
    )?;
    Ok(())
}

/// Copies `from` to `to` until `from` ends, holding the bytes while stalled.
/// Each side comes with what the proxy is doing to it, for the log.
async fn pump(
    (mut from, reading): (ReadHalf<'_>, &'static str),
    (mut to, writing): (WriteHalf<'_>, &'static str),
    mut stalled: watch::Receiver<bool>,
) -> std::result::Result<(), Ending> {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = from
            .read(&mut buffer)
            .await
            .map_err(|e| Ending::Failed(reading, e))?;
        // A stall holds what was just read here, and everything behind it in
        // the kernel; an end of stream is held too, it is traffic as well.
        if stalled.wait_for(|on| !*on).await.is_err() {
            return Err(Ending::Cut);
        }
        if read == 0 {
            // Half-close: the peer learns this side is done, the other
            // direction keeps flowing.
            return to.shutdown().await.map_err(|e| Ending::Failed(writing, e));
        }
        to.write_all(&buffer[..read])
            .await
            .map_err(|e| Ending::Failed(writing, e))?;
    }
}

/// Makes the coming close of `stream` an abortive one (RST, not FIN).
fn reset(stream: &TcpStream) {
    // Failing here leaves a FIN close, which still closes the connection.
    if let Err(e) = stream.set_zero_linger() {
        eprintln!("fault proxy: cannot set SO_LINGER 0, closing with FIN: {e}");
    }
}
