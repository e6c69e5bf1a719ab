//! Hot reload under load: a cell's policy is replaced a hundred times while
//! thousands of messages a second flow through a real RabbitMQ, alternating
//! two versions that route differently. Every message is delivered exactly
//! once, by one version or the other, and the host never stops consuming.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cellhost::client::{entry_cast, Outgoing};
use cellhost::plugins::built_path;
use cellhost::policy::content_hash;
use cellhost::transport::Broker;
use cellhost_tests::{deploy, plugin, Direction, Topology, Transport};

const PAIR: [(&str, Option<&str>); 2] = [("top", None), ("leaf", Some("top"))];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_load_lose_and_duplicate_nothing() {
    // nova-cells relays `top!leaf` messages to leaf; keep-local processes
    // them at top. Either is right, both or neither is a bug.
    let nova = std::fs::read(built_path("nova_cells")).expect("nova-cells built");
    let keep = std::fs::read(built_path("keep_local")).expect("keep-local built");
    let dir =
        std::env::temp_dir().join(format!("cellhost-reload-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("policy.wasm");
    deploy(&file, &nova);

    let policy = plugin("nova_cells", "").expect("policy");
    let policy_file = file.clone();
    let mut topo = Topology::start_configured(Transport::Rabbit, &PAIR, policy, true, |c| {
        if c.cell.name == "top" {
            c.policy.path = Some(policy_file.clone());
        }
    })
    .await
    .expect("topology starts");
    let reloader = topo
        .host_mut("top")
        .enable_reload(cellhost_tests::engine(), true)
        .expect("watching the policy file");

    // A steady stream into top: bursts of 40 every 10 ms, pipelined.
    let config = topo.config("top").clone();
    let broker = Broker::connect(
        &config.cell.transport_url,
        &config.oslo_messaging_rabbit,
        "load",
    )
    .await
    .expect("connect");
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let burst: Vec<_> = (0..40)
                    .map(|_| Outgoing::targeted("top!leaf", Direction::Down, "steady").to_message())
                    .collect();
                let casts: Vec<_> = burst
                    .iter()
                    .map(|m| entry_cast(&config.cell.control_exchange, &config.cell.queue_base, m))
                    .collect();
                let publishes = casts.iter().map(|cast| broker.publish(cast));
                for result in futures::future::join_all(publishes).await {
                    result.expect("the broker confirms the test's messages");
                }
                sent.extend(burst.into_iter().map(|m| m.uuid));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        })
    };

    let router = topo.host_mut("top").router().clone();
    for i in 0..100 {
        let wasm = if i % 2 == 0 { &keep } else { &nova };
        let hash = content_hash(wasm);
        deploy(&file, wasm);
        // The first deploy of each version compiles it, which can take
        // seconds on two busy cores; later ones come from the host's cache.
        // The limit only tells a reload that never comes from a slow one.
        let limit = if i < 2 { 60 } else { 10 };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(limit);
        while router.active_policy().hash() != hash {
            assert!(
                tokio::time::Instant::now() < deadline,
                "reload {i} not served in time (last error: {:?})",
                reloader.last_error()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = publisher.await.expect("publisher finished");
    assert_eq!(reloader.swaps(), 100);
    assert_eq!(reloader.last_error(), None);
    assert!(
        sent.len() > 2000,
        "the stream was steady: {} messages",
        sent.len()
    );

    let processed = match topo
        .drain_processed(sent.len(), Duration::from_secs(60))
        .await
    {
        Ok(p) => p,
        Err(e) => panic!(
            "{e}; top: {:?}, leaf: {:?}, first dead letter at top: {:?}",
            topo.counts_of("top"),
            topo.counts_of("leaf"),
            topo.dead_letter("top").await.map(|d| d.reason)
        ),
    };
    let mut times: HashMap<&str, usize> = HashMap::new();
    let mut by_cell: HashMap<&str, usize> = HashMap::new();
    for p in &processed {
        *times.entry(p.message_uuid.as_str()).or_default() += 1;
        *by_cell.entry(p.cell.as_str()).or_default() += 1;
    }
    for uuid in &sent {
        assert_eq!(
            times.get(uuid.as_str()),
            Some(&1),
            "message {uuid} delivered {:?} times",
            times.get(uuid.as_str())
        );
    }
    assert_eq!(
        processed.len(),
        sent.len(),
        "no delivery beyond the messages sent"
    );
    assert!(
        by_cell.get("top").copied().unwrap_or(0) > 0,
        "keep-local served some: {by_cell:?}"
    );
    assert!(
        by_cell.get("leaf").copied().unwrap_or(0) > 0,
        "nova-cells served some: {by_cell:?}"
    );
    // Each message was received once at top and routed one way or the other.
    let top = topo.counts_of("top");
    assert_eq!(top.received as usize, sent.len());
    assert_eq!((top.relayed + top.delivered_local) as usize, sent.len());
    assert_eq!(top.dead_lettered, 0);
    topo.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_fails_to_load_leaves_the_current_one_serving() {
    let nova = std::fs::read(built_path("nova_cells")).expect("nova-cells built");
    let adversary = std::fs::read(built_path("adversary")).expect("adversary built");
    let dir =
        std::env::temp_dir().join(format!("cellhost-refuse-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("policy.wasm");
    deploy(&file, &nova);

    let policy = plugin("nova_cells", "").expect("policy");
    let policy_file = file.clone();
    // nova-cells ignores its config; the adversary refuses this one in init.
    let mut topo = Topology::start_configured(Transport::Memory, &PAIR, policy, true, |c| {
        if c.cell.name == "top" {
            c.policy.path = Some(policy_file.clone());
            c.policy.config = "fail-init".into();
        }
    })
    .await
    .expect("topology starts");
    let reloader = topo
        .host_mut("top")
        .enable_reload(cellhost_tests::engine(), false)
        .expect("reload enabled");
    let serving = topo
        .host_mut("top")
        .router()
        .active_policy()
        .hash()
        .to_string();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not WebAssembly",
            b"#!/bin/sh\necho not a policy\n".to_vec(),
            "not WebAssembly",
        ),
        (
            "a component of another world",
            b"(component)".to_vec(),
            "was not built for cellhost:policy",
        ),
        (
            "a half-written file",
            nova[..nova.len() / 2].to_vec(),
            "not a valid WebAssembly component",
        ),
        (
            "an init that fails",
            adversary.clone(),
            "init refused the configuration",
        ),
    ];
    for (what, bytes, expected) in cases {
        deploy(&file, &bytes);
        let err = reloader.reload().await.expect_err(what);
        assert!(format!("{err:#}").contains(expected), "{what}: {err:#}");
        let reported = reloader.last_error().unwrap_or_default();
        assert!(reported.contains(expected), "{what}: reported {reported:?}");
        assert_eq!(
            topo.host_mut("top").router().active_policy().hash(),
            serving,
            "{what}"
        );
        // And the old version still routes.
        let uuid = topo
            .send(
                "top",
                Outgoing::targeted("top!leaf", Direction::Down, "still_here"),
            )
            .await
            .expect("sent");
        let got = topo
            .processed(&uuid, 1)
            .await
            .expect("routed by the old version");
        assert_eq!(got[0].cell, "leaf", "{what}");
    }
    // A good version afterwards is taken, and clears the error.
    deploy(
        &file,
        &std::fs::read(built_path("keep_local")).expect("built"),
    );
    assert!(matches!(
        reloader.reload().await,
        Ok(cellhost::reload::Reloaded::Swapped { .. })
    ));
    assert_eq!(reloader.last_error(), None);
    topo.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_keeps_trapping_is_unloaded_for_the_previous_one() {
    let nova = std::fs::read(built_path("nova_cells")).expect("nova-cells built");
    let adversary = std::fs::read(built_path("adversary")).expect("adversary built");
    let dir = std::env::temp_dir().join(format!(
        "cellhost-fallback-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("policy.wasm");
    deploy(&file, &nova);
    let policy_file = file.clone();
    let mut topo = Topology::start_configured(
        Transport::Memory,
        &PAIR,
        plugin("nova_cells", "").expect("policy"),
        true,
        |c| {
            if c.cell.name == "top" {
                c.policy.path = Some(policy_file.clone());
                c.policy.failures_before_fallback = 3;
            }
        },
    )
    .await
    .expect("topology starts");
    let reloader = topo
        .host_mut("top")
        .enable_reload(cellhost_tests::engine(), false)
        .expect("reload enabled");
    deploy(&file, &adversary);
    reloader.reload().await.expect("the adversary loads");
    let router = topo.host_mut("top").router().clone();
    assert_eq!(router.active_policy().hash(), content_hash(&adversary));

    for i in 1..=3u64 {
        topo.send(
            "top",
            Outgoing::targeted("top!leaf", Direction::Down, "trap"),
        )
        .await
        .expect("sent");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while topo.counts_of("top").dead_lettered < i {
            assert!(
                tokio::time::Instant::now() < deadline,
                "trap {i} not dead-lettered"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // The third trap in a row brought nova-cells back.
    assert_eq!(router.active_policy().hash(), content_hash(&nova));
    assert_eq!(cellhost::router::Stats::get(&router.stats.fallbacks), 1);
    let uuid = topo
        .send(
            "top",
            Outgoing::targeted("top!leaf", Direction::Down, "trap"),
        )
        .await
        .expect("sent");
    let got = topo
        .processed(&uuid, 1)
        .await
        .expect("routed by nova-cells");
    assert_eq!(got[0].cell, "leaf");
    topo.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_reject_hands_the_message_back_to_the_broker() {
    let policy = plugin("adversary", "").expect("policy");
    let topo = Topology::start_configured(Transport::Rabbit, &PAIR, policy, true, |c| {
        c.policy.on_failure = cellhost::config::OnFailure::Reject;
    })
    .await
    .expect("topology starts");
    // The operator's broker-side dead-lettering, as a RabbitMQ policy.
    let vhost = format!("{}-top", topo.prefix());
    let status = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "set_policy",
            "-p",
            &vhost,
            "rejected",
            "^cells\\.intercell\\.targeted$",
        ])
        .arg(r#"{"dead-letter-exchange": "", "dead-letter-routing-key": "rejected"}"#)
        .args(["--apply-to", "queues"])
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success());
    let top_url = topo.config("top").cell.transport_url.amqp_uris().remove(0);
    {
        let conn = lapin::Connection::connect(&top_url, lapin::ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .queue_declare("rejected".into(), Default::default(), Default::default())
            .await
            .expect("declare");
        let _ = conn.close(200, "done".into()).await;
    }
    let uuid = topo
        .send(
            "top",
            Outgoing::targeted("top!leaf", Direction::Down, "trap"),
        )
        .await
        .expect("sent");
    let deadline = tokio::time::Instant::now() + cellhost_tests::PATIENCE;
    let rejected = loop {
        let got = cellhost_tests::drain_queue(&top_url, "rejected")
            .await
            .expect("read");
        if !got.is_empty() {
            break got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing was rejected to the broker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(rejected.len(), 1);
    assert!(String::from_utf8_lossy(&rejected[0]).contains(&uuid));
    // Not dead-lettered by the host itself.
    assert!(
        cellhost_tests::drain_queue(&top_url, "cells.intercell.dead")
            .await
            .expect("read")
            .is_empty()
    );
    assert_eq!(topo.counts_of("top").dead_lettered, 0);
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_policy_is_compared_and_never_acted_on() {
    let mut topo = Topology::start(
        Transport::Memory,
        &PAIR,
        plugin("nova_cells", "").expect("policy"),
    )
    .await
    .expect("topology starts");
    // The adversary decides like nova-cells except on its special methods:
    // for `stray` it relays to a cell that does not exist.
    let candidate = plugin("adversary", "").expect("candidate");
    topo.host_mut("top").router().set_shadow(Some(candidate));
    let mut sent = Vec::new();
    for method in ["a", "stray", "b", "c", "stray", "d", "stray", "e"] {
        let uuid = topo
            .send(
                "top",
                Outgoing::targeted("top!leaf", Direction::Down, method),
            )
            .await
            .expect("sent");
        sent.push(uuid);
    }
    for uuid in &sent {
        let got = topo
            .processed(uuid, 1)
            .await
            .expect("routed by the active policy");
        assert_eq!(
            got[0].cell, "leaf",
            "the shadow's decision was not acted on"
        );
    }
    let stats = &topo.host_mut("top").router().stats;
    assert_eq!(cellhost::router::Stats::get(&stats.shadow_compared), 8);
    assert_eq!(cellhost::router::Stats::get(&stats.shadow_differences), 3);
    assert_eq!(topo.counts_of("top").dead_lettered, 0);
    topo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_fails_the_promotion_gate_is_refused() {
    let nova = std::fs::read(built_path("nova_cells")).expect("built");
    let dir = std::env::temp_dir().join(format!("cellhost-gate-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("policy.wasm");
    deploy(&file, &nova);
    // The decisions any version serving `top` must keep.
    let gate = dir.join("gate.jsonl");
    let mut to_leaf = Outgoing::targeted("top!leaf", Direction::Down, "reboot").to_message();
    to_leaf.uuid = "gate-to-leaf".into();
    let mut broadcast = Outgoing::broadcast(Direction::Down, "sync").to_message();
    broadcast.uuid = "gate-broadcast".into();
    let line = |m: &cellhost::wire::CellsMessage, expect: &[&str]| {
        let mut v: serde_json::Value = serde_json::from_str(&m.to_json()).expect("JSON");
        v["expect"] = serde_json::json!(expect);
        v.to_string()
    };
    std::fs::write(
        &gate,
        format!(
            "{}\n{}\n",
            line(&to_leaf, &["relay:leaf"]),
            line(&broadcast, &["process-here", "relay:leaf"])
        ),
    )
    .expect("gate written");

    let (policy_file, gate_file) = (file.clone(), gate.clone());
    let mut topo = Topology::start_configured(
        Transport::Memory,
        &PAIR,
        plugin("nova_cells", "").expect("policy"),
        true,
        |c| {
            if c.cell.name == "top" {
                c.policy.path = Some(policy_file.clone());
                c.policy.gate = Some(gate_file.clone());
            }
        },
    )
    .await
    .expect("topology starts");
    let reloader = topo
        .host_mut("top")
        .enable_reload(cellhost_tests::engine(), false)
        .expect("reload enabled");

    // keep-local processes everything at top: it fails the gate.
    deploy(
        &file,
        &std::fs::read(built_path("keep_local")).expect("built"),
    );
    let err = format!(
        "{:#}",
        reloader.reload().await.expect_err("refused by the gate")
    );
    assert!(err.contains("2 of 2 messages decided differently"), "{err}");
    assert!(err.contains("DIFFERS uuid gate-to-leaf"), "{err}");
    assert!(err.contains(r#"["process-here"]"#), "{err}");
    assert_eq!(
        topo.host_mut("top").router().active_policy().hash(),
        content_hash(&nova)
    );

    // The adversary decides these like nova-cells: it passes.
    let adversary = std::fs::read(built_path("adversary")).expect("built");
    deploy(&file, &adversary);
    reloader.reload().await.expect("passes the gate");
    assert_eq!(
        topo.host_mut("top").router().active_policy().hash(),
        content_hash(&adversary)
    );
    topo.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
