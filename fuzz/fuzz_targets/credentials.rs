#![no_main]
//! Fuzz target: see `keyplane::fuzzing::credentials`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyplane::fuzzing::credentials(data));
