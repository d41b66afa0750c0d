//! Any bytes as a frame of the ZeroMQ transport (as they arrive without a secret, or as they
//! come out of a Noise session with one): decoding never panics, and what decodes encodes back
//! to exactly the same bytes, control payloads included. The first byte picks the secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport_zmq::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, frame)) = data.split_first() else {
        return;
    };
    if let Some(again) = fuzzing::frame_round_trip(frame, pick & 1 == 1) {
        assert_eq!(again, frame, "decode and encode round trip");
    }
    assert!(
        fuzzing::payloads_round_trip(frame),
        "a control payload that decodes encodes back to itself"
    );
});
