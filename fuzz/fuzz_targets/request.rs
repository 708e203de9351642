#![no_main]
//! Fuzz target: see `keyplane::fuzzing::request`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyplane::fuzzing::request(data));
