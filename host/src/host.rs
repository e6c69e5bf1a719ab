//! A running cell: its broker connections, the queues it declares, and one
//! consumer loop per message type that carries out the router's plans.
//!
//! The loop keeps up to `confirm_window` messages in flight: it plans each
//! message as it arrives, starts its publications at once, and settles the
//! source only when every publication is confirmed by its broker. Nothing
//! awaits one publish before starting the next. A plan that is one plain
//! publication goes on the consumer's own lane to its broker
//! ([`crate::lanes`]), whose verdicts the loop collects itself; any other
//! plan, and any publish a lane does not see through, is carried out by a
//! future of its own on the links' road.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::Caller;
use crate::config::Config;
use crate::file_watch::FileWatch;
use crate::lanes::{Carried, Lanes};
use crate::links::Links;
use crate::neighbours::{
    connect_neighbour, declare_park_queue, first_attempts, NeighbourLinks, NeighboursChanged,
};
use crate::policy::{LoadedPolicy, PolicyEngine};
use crate::reload::{PolicyReloader, Reloaded};
use crate::responses::{Answering, Waiters};
use crate::router::{Plan, RouteWorker, Router, Target, OWN_LINK};
use crate::transport::{Broker, Inbound, Outcome, Publication, PublishError};
use crate::wire::MessageType;

/// How long a message whose publication failed on the own broker waits
/// before going back to its queue, so a broken broker is not hammered.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);
/// At most this many deliveries already at hand are planned together before
/// their publications start.
const PLAN_BATCH: usize = 32;

/// One cell being served.
pub struct CellHost {
    router: Arc<Router>,
    links: Arc<Links>,
    shutdown: watch::Sender<bool>,
    consumers: Vec<JoinHandle<()>>,
    /// The neighbour links, their drainers, and changes to them.
    neighbours: Arc<NeighbourLinks>,
    neighbours_watch: Option<FileWatch>,
    reloader: Option<(Arc<PolicyReloader>, Option<FileWatch>)>,
}

