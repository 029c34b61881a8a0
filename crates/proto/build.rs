use std::fmt::Write as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTOS: [&str; 2] = ["proto/mendfs.proto", "proto/etcd_kv.proto"];
    // protoc comes vendored so that a fresh machine needs nothing but cargo.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    // Chunk data as `bytes::Bytes`: decoded without a copy out of the receive buffer, and
    // shared (not copied) by the requests that send one chunk to each of its replicas.
    tonic_prost_build::configure()
        .bytes(".mendfs.v1.PrepareChunkRequest.data")
        .bytes(".mendfs.v1.PrepareChunkPiece.data")
        .bytes(".mendfs.v1.ReadChunkReply.data")
        .bytes(".mendfs.v1.GetFileReply.data")
        .compile_protos(&PROTOS, &["proto"])?;
    write_operations(&PROTOS)?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}

/// Writes `OPERATIONS`, every `Service/Method` the protos define, so that metrics and traces
/// can name each known call and lump every other path into one label.
fn write_operations(protos: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let mut operations = Vec::new();
    for proto in protos {
        let mut service = None;
        for line in std::fs::read_to_string(proto)?.lines() {
            let words: Vec<&str> = line.split(|c: char| c.is_whitespace() || c == '(' || c == '{').collect();
            let words: Vec<&str> = words.into_iter().filter(|word| !word.is_empty()).collect();
            match words.as_slice() {
                ["service", name, ..] => service = Some(name.to_string()),
                ["rpc", method, ..] => {
                    let service =
                        service.as_deref().ok_or_else(|| format!("{proto}: rpc {method} outside a service"))?;
                    operations.push(format!("{service}/{method}"));
                }
                _ => {}
            }
        }
    }
    let mut code = String::from("/// Every `Service/Method` the protos define.\npub const OPERATIONS: &[&str] = &[\n");
    for operation in &operations {
        writeln!(code, "    {operation:?},")?;
    }
    code.push_str("];\n");
    std::fs::write(std::path::Path::new(&std::env::var("OUT_DIR")?).join("operations.rs"), code)?;
    Ok(())
}
