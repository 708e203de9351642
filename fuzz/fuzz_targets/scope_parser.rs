#![no_main]
//! Fuzz target: see `keyplane::fuzzing::scope_parser`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyplane::fuzzing::scope_parser(data));
