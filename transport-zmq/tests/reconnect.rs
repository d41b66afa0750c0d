//! A connection that breaks while both nodes live loses and duplicates nothing: the DEALER is
//! re-created and resends whatever was not acknowledged. A TCP proxy on 127.0.0.1 between
//! node 0's DEALER and node 1's ROUTER cuts every connection several times mid-stream.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coherence_core::Transport;
use common::{config, expect_quiet, frame, next};
use transport_zmq::{ZmqConfig, ZmqTransport};

/// Forwards connections to `target`; `cut` shuts all current ones down.
struct Proxy {
    addr: SocketAddr,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(listener: TcpListener, target: SocketAddr) -> Proxy {
        let addr = listener.local_addr().unwrap();
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let registry = Arc::clone(&live);
        // Detached: it dies with the test process; every copy thread ends at its cut.
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut live = registry.lock().unwrap();
                live.push(client.try_clone().unwrap());
                live.push(server.try_clone().unwrap());
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || pump(from, to));
                }
            }
        });
        Proxy { addr, live }
    }

    fn cut(&self) -> usize {
        let mut live = self.live.lock().unwrap();
        for stream in live.iter() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let cut = live.len() / 2;
        live.clear();
        cut
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

#[test]
fn cut_connections_lose_and_duplicate_nothing() {
    let base = config("cuts");
    let founder = ZmqTransport::start(base.clone()).unwrap();
    // Node 1 listens on a port we pick, and advertises the proxy in front of it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Proxy::start(proxy_listener, SocketAddr::from(([127, 0, 0, 1], port)));
    let node = ZmqTransport::start(ZmqConfig {
        listen: format!("tcp://127.0.0.1:{port}"),
        advertise: Some(format!("tcp://{}", proxy.addr)),
        join: Some(founder.local_addr()),
        ..base
    })
    .unwrap();
    assert_eq!(next(&founder), coherence_core::TransportEvent::Joined(1));

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
}
