//! The descriptor pool the HTTP layer works from: keyplane's protos (with the
//! `google.api.http` rules) and `google.rpc`'s error details, so that an error's details
//! print as JSON with their `@type`.
use prost_reflect::{DescriptorError, DescriptorPool};

pub fn pool() -> Result<DescriptorPool, DescriptorError> {
    let mut pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)?;
    // Files both sets hold (google/protobuf/*) are skipped the second time.
    pool.decode_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)?;
    Ok(pool)
}
