//! Noise messages off the network: a first handshake message to the listener, an answer to a
//! connecting node, and sealed messages in an established session. Nothing panics; forged
//! messages are refused (the fuzzer cannot know the session's keys), and what a real session
//! seals opens unchanged on the other side.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use transport_zmq::fuzzing;

#[derive(Debug, Arbitrary)]
enum Input {
    Respond(Vec<u8>),
    Finish(Vec<u8>),
    Open(Vec<Vec<u8>>),
    RoundTrip(Vec<Vec<u8>>),
}

fuzz_target!(|input: Input| {
    match input {
        Input::Respond(first) => {
            // A handshake message made without the key: Noise needs the PSK to accept it.
            assert!(
                !fuzzing::noise_respond(&first),
                "accepted a forged handshake"
            );
        }
        Input::Finish(answer) => {
            assert!(!fuzzing::noise_finish(&answer), "accepted a forged answer");
        }
        Input::Open(messages) => {
            let messages: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
            assert_eq!(fuzzing::noise_open(&messages), 0, "opened a forged message");
        }
        Input::RoundTrip(frames) => {
            let frames: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            assert!(fuzzing::noise_round_trip(&frames), "a sealed frame changed");
        }
    }
});
