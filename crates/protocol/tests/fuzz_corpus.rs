//! Replays the committed fuzz corpus (fuzz/corpus/parse_client_message) through the fuzzing
//! property, so every input the fuzzer kept is checked on each test run.

use std::path::PathBuf;

#[test]
fn committed_corpus_holds_the_property() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/parse_client_message");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus folder") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        atlas_protocol::fuzz_check(&data);
        count += 1;
    }
    assert!(count >= 17, "corpus has only {count} inputs");
}
