//! Compiles `proto/keyplane/v1/*.proto` with protox (no `protoc` needed) and writes the
//! file descriptor set that server reflection and the authorization-matrix test read; and
//! the descriptors of Envoy's ext_authz service (`third_party/envoy-api`), for reflection
//! only: its code comes from `envoy-types`, which does not export its descriptors.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("proto/keyplane/v1");
    let mut files: Vec<PathBuf> = fs::read_dir(&proto_dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|ext| ext == "proto"));
    files.sort();

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(&files)?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // Encoded by protox itself: `prost_types` would drop the options' extensions, and the
    // HTTP routes are the `google.api.http` extension of each method's options.
    fs::write(
        out_dir.join("keyplane_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let fds = compiler.file_descriptor_set();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // google.rpc.Status (ImportApiKeys' per-item errors) is tonic-types' own type: the
        // one its error details already encode.
        .extern_path(".google.rpc", "::tonic_types::pb")
        .compile_fds(fds)?;

    let envoy = protox::compile(
        ["envoy/service/auth/v3/external_auth.proto"],
        ["third_party/envoy-api"],
    )?;
    fs::write(
        out_dir.join("envoy_ext_authz_descriptor.bin"),
        prost::Message::encode_to_vec(&envoy),
    )?;

    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=third_party/envoy-api");
    Ok(())
}
