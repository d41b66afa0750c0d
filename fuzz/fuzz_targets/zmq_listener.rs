//! Any bytes a stranger sends to a node's port: the listener's ZMTP handshake (greeting,
//! READY, frame headers), with a secret the Noise handshake, then messages. It never panics or
//! hangs, and hands the engine nothing larger than its limit. The first byte picks the secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport_zmq::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let seen = fuzzing::listener_connection(input, pick & 1 == 1);
    // Every message's bytes came from the input (or, sealed, are shorter than them).
    assert!(
        seen.largest <= input.len(),
        "{seen:?} from {} bytes",
        input.len()
    );
});
