//! The library's errors as Python exceptions.
//!
//! The classes live in `coherence/_errors.py`: written in Python, each can also derive from
//! the built-in exception a caller would catch (`Timeout` is a `TimeoutError`, `TypeMismatch`
//! a `TypeError`), which an extension-defined class with one base cannot. One class per
//! `coherence_core::Error` variant, carrying the variant's fields as attributes.

use coherence_core::Error;
use pyo3::prelude::*;
use pyo3::types::PyString;

/// Where the exception classes are.
const MODULE: &str = "coherence._errors";

/// A new exception of the class `class`, with `message` and the attributes `attrs`. Should
/// the class itself be missing (a broken install), the import's error says so instead.
fn exception(py: Python<'_>, class: &str, message: String, attrs: &[(&str, Py<PyAny>)]) -> PyErr {
    let made = py
        .import(MODULE)
        .and_then(|module| module.getattr(class))
        .and_then(|class| class.call1((message,)))
        .and_then(|exception| {
            for (name, value) in attrs {
                exception.setattr(*name, value)?;
            }
            Ok(exception)
        });
    match made {
        Ok(exception) => PyErr::from_value(exception),
        Err(e) => e,
    }
}

fn string(py: Python<'_>, s: &str) -> Py<PyAny> {
    PyString::new(py, s).into_any().unbind()
}

fn int(py: Python<'_>, n: u64) -> Py<PyAny> {
    let Ok(n) = n.into_pyobject(py);
    n.into_any().unbind()
}

fn float(py: Python<'_>, x: f64) -> Py<PyAny> {
    let Ok(x) = x.into_pyobject(py);
    x.into_any().unbind()
}

/// The Python exception for `err`.
pub fn to_py(err: Error) -> PyErr {
    Python::attach(|py| {
        let message = err.to_string();
        let (class, attrs): (&str, Vec<(&str, Py<PyAny>)>) = match err {
            Error::Timeout {
                operation,
                object,
                after,
            } => (
                "Timeout",
                vec![
                    ("operation", string(py, operation)),
                    ("object", string(py, &object)),
                    ("after", float(py, after.as_secs_f64())),
                ],
            ),
            Error::TypeMismatch {
                object,
                expected,
                found,
            } => (
                "TypeMismatch",
                vec![
                    ("object", string(py, &object)),
                    ("expected", string(py, &expected)),
                    ("found", string(py, &found)),
                ],
            ),
            Error::Encode { object, reason } => (
                "EncodeError",
                vec![
                    ("object", string(py, &object)),
                    ("reason", string(py, &reason)),
                ],
            ),
            Error::ValueTooLarge { object, len, max } => (
                "ValueTooLarge",
                vec![
                    ("object", string(py, &object)),
                    ("size", int(py, len as u64)),
                    ("limit", int(py, max as u64)),
                ],
            ),
            Error::NameTooLong { len, max } => (
                "NameTooLong",
                vec![
                    ("size", int(py, len as u64)),
                    ("limit", int(py, max as u64)),
                ],
            ),
            Error::Decode { object, reason } => (
                "DecodeError",
                vec![
                    ("object", string(py, &object)),
                    ("reason", string(py, &reason)),
                ],
            ),
            Error::Stopped(node) => ("Stopped", vec![("node", int(py, node.into()))]),
            Error::Transport { node, cause } => (
                "TransportError",
                vec![
                    ("node", int(py, node.into())),
                    ("reason", string(py, &cause.to_string())),
                ],
            ),
            Error::InsideUpdate { operation, object } => (
                "InsideUpdate",
                vec![
                    ("operation", string(py, operation)),
                    ("object", string(py, &object)),
                ],
            ),
            Error::Spawn(reason) => ("SpawnError", vec![("reason", string(py, &reason))]),
            Error::Removed(node) => ("Removed", vec![("node", int(py, node.into()))]),
            Error::CutOff(node) => ("CutOff", vec![("node", int(py, node.into()))]),
            Error::NoMajority {
                node,
                operation,
                object,
            } => (
                "NoMajority",
                vec![
                    ("node", int(py, node.into())),
                    ("operation", string(py, operation)),
                    ("object", string(py, &object)),
                ],
            ),
            Error::Interrupted { operation, object } => (
                "Interrupted",
                vec![
                    ("operation", string(py, operation)),
                    ("object", string(py, &object)),
                ],
            ),
        };
        exception(py, class, message, &attrs)
    })
}

/// `EncodeError` for a value of `object` that its codec refused with `cause`.
pub fn encode(py: Python<'_>, object: &str, cause: PyErr) -> PyErr {
    caused(py, "EncodeError", "encode", object, cause)
}

/// `DecodeError` for a value of `object` that its codec refused with `cause`.
pub fn decode(py: Python<'_>, object: &str, cause: PyErr) -> PyErr {
    caused(py, "DecodeError", "decode", object, cause)
}

fn caused(py: Python<'_>, class: &str, verb: &str, object: &str, cause: PyErr) -> PyErr {
    let reason = cause.to_string();
    let err = exception(
        py,
        class,
        format!("cannot {verb} a value of {object:?}: {reason}"),
        &[
            ("object", string(py, object)),
            ("reason", string(py, &reason)),
        ],
    );
    err.set_cause(py, Some(cause));
    err
}

/// `StartError`: a transport could not start (the message says why).
pub fn start(py: Python<'_>, message: String) -> PyErr {
    exception(py, "StartError", message, &[])
}
