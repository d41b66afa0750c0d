//! How Python values become the values of replicated objects, and back.
//!
//! A Python value is encoded on the Python side by its object's codec (`pickle`, or `msgpack`
//! for plain data) and stored on the Rust side as a typed [`DistObj`], because the core tells
//! objects of different types apart by the Rust type's name (`Error::TypeMismatch`):
//!
//! - `codec="pickle"`: the pickle's bytes, as [`Pickle`]. Only Python nodes read them.
//! - `codec="msgpack"`: a Rust value decoded from the msgpack bytes, of the Rust type the
//!   caller names (`rust_type`, one of [`RUST_TYPES`]), so that a Rust node opening the same
//!   object as `DistObj<i64>` or `DistObj<BTreeMap<String, i64>>` shares it: same type name,
//!   same bytes on the wire (the core encodes values with rmp-serde, which is msgpack).
//!   Without `rust_type` the value is an [`rmpv::Value`], any msgpack value.
//!
//! A pickle object and a msgpack object of one name, or two msgpack objects of different Rust
//! types, are thus a type mismatch, never garbage. A value that does not fit the named Rust
//! type (a string for `i64`) is refused when it is written.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use coherence_core::{DistObj, Error, Node};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{IntoPyDict, PyBytes};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::errors;

/// The bytes of a pickle, stored as they are. Its own type, so that its type name tells pickle
/// objects from every msgpack one.
#[derive(Serialize, Deserialize)]
pub struct Pickle(#[serde(with = "serde_bytes")] Vec<u8>);

/// How values of an object are encoded on the Python side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// `pickle.dumps` / `pickle.loads`: any picklable value.
    Pickle,
    /// `msgpack.packb` / `msgpack.unpackb`: None, bool, int, float, str, bytes, list, dict.
    Msgpack,
}

static PICKLE_DUMPS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static PICKLE_LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static MSGPACK_PACKB: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static MSGPACK_UNPACKB: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

impl Codec {
    /// The codec named `name` (`"pickle"` or `"msgpack"`).
    pub fn parse(name: &str) -> PyResult<Codec> {
        match name {
            "pickle" => Ok(Codec::Pickle),
            "msgpack" => Ok(Codec::Msgpack),
            _ => Err(PyValueError::new_err(format!(
                "codec={name:?}: expected \"pickle\" or \"msgpack\""
            ))),
        }
    }

    /// Encodes `value` of `object`; a value the codec refuses raises `EncodeError` caused by
    /// the codec's own exception.
    pub fn dumps(
        self,
        py: Python<'_>,
        object: &str,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<u8>> {
        let encoded = match self {
            Codec::Pickle => PICKLE_DUMPS
                .import(py, "pickle", "dumps")?
                .call1((value, -1)), // -1: the highest protocol, the fastest
            Codec::Msgpack => msgpack(py, &MSGPACK_PACKB, "packb")?.call1((value,)),
        };
        encoded
            .and_then(|bytes| Ok(bytes.cast_into::<PyBytes>()?.as_bytes().to_vec()))
            .map_err(|cause| errors::encode(py, object, cause))
    }

    /// Decodes the value of `object` into a new Python object, so the caller may change it
    /// without changing the object. Bytes the codec refuses raise `DecodeError`.
    pub fn loads(self, py: Python<'_>, object: &str, bytes: &[u8]) -> PyResult<Py<PyAny>> {
        let bytes = PyBytes::new(py, bytes);
        let decoded = match self {
            Codec::Pickle => PICKLE_LOADS.import(py, "pickle", "loads")?.call1((bytes,)),
            // Maps of Rust peers or of this codec may have keys other than strings.
            Codec::Msgpack => {
                let unpackb = msgpack(py, &MSGPACK_UNPACKB, "unpackb")?;
                let kwargs = [("strict_map_key", false)].into_py_dict(py)?;
                unpackb.call((bytes,), Some(&kwargs))
            }
        };
        decoded
            .map(Bound::unbind)
            .map_err(|cause| errors::decode(py, object, cause))
    }
}

/// A function of the `msgpack` package, with an error that says how to get it when missing.
fn msgpack<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyAny>>,
    name: &str,
) -> PyResult<&'py Bound<'py, PyAny>> {
    cell.import(py, "msgpack", name).map_err(|e| {
        let missing = pyo3::exceptions::PyImportError::new_err(
            "codec=\"msgpack\" needs the msgpack package: pip install msgpack",
        );
        missing.set_cause(py, Some(e));
        missing
    })
}

