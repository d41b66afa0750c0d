//! `coherence.Node` and `coherence.DistObj`: the core's node and handles, for Python.
//!
//! Every call that may wait (for tokens, for peers, for a transport to start) releases the GIL,
//! so other Python threads run meanwhile; a read whose token is here never waits and keeps it.
//!
//! Ctrl-C: the core's waits cannot be cut short from outside (an operation ends when it
//! completes or at the node's timeout, and a retried request would lose its place in the
//! queue), so a signal that comes during a wait is handled as soon as the wait ends, and its
//! exception (`KeyboardInterrupt`) is raised instead of the call's result.

use std::path::PathBuf;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use coherence_core::{Config, Error, Node, WritePolicy};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use transport_zmq::{ZmqConfig, ZmqError, ZmqTransport};

use crate::codec::{self, Codec, Encoded, Kind, Stored, UpdateError};
use crate::errors::{self, to_py};

/// Runs `f`, which may wait, without the GIL; then handles the signals that came meanwhile,
/// whose exception (Ctrl-C's `KeyboardInterrupt`) takes precedence over `f`'s result.
fn wait<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    let result = py.detach(f);
    py.check_signals()?;
    Ok(result)
}

/// The core's configuration from the keyword arguments every constructor takes.
fn config(timeout: f64, write_policy: &str) -> PyResult<Config> {
    let timeout = Duration::try_from_secs_f64(timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "timeout={timeout}: expected a positive number of seconds"
            ))
        })?;
    let policy = match write_policy {
        "update" => WritePolicy::Update,
        "invalidate" => WritePolicy::Invalidate,
        _ => {
            return Err(PyValueError::new_err(format!(
                "write_policy={write_policy:?}: expected \"update\" or \"invalidate\""
            )))
        }
    };
    Ok(Config::default().timeout(timeout).write_policy(policy))
}

/// One member of a cluster: it keeps the objects it opens coherent with every other member.
///
/// Start one with `Node.local_cluster(n)` (threads of this process), `Node.zmq(...)`
/// (processes on any hosts, over TCP) or `Node.mpi()` (the ranks of an MPI job). Node 0 founds
/// the cluster and must be running for objects to be created. `with node:` shuts it down at the
/// end of the block; a node dropped without `shutdown()` still leaves properly.
#[pyclass(frozen, name = "Node", module = "coherence")]
pub struct PyNode {
    id: u32,
    /// The ZeroMQ address other nodes join through; `None` for other transports.
    address: Option<String>,
    /// `None` once shut down. Operations that use the node hold it shared; `shutdown` takes it.
    node: RwLock<Option<Node>>,
}

impl PyNode {
    fn new(node: Node, address: Option<String>) -> PyNode {
        PyNode {
            id: node.id(),
            address,
            node: RwLock::new(Some(node)),
        }
    }

    /// Runs `f` on the node, or fails with `Stopped` once it was shut down.
    fn with_node<R>(&self, f: impl FnOnce(&Node) -> Result<R, Error>) -> Result<R, Error> {
        let node = self.node.read().unwrap_or_else(PoisonError::into_inner);
        match node.as_ref() {
            Some(node) => f(node),
            None => Err(Error::Stopped(self.id)),
        }
    }
}

#[pymethods]
impl PyNode {
    /// Starts `n` nodes connected by in-memory channels, ids 0 to n-1, for threads of this
    /// process (tests, notebooks). Give each thread its own node.
    #[staticmethod]
    #[pyo3(signature = (n, *, timeout=10.0, write_policy="update"))]
    fn local_cluster(
        py: Python<'_>,
        n: usize,
        timeout: f64,
        write_policy: &str,
    ) -> PyResult<Vec<PyNode>> {
        let config = config(timeout, write_policy)?;
        if n == 0 {
            return Err(PyValueError::new_err("a cluster needs at least one node"));
        }
        wait(py, || {
            transport_local::cluster(n)
                .into_iter()
                .map(|transport| {
                    Node::start(transport, config.clone()).map(|node| PyNode::new(node, None))
                })
                .collect::<Result<Vec<_>, _>>()
        })?
        .map_err(to_py)
    }

