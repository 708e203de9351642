//! Every RPC the server answers, with the access it requires (the built-in scope of the
//! API reference's table). An RPC missing here is refused by the auth layer, so a new RPC
//! cannot be reachable without a row; the authorization-matrix test checks the table
//! against the compiled descriptors (keyplane's and Envoy's ext_authz).
use crate::domain::scope::BuiltinScope;

/// What an RPC requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health and reflection: no credential.
    Public,
    /// A credential holding this built-in scope.
    Scope(BuiltinScope),
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rpc {
    /// The gRPC path, `/package.Service/Method`.
    pub path: &'static str,
    pub access: Access,
}

impl Rpc {
    /// Whether it changes something: the calls the audit log records, which get a request
    /// id even when the client sent none.
    pub fn mutates(&self) -> bool {
        matches!(
            self.access,
            Access::Scope(
                WorkspacesWrite | ScopesWrite | ApiKeysWrite | ApiKeysDelegate | RolesWrite
            )
        )
    }
}

const fn rpc(path: &'static str, access: Access) -> Rpc {
    Rpc { path, access }
}

const fn needs(path: &'static str, scope: BuiltinScope) -> Rpc {
    rpc(path, Access::Scope(scope))
}

use BuiltinScope::*;

pub const RPCS: &[Rpc] = &[
    rpc("/grpc.health.v1.Health/Check", Access::Public),
    rpc("/grpc.health.v1.Health/Watch", Access::Public),
    rpc(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Access::Public,
    ),
    rpc(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Access::Public,
    ),
    needs(
        "/keyplane.v1.WorkspaceService/CreateWorkspace",
        WorkspacesWrite,
    ),
    needs("/keyplane.v1.WorkspaceService/GetWorkspace", WorkspacesRead),
    needs(
        "/keyplane.v1.WorkspaceService/ListWorkspaces",
        WorkspacesRead,
    ),
    needs(
        "/keyplane.v1.WorkspaceService/UpdateWorkspace",
        WorkspacesWrite,
    ),
    needs(
        "/keyplane.v1.WorkspaceService/DeleteWorkspace",
        WorkspacesWrite,
    ),
    needs("/keyplane.v1.ScopeService/CreateScope", ScopesWrite),
    needs("/keyplane.v1.ScopeService/GetScope", ScopesRead),
    needs("/keyplane.v1.ScopeService/ListScopes", ScopesRead),
    needs("/keyplane.v1.ScopeService/UpdateScope", ScopesWrite),
    needs("/keyplane.v1.ScopeService/DeleteScope", ScopesWrite),
    needs("/keyplane.v1.ApiKeyService/CreateApiKey", ApiKeysWrite),
    needs("/keyplane.v1.ApiKeyService/GetApiKey", ApiKeysRead),
    needs("/keyplane.v1.ApiKeyService/ListApiKeys", ApiKeysRead),
    needs("/keyplane.v1.ApiKeyService/UpdateApiKey", ApiKeysWrite),
    needs("/keyplane.v1.ApiKeyService/RevokeApiKey", ApiKeysWrite),
    needs("/keyplane.v1.ApiKeyService/RotateApiKey", ApiKeysWrite),
    needs("/keyplane.v1.ApiKeyService/DeleteApiKey", ApiKeysWrite),
    needs("/keyplane.v1.ApiKeyService/VerifyApiKey", ApiKeysVerify),
    needs(
        "/keyplane.v1.ApiKeyService/AdjustApiKeyCredits",
        ApiKeysWrite,
    ),
    // The credential is the parent key itself (the handler refuses any other kind).
    needs("/keyplane.v1.ApiKeyService/DelegateApiKey", ApiKeysDelegate),
    needs("/keyplane.v1.ApiKeyService/ImportApiKeys", ApiKeysWrite),
    needs("/keyplane.v1.RoleService/CreateRole", RolesWrite),
    needs("/keyplane.v1.RoleService/GetRole", RolesRead),
    needs("/keyplane.v1.RoleService/ListRoles", RolesRead),
    needs("/keyplane.v1.RoleService/UpdateRole", RolesWrite),
    needs("/keyplane.v1.RoleService/DeleteRole", RolesWrite),
    needs("/keyplane.v1.AuditService/ListAuditEvents", AuditRead),
    // Envoy's external authorization: a verification asked by the proxy.
    needs("/envoy.service.auth.v3.Authorization/Check", ApiKeysVerify),
];

/// The position of a path in [`RPCS`]; `None` for a path the server does not answer.
pub fn index(path: &str) -> Option<usize> {
    RPCS.iter().position(|r| r.path == path)
}

/// The access rule of a path; `None` for an unknown one.
pub fn access(path: &str) -> Option<Access> {
    index(path).map(|i| RPCS[i].access)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_unique_and_every_builtin_scope_guards_something() {
        for (i, r) in RPCS.iter().enumerate() {
            assert_eq!(index(r.path), Some(i), "{} listed twice", r.path);
        }
        for scope in BuiltinScope::ALL {
            assert!(
                RPCS.iter().any(|r| r.access == Access::Scope(scope)),
                "{scope} guards no RPC"
            );
        }
        assert_eq!(access("/keyplane.v1.ApiKeyService/Nope"), None);
    }
}
