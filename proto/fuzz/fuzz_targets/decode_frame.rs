#![no_main]
// The body is a plain function in the crate so that `cargo test` replays the corpus on stable.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_proto::fuzz::decode_frame(data));
