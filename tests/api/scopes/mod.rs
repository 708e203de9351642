//! ScopeService: both create forms and their field rules, the reserved namespace and the
//! built-in scopes, uniqueness per tenant and workspace, idempotency, listing (built-ins
//! first, filters, pagination), updates with masks and etags, and deletes of scopes that
//! keys hold. (Concurrent creates: `races.rs`.)
use keyplane::proto as pb;

use keyplane_testkit::*;

mod create;
mod get_list;
mod grants;
mod update;

pub fn parts(resource: &str, action: &str) -> pb::CreateScopeRequest {
    pb::CreateScopeRequest {
        resource: resource.into(),
        action: action.into(),
        ..Default::default()
    }
}

pub fn repr(representation: &str) -> pb::CreateScopeRequest {
    pb::CreateScopeRequest {
        representation: representation.into(),
        ..Default::default()
    }
}

/// The fixed id of the n-th built-in scope (1-based, in the order of SPEC §2.4).
pub fn builtin_id(n: usize) -> String {
    format!("00000000-0000-7000-8000-{n:012x}")
}

pub fn ids(scopes: &[pb::Scope]) -> Vec<String> {
    scopes.iter().map(|s| s.id.clone()).collect()
}

/// The representations of these scopes, in order.
pub fn representations(scopes: &[pb::Scope]) -> Vec<String> {
    scopes.iter().map(|s| s.scope.clone()).collect()
}

/// Every scope of a listing, page by page; also returns how many pages it took.
pub async fn list_all(
    app: &TestApp,
    page_size: i32,
    workspace_id: &str,
    exclude_builtin: bool,
) -> (Vec<pb::Scope>, usize) {
    let mut all = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .as_admin()
            .scopes
            .list_scopes(pb::ListScopesRequest {
                page_size,
                page_token: token,
                workspace_id: workspace_id.into(),
                exclude_builtin,
            })
            .await
            .inner()
            .expect("list scopes");
        pages += 1;
        if page_size > 0 {
            assert!(
                page.scopes.len() <= page_size as usize,
                "page of {} with page_size {page_size}",
                page.scopes.len()
            );
        }
        assert!(
            !page.scopes.is_empty() || page.next_page_token.is_empty(),
            "an empty page must be the last"
        );
        all.extend(page.scopes);
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(pages < 100, "pagination does not end");
        token = page.next_page_token;
    }
    (all, pages)
}
