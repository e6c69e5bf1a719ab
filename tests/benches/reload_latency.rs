//! How long a policy change takes to serve: from the moment a new `.wasm` is
//! renamed into place (or a reload is requested) until the cell routes with
//! it. Two cases: a version the engine has compiled before (cached), and a
//! version never seen (compiled on reload). A cell on memory:// so only the
//! reload path is measured.
//!
//!     cargo bench -p cellhost-tests --bench reload_latency

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use cellhost::plugins::built_path;
use cellhost::policy::content_hash;
use cellhost_tests::{deploy, plugin, Topology, Transport};

const PAIR: [(&str, Option<&str>); 2] = [("top", None), ("leaf", Some("top"))];

/// `wasm` with a custom section appended: the same policy, a new version.
fn variant(wasm: &[u8], n: usize) -> Vec<u8> {
    fn leb(mut v: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            out.push(if v == 0 { byte } else { byte | 0x80 });
            if v == 0 {
                break;
            }
        }
    }
    let name = b"cellhost-bench";
    let payload = n.to_le_bytes();
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend_from_slice(&payload);
    let mut out = wasm.to_vec();
    out.push(0);
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{label}: {} reloads: median {:?}, p90 {:?}, max {:?}",
        samples.len(),
        at(0.5),
        at(0.9),
        samples[samples.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let nova = std::fs::read(built_path("nova_cells"))?;
    let keep = std::fs::read(built_path("keep_local"))?;
    let dir = std::env::temp_dir().join(format!("cellhost-reload-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("policy.wasm");
    deploy(&file, &nova);
    let policy_file = file.clone();
    let mut topo = Topology::start_configured(
        Transport::Memory,
        &PAIR,
        plugin("nova_cells", "")?,
        false,
        |c| {
            if c.cell.name == "top" {
                c.policy.path = Some(policy_file.clone());
            }
        },
    )
    .await?;
    let _watching = topo
        .host_mut("top")
        .enable_reload(cellhost_tests::engine(), true)?;
    let router = topo.host_mut("top").router().clone();

    let serve = |wasm: Vec<u8>| {
        let (file, router) = (file.clone(), router.clone());
        async move {
            let hash = content_hash(&wasm);
            let started = Instant::now();
            deploy(&file, &wasm);
            while router.active_policy().hash() != hash {
                if started.elapsed() > Duration::from_secs(20) {
                    bail!("not served within 20 s");
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            Ok::<Duration, anyhow::Error>(started.elapsed())
        }
    };

    // Both versions were compiled once before: the cached case.
    serve(keep.clone()).await?;
    serve(nova.clone()).await?;
    let mut cached = Vec::new();
    for i in 0..100 {
        cached.push(
            serve(if i % 2 == 0 {
                keep.clone()
            } else {
                nova.clone()
            })
            .await?,
        );
    }
    summary("file change -> serving, cached version", cached);

    let mut compiled = Vec::new();
    for n in 0..20 {
        compiled.push(serve(variant(&nova, n)).await?);
    }
    summary("file change -> serving, new version compiled", compiled);

    // The same without the file watcher (enabling reload again without a
    // watch replaces it): a SIGHUP or an operator's request.
    let direct = topo
        .host_mut("top")
        .enable_reload(cellhost_tests::engine(), false)?;
    let mut requested = Vec::new();
    for i in 0..100 {
        deploy(&file, if i % 2 == 0 { &keep } else { &nova });
        let started = Instant::now();
        direct.reload().await?;
        requested.push(started.elapsed());
    }
    summary("reload request -> serving, cached version", requested);
    topo.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
