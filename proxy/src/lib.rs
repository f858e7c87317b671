//! The lightpath data plane and its commands. `main.rs` only parses flags and
//! dispatches here, so integration tests can drive the same code.

pub mod backend;
pub mod cleanup;
pub mod defaults;
pub mod demo;
pub mod run;
pub mod webhook;
pub mod admin;
pub mod health;
pub mod lifecycle;
pub mod metrics;
pub mod telemetry;
