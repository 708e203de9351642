//! Code generated from `proto/keyplane/v1` by `build.rs`.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("keyplane.v1");

/// The encoded file descriptor set of keyplane's protos (with their imports), for server
/// reflection and for tests that enumerate every RPC.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keyplane_descriptor.bin"));

/// The encoded file descriptor set of Envoy's `envoy.service.auth.v3` (with its imports),
/// for server reflection: `envoy-types` provides the code but does not export these.
pub const ENVOY_EXT_AUTHZ_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_ext_authz_descriptor.bin"));
