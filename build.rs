//! Compiles the gRPC API (`proto/tollgate/prefect/v1/*.proto`) with protox (no `protoc`) into
//! tonic servers and clients, and writes the file descriptor set that reflection serves.

use std::path::PathBuf;

use protox::prost::Message as _;

const PROTOS: &[&str] = &[
    "proto/tollgate/prefect/v1/common.proto",
    "proto/tollgate/prefect/v1/flows.proto",
    "proto/tollgate/prefect/v1/deployments.proto",
    "proto/tollgate/prefect/v1/flow_runs.proto",
    "proto/tollgate/prefect/v1/task_runs.proto",
    "proto/tollgate/prefect/v1/logs.proto",
    "proto/tollgate/prefect/v1/work_pools.proto",
    "proto/tollgate/prefect/v1/rest.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tollgate_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
