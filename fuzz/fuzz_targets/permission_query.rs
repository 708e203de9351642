#![no_main]
//! Fuzz target: see `keyplane::fuzzing::permission_query`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyplane::fuzzing::permission_query(data));
