#![no_main]
//! Fuzz target: see `keyplane::fuzzing::key_parser`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyplane::fuzzing::key_parser(data));
