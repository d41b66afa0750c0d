//! A connection that breaks while both nodes live loses and duplicates nothing: the DEALER is
//! re-created and resends whatever was not acknowledged. A TCP proxy on 127.0.0.1 between
//! node 0's DEALER and node 1's ROUTER cuts every connection several times mid-stream.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use coherence_core::Transport;
use common::{admit, config, expect_quiet, frame, free_port, next, Proxy};
use transport_zmq::{ZmqConfig, ZmqTransport};

#[test]
fn cut_connections_lose_and_duplicate_nothing() {
    cuts_lose_and_duplicate_nothing(None);
}

/// With a secret every new connection has a new Noise session, and what is resent after a
/// cut is sealed again in it.
#[test]
fn cut_sessions_lose_and_duplicate_nothing() {
    cuts_lose_and_duplicate_nothing(Some(b"cut secret"));
}

fn cuts_lose_and_duplicate_nothing(secret: Option<&[u8]>) {
    let base = ZmqConfig {
        secret: secret.map(<[u8]>::to_vec),
        ..config("cuts")
    };
    let founder = ZmqTransport::start(base.clone()).unwrap();
    // Node 1 listens on a port we pick, and advertises the proxy in front of it.
    let port = free_port();
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], port)));
    let node = admit(
        std::slice::from_ref(&founder),
        0,
        ZmqConfig {
            listen: format!("tcp://127.0.0.1:{port}"),
            advertise: Some(proxy.endpoint()),
            ..base
        },
    );
    assert_eq!(node.contact().unwrap().addr, proxy.endpoint());

    const N: u32 = 3000;
    let mut cuts = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            for seq in 0..N {
                founder.send(1, seq.to_le_bytes().to_vec()).unwrap();
                if seq % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        for seq in 0..N {
            assert_eq!(next(&node), frame(0, &seq.to_le_bytes()), "frame {seq}");
            if seq % 700 == 350 {
                cuts += proxy.cut();
            }
        }
    });
    assert!(cuts >= 3, "only {cuts} connections were cut");
    expect_quiet(&node, Duration::from_millis(300));
    expect_quiet(&founder, Duration::from_millis(10));
    eprintln!("{cuts} connections cut; {N} frames in order, once each");
    if secret.is_some() {
        assert_eq!(node.stats().rejected_replayed, 0, "{:?}", node.stats());
    }
}