    /// Starts a node that talks ZeroMQ over TCP: founds a cluster (node 0) without `join`, or
    /// joins the running cluster through `join`, the address of any member (its `address`).
    ///
    /// `listen` is the address to bind (`tcp://0.0.0.0:7000`; port 0 picks a free port).
    /// Every member of a cluster uses the same `cluster_id` and secret: the secret is read from
    /// `secret_file`, else from the environment variable `COHERENCE_SECRET`, else frames are not
    /// authenticated. `advertise` is the address others should use when it differs from
    /// `listen` (listening on 0.0.0.0, port mappings). Raises `StartError` when the address
    /// cannot be bound or no member answers, `ValueError` for a malformed address.
    #[staticmethod]
    #[pyo3(signature = (listen="tcp://127.0.0.1:0", join=None, *, secret_file=None,
                        cluster_id="coherence", advertise=None, timeout=10.0,
                        write_policy="update"))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments
    fn zmq(
        py: Python<'_>,
        listen: &str,
        join: Option<String>,
        secret_file: Option<PathBuf>,
        cluster_id: &str,
        advertise: Option<String>,
        timeout: f64,
        write_policy: &str,
    ) -> PyResult<PyNode> {
        let config = config(timeout, write_policy)?;
        let zmq_error = |e: ZmqError| match e {
            ZmqError::InvalidConfig(_) => PyValueError::new_err(e.to_string()),
            e => errors::start(py, e.to_string()),
        };
        let secret =
            transport_zmq::secret_from_env_or_file(secret_file.as_deref()).map_err(zmq_error)?;
        let settings = ZmqConfig {
            join,
            advertise,
            secret,
            ..ZmqConfig::new(listen, cluster_id)
        };
        let transport = wait(py, || ZmqTransport::start(settings))?.map_err(zmq_error)?;
        let address = transport.local_addr();
        let node = wait(py, || Node::start(transport, config))?.map_err(to_py)?;
        Ok(PyNode::new(node, Some(address)))
    }

    /// Starts this rank's node of an MPI job (`mpiexec -n 4 python main.py`); node ids are
    /// ranks, and every rank calls it at about the same time.
    ///
    /// If MPI is already initialized (mpi4py initializes it, with MPI_THREAD_MULTIPLE, when
    /// imported), the node uses that MPI on a duplicate of COMM_WORLD, so the program's own
    /// MPI calls go on, and leaves finalizing to its owner. Otherwise the node initializes MPI
    /// itself and finalizes it when shut down. Either way the node is shut down at interpreter
    /// exit, before mpi4py finalizes MPI, if the program did not do it before.
    ///
    /// Raises `StartError` if this build has no MPI transport, or MPI grants too little thread
    /// support.
    #[staticmethod]
    #[pyo3(signature = (*, timeout=10.0, write_policy="update"))]
    fn mpi(py: Python<'_>, timeout: f64, write_policy: &str) -> PyResult<Py<PyNode>> {
        let config = config(timeout, write_policy)?;
        let node = Py::new(py, start_mpi(py, config)?)?;
        // mpi4py finalizes MPI in a C-level exit hook, after every `atexit` function: the
        // node must have left by then, or its transport would call into a finalized MPI.
        py.import("atexit")?
            .call_method1("register", (node.getattr(py, "shutdown")?,))?;
        Ok(node)
    }

    /// This node's id: 0 for the founder, the rank under MPI.
    #[getter]
    fn id(&self) -> u32 {
        self.id
    }

    /// The address other ZeroMQ nodes join through (`join=`), or None for other transports.
    #[getter]
    fn address(&self) -> Option<&str> {
        self.address.as_deref()
    }

    /// Opens the object `name`: joins it with its current value if it exists anywhere in the
    /// cluster, else creates it with `init` (when nodes create a name at once, exactly one
    /// `init` wins, and every opener gets that one).
    ///
    /// `codec="pickle"` (default) stores any picklable value, for Python nodes.
    /// `codec="msgpack"` stores plain data (None, bool, int, float, str, bytes, list, dict) as
    /// msgpack; with `rust_type` (one of `coherence.RUST_TYPES`, e.g. `"i64"` or
    /// `"BTreeMap<String, i64>"`) it is held as that Rust type, so a Rust node that opens the
    /// object as `DistObj<i64>` shares it, and a value that does not fit the type is refused
    /// with `EncodeError`. Without `rust_type` a Rust node opens it as `DistObj<rmpv::Value>`.
    /// Opening an existing object with another codec or Rust type raises `TypeMismatch`.
    #[pyo3(signature = (name, init, codec="pickle", rust_type=None))]
    fn object(
        slf: &Bound<'_, Self>,
        name: &str,
        init: &Bound<'_, PyAny>,
        codec: &str,
        rust_type: Option<&str>,
    ) -> PyResult<PyDistObj> {
        let py = slf.py();
        let kind = Kind::new(Codec::parse(codec)?, rust_type)?;
        let init = kind.codec().dumps(py, name, init)?;
        let this = slf.get();
        let stored =
            wait(py, || this.with_node(|node| kind.open(node, name, init)))?.map_err(to_py)?;
        Ok(PyDistObj {
            node: slf.clone().unbind(),
            stored,
            codec: kind.codec(),
        })
    }

    /// The node's traffic counters: frames and protocol messages sent (and of those, the
    /// lease's background renewals) and received, those rejected as malformed or as something
    /// no correct peer sends, those dropped as belonging to an epoch that is over (fenced);
    /// and the epoch of the view installed.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        // Without the GIL: a `shutdown` waiting for the node goes before new readers of it.
        let stats = wait(py, || self.with_node(|node| Ok(node.stats())))?.map_err(to_py)?;
        let dict = PyDict::new(py);
        dict.set_item("frames_sent", stats.frames_sent)?;
        dict.set_item("messages_sent", stats.messages_sent)?;
        dict.set_item("lease_frames_sent", stats.lease_frames_sent)?;
        dict.set_item("lease_messages_sent", stats.lease_messages_sent)?;
        dict.set_item("frames_received", stats.frames_received)?;
        dict.set_item("frames_rejected", stats.frames_rejected)?;
        dict.set_item("messages_rejected", stats.messages_rejected)?;
        dict.set_item("messages_fenced", stats.messages_fenced)?;
        dict.set_item("epoch", stats.epoch)?;
        Ok(dict)
    }

    /// Leaves the cluster: hands every token on so the others lose nothing, and waits (at most
    /// the timeout) until every member acknowledged. The node's objects raise `Stopped`
    /// afterwards. Calling it again does nothing.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        // Without the GIL: an `object()` on another thread may hold the node until it opened.
        wait(py, || {
            let node = self
                .node
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            node.map_or(Ok(()), Node::shutdown)
        })?
        .map_err(to_py)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Shuts the node down at the end of a `with` block; exceptions from the block go on.
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.shutdown(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        match &self.address {
            Some(address) => format!("<coherence.Node id={} address={address:?}>", self.id),
            None => format!("<coherence.Node id={}>", self.id),
        }
    }
}

