//! The central-server baseline, built directly on the raw [`Transport`] (not the library):
//! endpoint 0 owns the value; every read and write of the workload nodes is a request frame
//! to it and a reply.
//!
//! The server is an endpoint of its own and runs no workload: if it also read and wrote
//! locally, its local operations (a plain variable) would dwarf every remote one and the
//! total would say nothing about the protocol. So "n nodes" here is n client endpoints
//! (ids `1..=n`), each with one worker thread, plus the server.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use coherence_core::{Transport, TransportEvent};

use crate::measure::{run_for, Rng};
use crate::net::{next_frame, Endpoint};

/// First byte of a read request.
const READ: u8 = 0;
/// First byte of a write request; the new value follows.
const WRITE: u8 = 1;

/// A running central server and its clients.
pub struct Central {
    clients: Vec<Box<dyn Transport>>,
    server: Option<JoinHandle<Result<(), String>>>,
    server_transport: Arc<dyn Transport>,
    stop: Arc<AtomicBool>,
}

impl Central {
    /// Starts the server on `endpoints[0]`; the others are clients.
    pub fn start(endpoints: Vec<Endpoint>) -> Result<Central, String> {
        let mut transports = endpoints.into_iter();
        let server_transport: Arc<dyn Transport> =
            Arc::from(transports.next().ok_or("no server endpoint")?);
        let clients: Vec<Box<dyn Transport>> = transports.collect();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (t, stop) = (Arc::clone(&server_transport), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("central-server".into())
                .spawn(move || serve(&*t, &stop))
                .map_err(|e| format!("cannot start the server thread: {e}"))?
        };
        Ok(Central {
            clients,
            server: Some(server),
            server_transport,
            stop,
        })
    }

    /// The mixed workload: client `i` reads or writes through the server.
    pub fn run(&self, read_pct: u32, duration: Duration) -> Result<(Vec<f64>, f64), String> {
        run_for(self.clients.len(), duration, |i, stop| {
            let t = &*self.clients[i];
            let mut rng = Rng::new(i);
            let mut ops = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let request = if rng.is_read(read_pct) {
                    vec![READ]
                } else {
                    let mut w = vec![WRITE];
                    w.extend_from_slice(&rng.next().to_le_bytes());
                    w
                };
                t.send(0, request).map_err(|e| format!("request: {e}"))?;
                loop {
                    let (from, reply) = next_frame(t)?;
                    if from == 0 {
                        black_box(reply);
                        break;
                    }
                }
                ops += 1;
            }
            Ok(ops)
        })
    }

    /// Stops the server and closes every endpoint.
    pub fn stop(mut self) -> Result<(), String> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        let served = match self.server.take() {
            Some(server) => server
                .join()
                .unwrap_or_else(|_| Err("server thread panicked".into())),
            None => return Ok(()),
        };
        // Closing may wait for peers' acknowledgements (ZeroMQ): close all at once.
        std::thread::scope(|s| {
            s.spawn(|| self.server_transport.close());
            for c in &self.clients {
                s.spawn(move || c.close());
            }
        });
        served
    }
}

impl Drop for Central {
    /// Never leaves the server thread running.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// The server loop: answers reads with the value and writes with an empty acknowledgement.
fn serve(t: &dyn Transport, stop: &AtomicBool) -> Result<(), String> {
    let mut value = 0u64.to_le_bytes().to_vec();
    while !stop.load(Ordering::Relaxed) {
        match t.recv(Duration::from_millis(10)) {
            Ok(Some(TransportEvent::Frame { from, bytes })) => {
                let reply = match bytes.first() {
                    Some(&READ) => value.clone(),
                    Some(&WRITE) => {
                        value = bytes[1..].to_vec();
                        Vec::new()
                    }
                    _ => return Err(format!("bad request from {from}")),
                };
                t.send(from, reply).map_err(|e| format!("reply: {e}"))?;
            }
            Ok(_) => {}
            Err(e) => return Err(format!("server receive: {e}")),
        }
    }
    Ok(())
}
