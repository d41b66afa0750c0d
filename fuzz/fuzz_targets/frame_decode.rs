//! Any bytes a member sends as a frame: decoding never panics or allocates more than the frame
//! justifies, and what decodes encodes back to a frame that decodes to the same messages.
#![no_main]

use bytes::Bytes;
use coherence_core::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut messages = Vec::new();
    if let Ok(epoch) = wire::decode_into(Bytes::copy_from_slice(data), &mut messages, |_| None) {
        let again = wire::encode(epoch, messages.iter());
        let mut decoded = Vec::new();
        let epoch_again = wire::decode_into(Bytes::from(again), &mut decoded, |_| None)
            .expect("a re-encoded frame decodes");
        assert_eq!(epoch_again, epoch, "the epoch round trips");
        assert_eq!(decoded, messages, "decode and encode round trip");
    } else {
        assert!(messages.is_empty(), "a refused frame yields no message");
    }
});
