//! Replays every fuzz target's saved corpus and every crash it ever found
//! (`fuzz/corpus/<target>`, `fuzz/regressions/<target>`), so CI keeps what fuzzing learned
//! without running the fuzzer. Fuzzing itself: `fuzz/run.sh`.
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::path::Path;

#[test]
fn every_saved_fuzz_input_still_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, target) in keyplane::fuzzing::TARGETS {
        let mut replayed = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path
                    .file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with('.'))
                {
                    continue;
                }
                target(&std::fs::read(&path).unwrap());
                replayed += 1;
            }
        }
        assert!(replayed > 0, "no saved inputs for the fuzz target {name}");
    }
}
