//! The config loader on arbitrary TOML text: it accepts or refuses with an error
//! naming the file, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("phigate-fuzz-config-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("phigate.toml");
    std::fs::write(&path, text).expect("write");
    if let Err(e) = phigate::settings::Config::load(&path) {
        assert!(
            e.to_string().contains("phigate.toml"),
            "error without the file: {e}"
        );
    }
});
