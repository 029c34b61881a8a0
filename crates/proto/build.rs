fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes vendored so that a fresh machine needs nothing but cargo.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Health reports travel inside forwarded leader answers (postcard) as well as over gRPC.
        .type_attribute("mendfs.v1.NodeHealth", "#[derive(serde::Serialize, serde::Deserialize)]")
        .compile_protos(&["proto/mendfs.proto", "proto/etcd_kv.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/mendfs.proto");
    println!("cargo:rerun-if-changed=proto/etcd_kv.proto");
    Ok(())
}
