//! Python bindings of coherence: the extension module `coherence._native`, which the Python
//! package `coherence` (in `coherence/`) re-exports with its exceptions and the lab's interface.
//!
//! Python values are encoded by a Python codec (pickle, msgpack) and held by the core as
//! typed values ([`codec`]); the core's errors become Python exceptions ([`errors`]); the node
//! and object handles ([`node`]) release the GIL whenever they may wait.

mod codec;
mod errors;
mod node;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<node::PyNode>()?;
    m.add_class::<node::PyDistObj>()?;
    m.add("RUST_TYPES", PyTuple::new(m.py(), codec::RUST_TYPES)?)?;
    m.add("HAS_MPI", cfg!(feature = "mpi"))?;
    Ok(())
}
