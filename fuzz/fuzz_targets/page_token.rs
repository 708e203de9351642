#![no_main]
//! Fuzz target: see `keyplane::fuzzing::page_token`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyplane::fuzzing::page_token(data));
