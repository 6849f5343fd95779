//! The write-ahead journal decoder on arbitrary segment bytes: it never panics and
//! every entry it returns re-encodes to exactly the bytes it was read from (so no
//! entry whose checksum failed is ever replayed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use phigate::record::journal::{decode, MAGIC};

fuzz_target!(|data: &[u8]| {
    let (entries, _tail) = decode(data);
    let mut again = Vec::new();
    for e in &entries {
        e.encode(&mut again);
    }
    if !entries.is_empty() {
        assert!(
            data[MAGIC.len()..].starts_with(&again),
            "decoded entries are not the bytes they were read from"
        );
    }
});
