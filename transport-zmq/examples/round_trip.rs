//! Raw round trip of one frame between two `ZmqTransport`s in one process, over 127.0.0.1:
//! node 0 sends, node 1's thread echoes, node 0 waits for the echo. This is the floor under
//! any protocol operation that needs one exchange.
//!
//! `cargo run --release -p transport-zmq --example round_trip [iterations]`; with
//! `COHERENCE_SECRET` set, every connection starts a Noise session and every frame is
//! encrypted and authenticated in it, which shows their cost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use coherence_core::{Transport, TransportEvent};
use transport_zmq::{secret_from_env_or_file, ZmqConfig, ZmqTransport};

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(5000);
    let config = ZmqConfig {
        secret: secret_from_env_or_file(None).expect("a readable secret"),
        ..ZmqConfig::new("tcp://127.0.0.1:0", "bench")
    };
    println!("secret (Noise sessions): {}", config.secret.is_some());
    let a = ZmqTransport::start(config.clone()).expect("founder");
    // The joiner's start returns once a member addresses it; here node 0 plays the core's
    // part and takes it in as node 1 when its join request comes.
    let joining = {
        let config = ZmqConfig {
            join: Some(a.local_addr()),
            ..config
        };
        std::thread::spawn(move || ZmqTransport::start(config).expect("joiner"))
    };
    let TransportEvent::JoinRequest(contact) = wait(&a) else {
        panic!("expected a join request");
    };
    let view = BTreeMap::from([(0, a.contact().expect("a contact")), (1, contact)]);
    a.connect_members(&view);
    let b = joining.join().expect("the joiner starts");
    assert_eq!(b.local_id(), 1);
    b.connect_members(&view);
    for size in [8usize, 4096, 64 << 10] {
        let payload = vec![7u8; size];
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..iterations + iterations / 10 {
                    if let TransportEvent::Frame { from, bytes } = wait(&b) {
                        b.send(from, bytes).expect("echo");
                    }
                }
            });
            let mut samples = Vec::with_capacity(iterations);
            for i in 0..iterations + iterations / 10 {
                let sent = Instant::now();
                a.send(1, payload.clone()).expect("send");
                let TransportEvent::Frame { bytes, .. } = wait(&a) else {
                    panic!("expected the echo");
                };
                assert_eq!(bytes.len(), size);
                // The first tenth warms up connections and allocator.
                if i >= iterations / 10 {
                    samples.push(sent.elapsed());
                }
            }
            samples.sort_unstable();
            let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
            println!(
                "{size:>6} B: mean {:>7.1} us, median {:>7.1} us, p99 {:>7.1} us ({} round trips)",
                micros(mean),
                micros(samples[samples.len() / 2]),
                micros(samples[samples.len() * 99 / 100]),
                samples.len()
            );
        });
    }
}

fn wait(node: &ZmqTransport) -> TransportEvent {
    node.recv(Duration::from_secs(10))
        .expect("open")
        .expect("an event within 10 s")
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
