//! The coordinator's gRPC messages and service, generated from `proto/coordinator.proto`.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("tidemill.v1");
