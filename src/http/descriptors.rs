//! The descriptor pool the HTTP layer works from: keyplane's protos (with the
//! `google.api.http` rules, and `google.rpc.Status` for `ImportApiKeys`' per-item errors)
//! and `google.rpc`'s error details, so that an error's details print as JSON with their
//! `@type`.
use prost::Message;
use prost_reflect::DescriptorPool;

pub fn pool() -> anyhow::Result<DescriptorPool> {
    let mut pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)?;
    let mut details = prost_types::FileDescriptorSet::decode(tonic_types::pb::FILE_DESCRIPTOR_SET)?;
    // Files both sets hold under the same name (google/protobuf/*) are skipped by the pool;
    // tonic-types' `status.proto` holds `google.rpc.Status` under another name than
    // keyplane's copy, so a file defining a message the pool has already is left out.
    details.file.retain(|file| {
        let package = file.package();
        !file.message_type.iter().any(|m| {
            pool.get_message_by_name(&format!("{package}.{}", m.name()))
                .is_some()
        })
    });
    pool.add_file_descriptor_set(details)?;
    Ok(pool)
}
