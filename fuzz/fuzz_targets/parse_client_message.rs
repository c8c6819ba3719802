//! Fuzzes the client-message parser: it must never panic, and whatever it accepts must
//! survive a serialise/parse round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    atlas_protocol::fuzz_check(data);
});
