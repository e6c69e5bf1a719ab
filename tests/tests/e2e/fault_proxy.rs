//! The fault proxy itself, between a lapin client and the real RabbitMQ on
//! 127.0.0.1:5672: it forwards faithfully, and each fault looks to the client
//! the way the fault harness promises (reset, refused, stalled).
//!
//! The tests use the default vhost with one exclusive, auto-deleted queue per
//! connection, so nothing is left on the broker whatever happens.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cellhost_tests::fault_proxy::FaultProxy;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ErrorKind,
    Event, PublisherConfirm,
};

const RABBIT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5672);

/// How long "promptly" may take: far above what loopback needs, far below a
/// heartbeat timeout, so a pass means the fault itself was noticed.
const PROMPTLY: Duration = Duration::from_secs(3);

/// A lapin connection through the proxy with a confirm channel and a
/// consumer on a queue of its own.
struct Link {
    connection: Connection,
    channel: Channel,
    queue: String,
    consumer: Consumer,
}

fn uri(proxy: &FaultProxy) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port())
}

async fn connect(proxy: &FaultProxy) -> lapin::Result<Connection> {
    Connection::connect(&uri(proxy), ConnectionProperties::default()).await
}

impl Link {
    async fn open(proxy: &FaultProxy) -> Result<Link> {
        let connection = connect(proxy)
            .await
            .context("connecting through the proxy")?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = format!("fault-proxy-{}", uuid::Uuid::new_v4().simple());
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "fault-proxy-test".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Link {
            connection,
            channel,
            queue,
            consumer,
        })
    }

    /// Publishes `body` to the link's own queue; the confirm is still to come.
    async fn publish(&self, body: &[u8]) -> lapin::Result<PublisherConfirm> {
        self.channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
    }

    /// The next message on the link's queue.
    async fn receive(&mut self, patience: Duration) -> Result<Vec<u8>> {
        match tokio::time::timeout(patience, self.consumer.next()).await {
            Ok(Some(Ok(delivery))) => Ok(delivery.data),
            Ok(Some(Err(e))) => bail!("consumer failed: {e}"),
            Ok(None) => bail!("consumer ended"),
            Err(_) => bail!("no message within {patience:?}"),
        }
    }

    async fn close(self) {
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

async fn confirmed(confirm: PublisherConfirm, patience: Duration) -> Result<()> {
    match tokio::time::timeout(patience, confirm).await {
        Ok(Ok(Confirmation::Ack(_))) => Ok(()),
        Ok(Ok(other)) => bail!("the broker did not ack the publish: {other:?}"),
        Ok(Err(e)) => bail!("the publish failed: {e}"),
        Err(_) => bail!("no confirm within {patience:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_publishes_with_confirms_and_consumes_through_the_proxy() -> Result<()> {
    let proxy = FaultProxy::start(RABBIT).await?;
    let mut link = Link::open(&proxy).await?;
    for n in 0..3 {
        let body = format!("through the proxy {n}");
        confirmed(link.publish(body.as_bytes()).await?, PROMPTLY).await?;
        assert_eq!(link.receive(PROMPTLY).await?, body.as_bytes());
    }
    let traffic = proxy.traffic();
    assert_eq!((traffic.accepted, traffic.open()), (1, 1));
    link.close().await;
    // A clean AMQP close ends the proxied connection too.
    proxy.wait_connections(0, PROMPTLY).await?;
    assert_eq!(proxy.traffic().cut, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_resets_the_client_connection_at_once_and_new_ones_still_work() -> Result<()> {
    let proxy = FaultProxy::start(RABBIT).await?;
    let mut link = Link::open(&proxy).await?;
    let mut events = link.connection.events_listener();
    assert_eq!(proxy.cut().await?, 1, "one connection was open at the cut");
    assert_eq!(proxy.traffic().open(), 0);

    // The client learns it from the socket, not from a heartbeat timeout.
    let error = tokio::time::timeout(PROMPTLY, async {
        while let Some(event) = events.next().await {
            if let Event::Error(e) = event {
                return Some(e);
            }
        }
        None
    })
    .await
    .context("no connection error event after the cut")?
    .context("the event stream ended without an error")?;
    println!("lapin after a cut: event Error({:?})", error.kind());
    match error.kind() {
        ErrorKind::IOError(io) => assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset),
        other => panic!("expected a connection reset, got {other:?}"),
    }
    assert!(
        link.connection.status().errored(),
        "connection state after a cut: {:?}",
        link.connection.status()
    );
    // The consumer and the channel say so too.
    let consumed = tokio::time::timeout(PROMPTLY, link.consumer.next())
        .await
        .context("the consumer neither failed nor ended after the cut")?;
    println!(
        "lapin after a cut: consumer yields {:?}",
        consumed
            .as_ref()
            .map(|r| r.as_ref().map(|_| "a delivery").map_err(|e| e.kind()))
    );
    assert!(
        !matches!(consumed, Some(Ok(_))),
        "a delivery arrived on a cut connection"
    );
    let published = link.publish(b"into the void").await;
    println!(
        "lapin after a cut: basic_publish {:?}",
        published.as_ref().err().map(|e| e.kind())
    );
    assert!(published.is_err(), "a publish on a cut connection failed");

    // The proxy keeps accepting: a new connection works.
    let mut again = Link::open(&proxy).await?;
    confirmed(again.publish(b"after the cut").await?, PROMPTLY).await?;
    assert_eq!(again.receive(PROMPTLY).await?, b"after the cut");
    assert_eq!(proxy.traffic().accepted, 2);
    again.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_fails_new_connections_and_spares_open_ones_until_lifted() -> Result<()> {
    let proxy = FaultProxy::start(RABBIT).await?;
    let mut open = Link::open(&proxy).await?;

    proxy.refuse(true);
    let refused = tokio::time::timeout(PROMPTLY, connect(&proxy))
        .await
        .context("a connection attempt while refusing neither failed nor succeeded")?;
    let error = match refused {
        Ok(_) => panic!("a connection opened while the proxy refused them"),
        Err(e) => e,
    };
    println!("lapin connect while refusing: {:?}", error.kind());
    assert!(
        matches!(error.kind(), ErrorKind::IOError(_)),
        "expected an I/O error, got {error}"
    );
    assert_eq!(proxy.traffic().refused, 1);

    // The connection opened before is untouched.
    confirmed(open.publish(b"while refusing").await?, PROMPTLY).await?;
    assert_eq!(open.receive(PROMPTLY).await?, b"while refusing");

    proxy.refuse(false);
    let back = Link::open(&proxy).await?;
    proxy.wait_connections(2, PROMPTLY).await?;
    back.close().await;
    open.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_holds_a_confirm_without_closing_then_delivers_it() -> Result<()> {
    let proxy = FaultProxy::start(RABBIT).await?;
    let mut link = Link::open(&proxy).await?;

    proxy.stall(true);
    let confirm = link.publish(b"held").await?;
    tokio::pin!(confirm);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut confirm)
            .await
            .is_err(),
        "a confirm arrived through a stalled link"
    );
    assert!(
        link.connection.status().connected(),
        "the client still believes its connection is up: {:?}",
        link.connection.status()
    );
    assert_eq!(proxy.traffic().open(), 1);

    proxy.stall(false);
    match tokio::time::timeout(PROMPTLY, confirm).await {
        Ok(Ok(Confirmation::Ack(_))) => {}
        other => panic!("the held publish was not acked after the stall: {other:?}"),
    }
    assert_eq!(link.receive(PROMPTLY).await?, b"held");
    assert_eq!(proxy.traffic().cut, 0);
    link.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_proxy_closes_its_connections() -> Result<()> {
    let proxy = FaultProxy::start(RABBIT).await?;
    let link = Link::open(&proxy).await?;
    let mut events = link.connection.events_listener();
    drop(proxy);
    let errored = tokio::time::timeout(PROMPTLY, async {
        while let Some(event) = events.next().await {
            if matches!(event, Event::Error(_)) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        errored.ok(),
        Some(true),
        "no error after the proxy went away"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_resets_a_stalled_connection_and_held_bytes_are_lost() -> Result<()> {
    let proxy = FaultProxy::start(RABBIT).await?;
    let link = Link::open(&proxy).await?;
    proxy.stall(true);
    let confirm = link.publish(b"held, then lost").await?;
    assert_eq!(proxy.cut().await?, 1);
    match tokio::time::timeout(PROMPTLY, confirm).await {
        Ok(Err(e)) => println!("lapin: a confirm held at the cut: {:?}", e.kind()),
        other => panic!("a confirm held at a cut should fail, got {other:?}"),
    }
    assert!(link.connection.status().errored());

    // A stall also holds a new connection's handshake: connecting hangs.
    let hung = tokio::time::timeout(Duration::from_millis(500), connect(&proxy)).await;
    assert!(hung.is_err(), "a connection opened through a stalled proxy");
    proxy.stall(false);
    let link = Link::open(&proxy).await?;
    link.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_for_resets_open_connections_and_comes_back() -> Result<()> {
    let proxy = FaultProxy::start(RABBIT).await?;
    let link = Link::open(&proxy).await?;
    proxy.down_for(Duration::from_millis(100)).await?;
    assert!(link.connection.status().errored());
    let traffic = proxy.traffic();
    assert_eq!((traffic.cut, traffic.open()), (1, 0));
    let mut back = Link::open(&proxy).await?;
    confirmed(back.publish(b"back up").await?, PROMPTLY).await?;
    assert_eq!(back.receive(PROMPTLY).await?, b"back up");
    back.close().await;
    Ok(())
}

/// cellhost's own transport through the proxy: a cut link reconnects by
/// itself, declarations are made again, and the same inbox goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_transport_heals_after_a_cut() -> Result<()> {
    use cellhost::config::{RabbitOptions, TransportUrl};
    use cellhost::transport::{Broker, Outcome, Publication, QueueSpec, Role};

    let proxy = FaultProxy::start(RABBIT).await?;
    let url: TransportUrl = format!("rabbit://guest:guest@127.0.0.1:{}/", proxy.port())
        .parse()
        .context("a proxy URL")?;
    let broker = Broker::connect(&url, &RabbitOptions::default(), "fault-proxy-test").await?;
    let queue = QueueSpec {
        name: format!("fault-proxy-host-{}", uuid::Uuid::new_v4().simple()),
        durable: false,
        auto_delete: true,
        arguments: Default::default(),
        role: Role::ReplyQueue,
    };
    broker.declare_queue(&queue, "", "").await?;
    let mut inbox = broker
        .consume(std::slice::from_ref(&queue.name), 10, "fault-proxy-test")
        .await?;
    let publication =
        |text: &str| Publication::new("", queue.name.as_str(), text.as_bytes().to_vec());
    broker.publish(&publication("via the host")).await?;
    let inbound = tokio::time::timeout(PROMPTLY, inbox.next())
        .await
        .context("no delivery through the proxy")?
        .context("the inbox ended")?;
    assert_eq!(inbound.body, b"via the host");
    inbound.settle(Outcome::Ack);
    assert_eq!(proxy.traffic().open(), 1, "the host uses one connection");

    assert_eq!(proxy.cut().await?, 1);
    // The link comes back by itself on a new connection.
    proxy.wait_accepted(2, PROMPTLY).await?;
    let mut state = broker.state();
    tokio::time::timeout(PROMPTLY, state.wait_for(|s| s.up && s.generation == 2))
        .await
        .context("the link did not come back up")??;
    // The auto-delete queue went with the old connection; it was declared
    // again, and the inbox consumes it again.
    broker.publish(&publication("after the cut")).await?;
    let inbound = tokio::time::timeout(PROMPTLY, inbox.next())
        .await
        .context("no delivery after the cut")?
        .context("the inbox ended")?;
    assert_eq!(inbound.body, b"after the cut");
    inbound.settle(Outcome::Ack);
    broker.close().await;
    Ok(())
}