/// The encoded value of a read: the pickle itself (shared with the node's cache, not copied),
/// or msgpack bytes encoded from the Rust value.
pub enum Encoded {
    /// A pickle object's value.
    Pickle(Arc<Pickle>),
    /// A msgpack object's value.
    Msgpack(Vec<u8>),
}

impl std::ops::Deref for Encoded {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Encoded::Pickle(pickle) => &pickle.0,
            Encoded::Msgpack(bytes) => bytes,
        }
    }
}

/// Why an update ended without writing.
pub enum UpdateError {
    /// The library refused it, or the value did not convert.
    Core(Error),
    /// The Python function (or its codec) raised.
    Python(PyErr),
}

/// An update's step on the Python side: the encoded current value in, the encoded new value
/// and what the update returns out.
pub type UpdateFn<'a> = dyn FnMut(&[u8]) -> PyResult<(Vec<u8>, Py<PyAny>)> + 'a;

/// One opened object, whatever Rust type holds it: the Python side only sees encoded bytes.
pub trait Stored: Send + Sync {
    /// The object's name.
    fn name(&self) -> &str;
    /// Writes applied to the value this node holds (or last held).
    fn version(&self) -> u64;
    /// The value if this node holds a token; never waits.
    fn try_read(&self) -> Result<Option<Encoded>, Error>;
    /// The value; waits for a token.
    fn read(&self) -> Result<Encoded, Error>;
    /// Replaces the value with the one `bytes` encode.
    fn write(&self, bytes: Vec<u8>) -> Result<(), Error>;
    /// Atomic read-modify-write: `f` turns the encoded current value into the encoded new one
    /// and what the update returns, or fails, and then nothing is written.
    fn update(&self, f: &mut UpdateFn<'_>) -> Result<Py<PyAny>, UpdateError>;
}

/// How one Rust type holds the values a Python codec encoded.
trait Repr: Send + Sync + 'static {
    /// The type of the core's handle.
    type Value: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The value `bytes` encode; `Error::Encode` if they do not fit the type.
    fn from_encoded(object: &str, bytes: Vec<u8>) -> Result<Self::Value, Error>;
    /// The encoding of `value`.
    fn encoded<'v>(object: &str, value: &'v Self::Value) -> Result<Cow<'v, [u8]>, Error>;
    /// The encoding of a value read, sharing it where it can.
    fn shared(object: &str, value: Arc<Self::Value>) -> Result<Encoded, Error>;
}

/// Pickles, stored as their bytes.
struct PickleRepr;

impl Repr for PickleRepr {
    type Value = Pickle;

    fn from_encoded(_: &str, bytes: Vec<u8>) -> Result<Pickle, Error> {
        Ok(Pickle(bytes))
    }

    fn encoded<'v>(_: &str, value: &'v Pickle) -> Result<Cow<'v, [u8]>, Error> {
        Ok(Cow::Borrowed(&value.0))
    }

    fn shared(_: &str, value: Arc<Pickle>) -> Result<Encoded, Error> {
        Ok(Encoded::Pickle(value))
    }
}

/// Msgpack, stored as a `T` decoded from it.
struct MsgpackRepr<T>(PhantomData<fn() -> T>);

impl<T> Repr for MsgpackRepr<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Value = T;

    fn from_encoded(object: &str, bytes: Vec<u8>) -> Result<T, Error> {
        rmp_serde::from_slice(&bytes).map_err(|e| Error::Encode {
            object: object.to_string(),
            reason: format!(
                "the value does not fit the Rust type {}: {e}",
                std::any::type_name::<T>()
            ),
        })
    }

    fn encoded<'v>(object: &str, value: &'v T) -> Result<Cow<'v, [u8]>, Error> {
        rmp_serde::to_vec(value)
            .map(Cow::Owned)
            .map_err(|e| Error::Decode {
                object: object.to_string(),
                reason: e.to_string(),
            })
    }

    fn shared(object: &str, value: Arc<T>) -> Result<Encoded, Error> {
        Ok(Encoded::Msgpack(
            Self::encoded(object, &value)?.into_owned(),
        ))
    }
}

/// The core's handle on an object held as `R::Value`.
struct Handle<R: Repr> {
    obj: DistObj<R::Value>,
}

impl<R: Repr> Stored for Handle<R> {
    fn name(&self) -> &str {
        self.obj.name()
    }

    fn version(&self) -> u64 {
        self.obj.version()
    }

