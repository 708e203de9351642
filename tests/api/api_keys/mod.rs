//! ApiKeyService (everything but VerifyApiKey, see `verify.rs`): the secret and its shape,
//! field rules, idempotency, pagination, updates, revocation, rotation, deletion, the
//! no-escalation rule of SPEC §2.4 and `last_used_time`. (Concurrent calls: `races.rs`.)
use keyplane::proto as pb;

mod create;
mod escalation;
mod last_used;
mod list;
mod revoke_delete;
mod rotate;
mod update;

/// A minimal valid request for a key in `workspace_id`.
pub fn new_key(workspace_id: &str) -> pb::CreateApiKeyRequest {
    pb::CreateApiKeyRequest {
        workspace_id: workspace_id.into(),
        name: "k".into(),
        ..Default::default()
    }
}
