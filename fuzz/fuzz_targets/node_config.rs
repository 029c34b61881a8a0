//! A node's TOML config file: parsed into `NodeConfig` and checked, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| {
    if let Ok(config) = toml::from_str::<mendfs_node::NodeConfig>(text) {
        let _ = config.check();
    }
});
