//! The lightpath data plane and its commands. `main.rs` only parses flags and
//! dispatches here, so integration tests can drive the same code.

pub mod admin;
pub mod backend;
pub mod balance;
pub mod cleanup;
pub mod defaults;
pub mod demo;
pub mod detect_local;
pub mod drain;
pub mod health;
pub mod l4;
pub mod l7;
pub mod lifecycle;
pub mod local_addrs;
pub mod metrics;
pub mod rare;
pub mod run;
pub mod sandbox;
pub mod server;
pub mod spread;
pub mod table_cmd;
pub mod telemetry;
pub mod udp;
pub mod webhook;
