//! The masking rules' JSON path parser (RFC 9535 subset) on arbitrary text: it
//! either refuses with an error or yields a path whose printed form parses back to
//! the same path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phigate_mask::path::JsonPath;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = JsonPath::parse(text) {
        let printed = p.to_string();
        let again = JsonPath::parse(&printed).unwrap_or_else(|e| {
            panic!("{text:?} printed as {printed:?}, which does not parse: {e}")
        });
        assert_eq!(printed, again.to_string());
    }
});