    fn try_read(&self) -> Result<Option<Encoded>, Error> {
        match self.obj.try_read()? {
            Some(value) => R::shared(self.obj.name(), value).map(Some),
            None => Ok(None),
        }
    }

    fn read(&self) -> Result<Encoded, Error> {
        R::shared(self.obj.name(), self.obj.read()?)
    }

    fn write(&self, bytes: Vec<u8>) -> Result<(), Error> {
        self.obj.write(R::from_encoded(self.obj.name(), bytes)?)
    }

    fn update(&self, f: &mut UpdateFn<'_>) -> Result<Py<PyAny>, UpdateError> {
        let name = self.obj.name();
        // A closure that fails (Python raised, or the new value does not fit the type) refuses
        // the update: the object is released unchanged.
        let done = self.obj.try_update(|value| {
            let encoded = R::encoded(name, value).map_err(UpdateError::Core)?;
            let (new, returned) = f(&encoded).map_err(UpdateError::Python)?;
            *value = R::from_encoded(name, new).map_err(UpdateError::Core)?;
            Ok(returned)
        });
        done.map_err(UpdateError::Core)?
    }
}

/// Opens an object as one Rust type, from the encoded init value.
type Opener = fn(&Node, &str, Vec<u8>) -> Result<Box<dyn Stored>, Error>;

fn open_as<R: Repr>(node: &Node, name: &str, init: Vec<u8>) -> Result<Box<dyn Stored>, Error> {
    let init = R::from_encoded(name, init)?;
    Ok(Box::new(Handle::<R> {
        obj: node.object(name, init)?,
    }))
}

/// Lists the Rust types a msgpack object can be held as, by the name a Python caller gives.
macro_rules! rust_types {
    ($($name:literal => $type:ty),* $(,)?) => {
        /// The values `rust_type` accepts: the Rust types, as a Rust program spells them, that
        /// a Rust node opens the same object as (`node.object::<i64>(...)`).
        pub const RUST_TYPES: &[&str] = &[$($name),*];

        /// The opener of the Rust type named `rust_type`, if it is listed.
        fn msgpack_opener(rust_type: &str) -> Option<Opener> {
            match rust_type {
                $($name => Some(open_as::<MsgpackRepr<$type>>),)*
                _ => None,
            }
        }
    };
}

rust_types! {
    "rmpv::Value" => rmpv::Value,
    "i64" => i64,
    "u64" => u64,
    "f64" => f64,
    "bool" => bool,
    "String" => String,
    "Vec<i64>" => Vec<i64>,
    "Vec<f64>" => Vec<f64>,
    "Vec<String>" => Vec<String>,
    "BTreeMap<String, i64>" => BTreeMap<String, i64>,
    "BTreeMap<String, f64>" => BTreeMap<String, f64>,
    "BTreeMap<String, String>" => BTreeMap<String, String>,
}

/// The Rust type of a msgpack object when the caller names none: any msgpack value.
const DEFAULT_RUST_TYPE: &str = "rmpv::Value";

/// What a caller asked to open: the codec and how the value is held. Checked before anything
/// is encoded or sent.
#[derive(Clone, Copy)]
pub struct Kind {
    codec: Codec,
    open: Opener,
}

impl Kind {
    /// Checks that `rust_type` goes with `codec` and is one of [`RUST_TYPES`].
    pub fn new(codec: Codec, rust_type: Option<&str>) -> PyResult<Kind> {
        let open =
            match (codec, rust_type) {
                (Codec::Pickle, None) => open_as::<PickleRepr>,
                (Codec::Pickle, Some(_)) => return Err(PyValueError::new_err(
                    "rust_type goes with codec=\"msgpack\": a pickle object is only read by Python",
                )),
                (Codec::Msgpack, rust_type) => {
                    let rust_type = rust_type.unwrap_or(DEFAULT_RUST_TYPE);
                    msgpack_opener(rust_type).ok_or_else(|| {
                        PyValueError::new_err(format!(
                            "rust_type={rust_type:?} is not one of {RUST_TYPES:?}"
                        ))
                    })?
                }
            };
        Ok(Kind { codec, open })
    }

    /// The codec.
    pub fn codec(self) -> Codec {
        self.codec
    }

    /// Opens `name` on `node` with the encoded `init`.
    pub fn open(self, node: &Node, name: &str, init: Vec<u8>) -> Result<Box<dyn Stored>, Error> {
        (self.open)(node, name, init)
    }
}