impl CellHost {
    /// Connects to the cell's broker and every neighbour's, declares what an
    /// oslo RPC server declares, and starts consuming.
    pub async fn start(config: Config, policy: Arc<LoadedPolicy>) -> Result<CellHost> {
        let name = config.cell.name.clone();
        let own = Broker::connect(
            &config.cell.transport_url,
            &config.oslo_messaging_rabbit,
            &name,
        )
        .await
        .with_context(|| format!("cell {name}: own broker {}", config.cell.transport_url))?;
        // Each declaration is what an oslo RPC server declares for the same
        // role under this broker's [oslo_messaging_rabbit] options, so oslo
        // services and cellhost can declare the same names in any order.
        let oslo = own.oslo();
        let exchange = config.cell.control_exchange.clone();
        own.declare_exchange(&oslo.control_exchange(&exchange))
            .await?;

        let host_id = config.host_id();
        let mut queues_by_kind = Vec::new();
        for kind in MessageType::all() {
            let topic = format!("{}.{}", config.cell.queue_base, kind.as_str());
            let per_host = format!("{topic}.{host_id}");
            own.declare_queue(&oslo.topic_queue(&topic), &exchange, &topic)
                .await?;
            own.declare_queue(&oslo.topic_queue(&per_host), &exchange, &per_host)
                .await?;
            let fanout = format!("{topic}_fanout");
            own.declare_exchange(&oslo.fanout_exchange(&fanout)).await?;
            // Named for this process alone; as oslo's, it outlives a lost
            // connection and expires once unused (x-expires).
            let fanout_queue = oslo.fanout_queue(&format!("{fanout}_{}", crate::new_unique_id()));
            own.declare_queue(&fanout_queue, &fanout, &topic).await?;
            queues_by_kind.push((kind, vec![topic, per_host, fanout_queue.name]));
        }
        // Local deliveries wait in the worker's queue even before it starts.
        let local = &config.local.topic;
        own.declare_queue(&oslo.topic_queue(local), &exchange, local)
            .await?;
        let dead = oslo.dead_letter_queue(&format!("{}.dead", config.cell.queue_base));
        own.declare_queue(&dead, "", "").await?;
        for n in &config.neighbours {
            declare_park_queue(&own, &config, &n.name).await?;
        }

        // A neighbour that is down does not stop the cell: its link keeps
        // trying in the background and its relays are parked meanwhile.
        let mut neighbours = HashMap::new();
        for n in &config.neighbours {
            let broker = connect_neighbour(&config, n).await.with_context(|| {
                format!("cell {name}: neighbour {} at {}", n.name, n.transport_url)
            })?;
            neighbours.insert(n.name.clone(), broker);
        }
        first_attempts(neighbours.values()).await;
        let caller = Caller::start(own.clone()).await?;

        let prefetch = config.cell.prefetch;
        let window = config.cell.confirm_window;
        let router = Router::new(config, policy, caller.reply_queue().to_string());
        let links = Arc::new(Links::new(router.clone(), own, neighbours));
        let answering = Arc::new(Answering {
            router: router.clone(),
            caller,
            waiters: Waiters::default(),
            own: links.own.clone(),
        });
        let (shutdown, stop) = watch::channel(false);
        let mut consumers = Vec::new();
        router.watch_link(OWN_LINK, links.own.state());
        let neighbours = NeighbourLinks::start(router.clone(), links.clone());
        // The file is watched from the start: an edit made while the
        // consumers start is not missed.
        let neighbours_watch = match router.config().cell.neighbours_file {
            Some(_) => Some(neighbours.watch()?),
            None => None,
        };
        for (kind, queues) in queues_by_kind {
            let tag = format!("cellhost-{name}-{}", kind.as_str());
            let inbox = links.own.consume(&queues, prefetch, &tag).await?;
            let worker = RouteWorker::new(router.clone());
            consumers.push(tokio::spawn(serve(
                inbox,
                worker,
                links.clone(),
                answering.clone(),
                window,
                stop.clone(),
            )));
        }
        tracing::info!(cell = %name, neighbours = links.neighbours().len(), policy = router.active_policy().version(), "cell serving");
        Ok(CellHost {
            router,
            links,
            shutdown,
            consumers,
            neighbours,
            neighbours_watch,
            reloader: None,
        })
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// The cell's links: its own broker and each neighbour's.
    pub fn links(&self) -> &Arc<Links> {
        &self.links
    }

    /// Lets the cell's policy be reloaded with `engine`, and with `watch`,
    /// reloads it whenever its file changes.
    pub fn enable_reload(
        &mut self,
        engine: Arc<PolicyEngine>,
        watch: bool,
    ) -> Result<Arc<PolicyReloader>> {
        let reloader = PolicyReloader::new(engine, self.router.clone());
        let guard = if watch && reloader.path().is_some() {
            Some(reloader.watch()?)
        } else {
            None
        };
        self.reloader = Some((reloader.clone(), guard));
        Ok(reloader)
    }

    /// Reloads the policy from its file now (SIGHUP, an operator's request).
    pub async fn reload_policy(&self) -> Result<Reloaded> {
        match &self.reloader {
            Some((reloader, _)) => reloader.reload().await,
            None => anyhow::bail!(
                "reloading is not enabled for cell {}",
                self.router.cell_name()
            ),
        }
    }

    /// The cell's neighbour links: to change them, or see why a neighbours
    /// file was refused.
    pub fn neighbours(&self) -> &Arc<NeighbourLinks> {
        &self.neighbours
    }

    /// Re-reads the neighbours file and applies it now (SIGHUP).
    pub async fn reload_neighbours(&self) -> Result<NeighboursChanged> {
        self.neighbours.reload().await
    }

    /// Returns when a consumer stops on its own (its broker went away).
    pub async fn stopped(&mut self) {
        if self.consumers.is_empty() {
            return futures::future::pending().await;
        }
        let (_, index, _) = futures::future::select_all(self.consumers.iter_mut()).await;
        self.consumers.remove(index);
    }

    /// Stops consuming, finishes what is in flight, and closes the connections.
    pub async fn shutdown(mut self) {
        // No reload may swap a policy in while the consumers drain.
        self.reloader = None;
        self.neighbours_watch = None;
        let _ = self.shutdown.send(true);
        for task in self.consumers {
            let _ = task.await;
        }
        self.neighbours.shutdown().await;
        self.links.own.close().await;
        tracing::info!(cell = %self.router.cell_name(), "cell stopped");
    }
}

/// One consumer: plan each message as it arrives, keep up to `window` of them
/// in flight, settle each when its publications are confirmed.
///
/// Deliveries that are already at hand when one arrives are planned with it
/// (up to [`PLAN_BATCH`]) before any of their publications starts: the
/// publications then leave together, which lets the client write them to
/// the socket in fewer writes, and the broker read them in fewer reads.
async fn serve(
    mut inbox: crate::transport::Inbox,
    mut worker: RouteWorker,
    links: Arc<Links>,
    answering: Arc<Answering>,
    window: usize,
    mut stop: watch::Receiver<bool>,
) {
    let router = worker.router().clone();
    router.consumer_running(true);
    let mut in_flight = FuturesUnordered::new();
    let mut lanes = Lanes::new(links.clone());
    let mut decided = Vec::new();
    let mut planned = Vec::with_capacity(PLAN_BATCH);
    let publish_timeout = links.own.publish_timeout();
    // How often the lanes are checked for a publish waiting past the
    // timeout: a stalled link is given up within a quarter of it more.
    let mut lane_check = tokio::time::interval(publish_timeout / 4);
    lane_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut taking = true;
    // Plans the lanes did not take, for the links' road.
    let carry = |plan: Plan, inbound: Inbound| {
        carry_out(plan, inbound, links.clone(), answering.clone(), None)
    };
    loop {
        if !taking && in_flight.is_empty() && lanes.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            _ = stop.changed(), if taking => {
                // Stop taking messages, but finish the ones already started.
                taking = false;
                router.consumer_running(false);
                inbox = Box::pin(futures::stream::pending());
            }
            () = std::future::poll_fn(|cx| lanes.poll_decided(cx)), if !lanes.is_empty() => {
                lanes.take_decided(&mut decided);
                for (carried, outcome) in decided.drain(..) {
                    let Carried { mut plan, inbound, .. } = carried;
                    match outcome {
                        Ok(()) => {
                            // Remembered: the message was carried out.
                            if let Some(claim) = plan.claim.take() {
                                claim.settled();
                            }
                            inbound.settle(Outcome::Ack);
                        }
                        // Parked, dead-lettered or requeued, as the links'
                        // road does with a publish its broker did not take.
                        Err(e) => in_flight.push(carry_out(plan, inbound, links.clone(), answering.clone(), Some(e))),
                    }
                }
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            _ = lane_check.tick(), if !lanes.is_empty() => lanes.expire(publish_timeout),
            inbound = inbox.next(), if taking && in_flight.len() + lanes.len() < window => {
                let Some(inbound) = inbound else {
                    tracing::error!(cell = %router.cell_name(), "consumer ended: the broker connection is gone");
                    taking = false;
                    router.consumer_running(false);
                    inbox = Box::pin(futures::stream::pending());
                    continue;
                };
                // Deliveries already at hand are all planned first, then
                // published back to back (on a lane, at once; on the links'
                // road, when the loop next polls their futures), so the
                // client finds them together rather than one per plan.
                let mut next = Some(inbound);
                while let Some(mut inbound) = next.take() {
                    let plan = worker.plan(&inbound.body, inbound.expiration_ms);
                    inbound.planned();
                    planned.push((plan, inbound));
                    if planned.len() < PLAN_BATCH
                        && in_flight.len() + lanes.len() + planned.len() < window
                    {
                        next = inbox.next().now_or_never().flatten();
                    }
                }
                for (plan, inbound) in planned.drain(..) {
                    if let Some((plan, inbound)) = lanes.offer(plan, inbound) {
                        in_flight.push(carry(plan, inbound));
                    }
                }
            }
        }
    }
}

/// Makes a plan's publications concurrently; acks the source once each is
/// safe (confirmed where it goes, parked for a neighbour that cannot take it
/// now, or dead-lettered when no queue takes it), or requeues it after a
/// pause if one is nowhere safe (the own broker failed). Then, if the
/// message wants an answer, answers it in the background: the source does
/// not wait on other cells.
///
/// `published` is what became of a plan's one publication already made on
/// a lane, when its broker did not take it: it is concluded as the links'
/// road concludes a publication that failed, without publishing it again.
async fn carry_out(
    plan: Plan,
    inbound: Inbound,
    links: Arc<Links>,
    answering: Arc<Answering>,
    published: Option<PublishError>,
) {
    let router = &answering.router;
    let listening = plan.respond.as_ref().map(|r| answering.listen(r));
    let failures: Vec<String> = match <[_; 1]>::try_from(plan.sends) {
        // Most plans make one publication: it is awaited without a join.
        Ok([(target, publication)]) => {
            let sent = match published {
                None => links.send(&target, publication).await,
                Some(e) => Box::pin(links.failed(&target, publication, e)).await,
            };
            match sent {
                Ok(_) => Vec::new(),
                Err(e) => vec![e.to_string()],
            }
        }
        Err(sends) => Box::pin(send_all(&links, sends)).await,
    };
    if failures.is_empty() {
        // Remembered if the message was carried out, let go if not.
        if let Some(claim) = plan.claim {
            claim.settled();
        }
        if let Some(pause) = plan.requeue_after {
            sleep(pause).await;
            inbound.settle(Outcome::Requeue);
            return;
        }
        let outcome = if plan.reject {
            Outcome::Reject
        } else {
            Outcome::Ack
        };
        if let Some((response_uuid, from, responses)) = plan.arrived {
            answering.arrived(&response_uuid, from, responses);
        }
        match (plan.respond, listening) {
            // The source stays unacknowledged until its answer is safe with
            // the broker: if this host dies first, the message comes back
            // and is answered again.
            (Some(respond), Some(listening)) => {
                let answering = answering.clone();
                tokio::spawn(async move {
                    if answering.answer(*respond, listening).await {
                        inbound.settle(outcome);
                    } else {
                        tokio::time::sleep(REQUEUE_DELAY).await;
                        inbound.settle(Outcome::Requeue);
                    }
                });
            }
            _ => inbound.settle(outcome),
        }
        return;
    }
    if let Some(respond) = &plan.respond {
        answering.abandon(respond);
    }
    router
        .stats
        .publish_failures
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        cell = %router.cell_name(),
        uuid = plan.uuid.as_deref().unwrap_or("-"),
        errors = ?failures,
        "publication failed on the own broker; the message goes back to its queue"
    );
    // Let go before the pause: the message comes back as new, not in flight.
    drop(plan.claim);
    sleep(REQUEUE_DELAY).await;
    inbound.settle(Outcome::Requeue);
}

/// Makes several publications at once; the errors of those that failed.
async fn send_all(links: &Links, sends: Vec<(Target, Publication)>) -> Vec<String> {
    let publishes = sends
        .into_iter()
        .map(|(target, publication)| async move { links.send(&target, publication).await });
    futures::future::join_all(publishes)
        .await
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect()
}

/// Sleeps in a future of its own: [`carry_out`] takes these roads rarely,
/// and a timer held inline would grow every message's future.
async fn sleep(pause: Duration) {
    Box::pin(tokio::time::sleep(pause)).await;
}
