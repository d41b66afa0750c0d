//! Smoke run: every rank adds 100 to a shared counter. `mpiexec -n 4 target/debug/examples/mpi_smoke`
use coherence_core::{Config, Node};

fn main() {
    let transport = transport_mpi::MpiTransport::init().expect("MPI starts");
    let n = transport.size() as i64;
    let node = Node::start(transport, Config::default()).expect("node starts");
    let counter = node.object("counter", 0i64).expect("opens");
    for _ in 0..100 {
        counter.update(|c| *c += 1).expect("update");
    }
    loop {
        let v = *counter.read().expect("read");
        if v == 100 * n {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    println!("rank {} done: {}", node.id(), *counter.read().unwrap());
    node.shutdown().expect("shutdown");
}