#[cfg(feature = "mpi")]
fn start_mpi(py: Python<'_>, config: Config) -> PyResult<PyNode> {
    use transport_mpi::{MpiError, MpiTransport};
    let transport = py
        .detach(|| match MpiTransport::init() {
            // Initialized by the program (mpi4py): use its MPI.
            Err(MpiError::AlreadyInitialized) => MpiTransport::attach(),
            started => started,
        })
        .map_err(|e| errors::start(py, format!("MPI: {e}")))?;
    let node = wait(py, || Node::start(transport, config))?.map_err(to_py)?;
    Ok(PyNode::new(node, None))
}

#[cfg(not(feature = "mpi"))]
fn start_mpi(py: Python<'_>, _config: Config) -> PyResult<PyNode> {
    Err(errors::start(
        py,
        "this build of coherence has no MPI transport; reinstall it with \
         MATURIN_PEP517_ARGS=\"--features mpi\" pip install ./python (needs mpicc and libclang)"
            .to_string(),
    ))
}

/// A replicated object: every node that opened `name` sees the same value.
///
/// `read()` returns a new copy of the value each time (changing it changes nothing else);
/// it is local, without any message, while this node holds one of the object's tokens.
/// `write(v)` and `update(fn)` gather every token first, about one round trip. Every call
/// completes or raises within the node's timeout.
#[pyclass(frozen, generic, name = "DistObj", module = "coherence")]
pub struct PyDistObj {
    /// Keeps the node running while any of its objects is in use.
    node: Py<PyNode>,
    stored: Box<dyn Stored>,
    codec: Codec,
}

#[pymethods]
impl PyDistObj {
    /// The object's name.
    #[getter]
    fn name(&self) -> &str {
        self.stored.name()
    }

    /// The number of writes applied to the value this node holds (or last held).
    #[getter]
    fn version(&self) -> u64 {
        self.stored.version()
    }

    /// The node this object was opened on.
    #[getter]
    fn node(&self, py: Python<'_>) -> Py<PyNode> {
        self.node.clone_ref(py)
    }

    /// The current value, as a new object the caller owns (an immutable value is shared:
    /// nobody can change it).
    fn read(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let encoded = match self.stored.try_read().map_err(to_py)? {
            Some(encoded) => encoded,
            None => wait(py, || self.stored.read())?.map_err(to_py)?,
        };
        match encoded {
            Encoded::Pickle(pickle) => codec::read_pickle(py, self.stored.name(), &pickle),
            Encoded::Msgpack(bytes) => self.codec.loads(py, self.stored.name(), &bytes),
        }
    }

    /// Replaces the value, once this node holds every token.
    fn write(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes = self.codec.dumps(py, self.stored.name(), value)?;
        wait(py, || self.stored.write(bytes))?.map_err(to_py)
    }

    /// Atomic read-modify-write: calls `fn` with (a copy of) the current value and writes
    /// what it returns; no other write comes in between. Returns the new value. If `fn`
    /// raises, nothing is written and the exception goes on. `fn` runs while this node holds
    /// every token, so keep it short; it may use other objects, not this one (`InsideUpdate`).
    #[pyo3(name = "update")]
    fn update_with(&self, py: Python<'_>, r#fn: Py<PyAny>) -> PyResult<Py<PyAny>> {
        let codec = self.codec;
        let name = self.stored.name();
        let done = wait(py, || {
            self.stored.update(&mut |current| {
                Python::attach(|py| {
                    let value = codec.loads(py, name, current)?;
                    let new = r#fn.call1(py, (value,))?;
                    let bytes = codec.dumps(py, name, new.bind(py))?;
                    Ok((bytes, new))
                })
            })
        })?;
        match done {
            Ok(new) => Ok(new),
            Err(UpdateError::Core(e)) => Err(to_py(e)),
            Err(UpdateError::Python(e)) => Err(e),
        }
    }

    /// `with node.object(...) as obj:` reads like the lab's code; the object needs no closing
    /// (its node does), so the block only scopes the name.
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, PyTuple>) -> bool {
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "<coherence.DistObj {:?} on node {} version {}>",
            self.stored.name(),
            self.node.get().id,
            self.stored.version()
        )
    }
}
