//! The end-to-end tests, one module per subject, built as one test binary:
//! each binary links the host and its dependencies anew, which cost about a
//! minute of release build apiece, more than most of them take to run.
//! `cargo test --release -p cellhost-tests --test e2e faults::` runs one
//! subject. The cluster test has a binary of its own (`--test cluster`), so
//! that the failover it times never shares the machine with another test.

mod admin;
mod calls;
mod containment;
mod dedupe;
mod fault_proxy;
mod faults;
mod neighbours_live;
mod oslo_deadlines;
mod oslo_deployed;
mod oslo_interop;
mod policy_new;
mod processes;
mod python_policy;
mod reload;
mod routing;
mod tls;
