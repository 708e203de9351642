//! sea-orm entities for the keyplane schema (see `migrations/`).

pub mod api_key;
pub mod api_key_scope;
pub mod scope;
pub mod setting;
pub mod workspace;
