//! Any text as proxy.toml: parsing and validation must not panic, and an error must start by
//! naming the file (the contract for configuration errors).
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use connector_proxy::config::Config;
use libfuzzer_sys::fuzz_target;

/// A folder of its own, so relative secret and CA file names resolve to nothing real.
static DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path: PathBuf = DIR.path().join("proxy.toml");
    if let Err(e) = Config::parse(text, &path) {
        let shown = e.to_string();
        assert!(shown.starts_with(&path.display().to_string()), "{shown}");
    }
});
