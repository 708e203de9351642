#![no_main]
//! Fuzz target: see `keyplane::fuzzing::network`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyplane::fuzzing::network(data));
