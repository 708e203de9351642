#![no_main]
//! Fuzz target: see `keyplane::fuzzing::http`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyplane::fuzzing::http(data));
