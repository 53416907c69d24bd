//! weir: a Kubernetes service proxy whose routing decisions are sandboxed WebAssembly
//! components. This crate is the host: it reads Services, EndpointSlices and Nodes,
//! turns them into per-port snapshots as kube-proxy does, and asks policies what to do.

pub mod admin;
pub mod app;
pub mod capture;
pub mod cli;
pub mod config;
pub mod control;
pub mod discovery;
pub mod health;
mod locks;
pub mod metrics;
pub mod model;
pub mod net;
pub mod objects;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod transparent;
pub mod units;
pub mod yaml;

#[cfg(feature = "testing")]
pub mod test_helpers;
