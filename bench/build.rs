//! Compiles the echo service and keyplane's own `api_key_service.proto` (from the
//! repository's `proto/`, so the messages are exactly keyplane's) with protox and
//! tonic-prost-build, as the root `build.rs` does.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let bench_protos = here.join("proto");
    let keyplane_protos = here.join("..").join("proto");
    let files = [
        bench_protos.join("keyplane/bench/v1/echo.proto"),
        keyplane_protos.join("keyplane/v1/api_key_service.proto"),
        keyplane_protos.join("keyplane/v1/role_service.proto"),
        keyplane_protos.join("keyplane/v1/scope_service.proto"),
        keyplane_protos.join("keyplane/v1/workspace_service.proto"),
    ];
    let fds = protox::compile(&files, [&bench_protos, &keyplane_protos])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // ImportApiKeys' per-item google.rpc.Status: tonic-types' type, as in keyplane.
        .extern_path(".google.rpc", "::tonic_types::pb")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=../proto");
    Ok(())
}
