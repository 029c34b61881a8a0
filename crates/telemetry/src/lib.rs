//! Fault localization: where did a request go, and where did it break.
//!
//! - `context`: W3C trace context (`traceparent`), the ids that travel with every RPC.
//! - `record`: the span and log records a node keeps and serves.
//! - `store`: bounded on-disk stores of those records (a byte limit, oldest dropped first).
//! - `render`: one trace's spans from many nodes as a timeline tree (pure).
//! - `layer`: the `tracing` layer that gives spans their context and stores spans and logs.
//! - `grpc`: the server layer that opens a span per RPC under the caller's context, and the
//!   client side that sends the context along.
//! - `metrics`: Prometheus exposition.
//! - `otlp`: optional export of spans to an OpenTelemetry collector.
//! - `service`: the `Telemetry` gRPC service serving the stores.

pub mod context;
pub mod grpc;
pub mod layer;
pub mod metrics;
pub mod otlp;
pub mod record;
pub mod render;
pub mod service;
pub mod store;
