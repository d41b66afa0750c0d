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
use std::collections::{BTreeMap, HashSet};
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use coherence_core::{DistObj, Error, Node};
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    IntoPyDict, PyBool, PyBytes, PyComplex, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet,
    PyString, PyTuple,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::errors;

/// The bytes of a pickle, stored as they are. Its own type, so that its type name tells pickle
/// objects from every msgpack one. On the wire it is the bytes alone.
pub struct Pickle {
    bytes: Vec<u8>,
    /// What the first read of this value made for the reads after it, so that a read hit
    /// costs no more than the `pickle.loads` it cannot avoid.
    made: OnceLock<Made>,
}

/// What reads of one pickle share.
enum Made {
    /// The decoded value itself, when nobody can change it (see [`immutable`]): every read
    /// hands out this one object.
    Value(Py<PyAny>),
    /// The decoded value, plain data or a default-pickled instance of this shape, never handed
    /// out: each read hands out a copy, as good as a decoded one and many times cheaper.
    Plain(Py<PyAny>, Shape),
    /// Anything else: `pickle.loads` and its arguments, the pickle as `bytes`, in a tuple
    /// made once, so that each read only runs the decode.
    Load(Py<PyAny>, Py<PyTuple>),
}

impl Pickle {
    fn new(bytes: Vec<u8>) -> Pickle {
        Pickle {
            bytes,
            made: OnceLock::new(),
        }
    }
}

/// The wire form of [`Pickle`], as a derive would make it: a newtype of the bytes.
#[derive(Serialize)]
#[serde(rename = "Pickle")]
struct PickleOut<'a>(#[serde(with = "serde_bytes")] &'a [u8]);

/// The wire form of [`Pickle`], read.
#[derive(Deserialize)]
#[serde(rename = "Pickle")]
struct PickleIn(#[serde(with = "serde_bytes")] Vec<u8>);

impl Serialize for Pickle {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        PickleOut(&self.bytes).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Pickle {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Pickle, D::Error> {
        PickleIn::deserialize(deserializer).map(|PickleIn(bytes)| Pickle::new(bytes))
    }
}

/// Whether no Python code can change `value`: None, bool, int, float, complex, str, bytes,
/// and tuples and frozensets of these (exact types: a subclass may add mutable state).
fn immutable(value: &Bound<'_, PyAny>, depth: usize) -> bool {
    if value.is_none()
        || value.is_exact_instance_of::<PyBool>()
        || value.is_exact_instance_of::<PyInt>()
        || value.is_exact_instance_of::<PyFloat>()
        || value.is_exact_instance_of::<PyComplex>()
        || value.is_exact_instance_of::<PyString>()
        || value.is_exact_instance_of::<PyBytes>()
    {
        return true;
    }
    // Deeper nesting is decoded anew each time rather than checked at length.
    depth < PLAIN_DEPTH
        && (value
            .cast_exact::<PyTuple>()
            .is_ok_and(|tuple| tuple.iter().all(|item| immutable(&item, depth + 1)))
            || value
                .cast_exact::<PyFrozenSet>()
                .is_ok_and(|set| set.iter().all(|item| immutable(&item, depth + 1))))
}

/// How deep [`immutable`] and [`Shape::of`] follow containers; deeper values are decoded
/// anew at each read.
const PLAIN_DEPTH: usize = 32;

/// Where the mutable parts of plain data are: [`immutable`] leaves in `dict`s, `list`s, `set`s,
/// tuples (exact types) and instances of classes that pickle the default way. A copy along it
/// is what `pickle.loads` of the value's pickle would make, without the decoding.
enum Shape {
    /// Immutable: shared, not copied.
    Leaf,
    /// A container of leaves only: a shallow copy.
    Flat,
    /// A `dict`: a shallow copy, then a copy of each of these values in place.
    Dict(Vec<(Py<PyAny>, Shape)>),
    /// A `list`: a shallow copy, then a copy of the item at each of these places.
    List(Vec<(usize, Shape)>),
    /// A tuple holding something mutable: a new tuple of copies.
    Tuple(Vec<Shape>),
    /// An instance of a class that pickles the default way (see [`Instance::of`]).
    Instance(Box<Instance>),
}

/// How `pickle.loads` rebuilds an instance of a class that pickles the default way: it calls
/// `cls.__new__(cls, *args)`, then stores each item of the state `dict` in the new instance's
/// `__dict__`, without `__setattr__` (so frozen dataclasses too).
struct Instance {
    /// `cls.__new__`.
    new: Py<PyAny>,
    /// `(cls, *args)`, the `args` immutable.
    args: Py<PyTuple>,
    /// The decoded instance's state, never handed out, and where its mutable parts are.
    state: Option<(Py<PyDict>, Shape)>,
}

impl Instance {
    /// How to copy `value` if its class pickles it the default way: `__reduce_ex__` gives
    /// `copyreg.__newobj__`, immutable arguments led by the class itself, a state that is a
    /// `dict` of plain data with `str` keys (or none), no list or dict items, and the class has
    /// no `__setstate__`. Anything else (`None`) is unpickled at each read.
    fn of(value: &Bound<'_, PyAny>, depth: usize, seen: &mut HashSet<usize>) -> Option<Instance> {
        let py = value.py();
        let class = value.get_type();
        if class.hasattr("__setstate__").ok()? {
            return None;
        }
        let newobj = COPYREG_NEWOBJ.import(py, "copyreg", "__newobj__").ok()?;
        let reduced = value
            .call_method1("__reduce_ex__", (REDUCE_PROTOCOL,))
            .ok()?;
        let reduced = reduced.cast_exact::<PyTuple>().ok()?;
        if !(2..=5).contains(&reduced.len()) || !reduced.get_item(0).ok()?.is(newobj) {
            return None;
        }
        let args = reduced
            .get_item(1)
            .ok()?
            .cast_into_exact::<PyTuple>()
            .ok()?;
        let mut items = args.iter();
        if !items.next()?.is(&class) || !items.all(|item| immutable(&item, 0)) {
            return None;
        }
        if reduced.iter().skip(3).any(|item| !item.is_none()) {
            return None;
        }
        let state = match reduced.get_item(2) {
            Err(_) => None,
            Ok(state) if state.is_none() => None,
            Ok(state) => {
                let state = state.cast_into_exact::<PyDict>().ok()?;
                if !state
                    .keys()
                    .iter()
                    .all(|key| key.is_exact_instance_of::<PyString>())
                {
                    return None;
                }
                let shape = Shape::at(state.as_any(), depth + 1, seen)?;
                Some((state.unbind(), shape))
            }
        };
        Some(Instance {
            new: class.getattr("__new__").ok()?.unbind(),
            args: args.unbind(),
            state,
        })
    }

    /// A new instance, as `pickle.loads` would make it.
    fn copy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let instance = self.new.bind(py).call1(self.args.bind(py))?;
        if let Some((state, shape)) = &self.state {
            let dict = instance
                .getattr(intern!(py, "__dict__"))?
                .cast_into::<PyDict>()?;
            shape.fill(&dict, state.bind(py))?;
        }
        Ok(instance)
    }
}

impl Shape {
    /// The shape of `value`, or `None` if it is not plain data or meets a container twice
    /// (`pickle` keeps a shared or cyclic container shared; a copy would not).
    fn of(value: &Bound<'_, PyAny>) -> Option<Shape> {
        Shape::at(value, 0, &mut HashSet::new())
    }

    fn at(value: &Bound<'_, PyAny>, depth: usize, seen: &mut HashSet<usize>) -> Option<Shape> {
        if immutable(value, 0) {
            return Some(Shape::Leaf);
        }
        if depth >= PLAIN_DEPTH || !seen.insert(value.as_ptr() as usize) {
            return None;
        }
        if let Ok(dict) = value.cast_exact::<PyDict>() {
            let mut inner = Vec::new();
            for (key, item) in dict.iter() {
                if !immutable(&key, 0) {
                    return None;
                }
                match Shape::at(&item, depth + 1, seen)? {
                    Shape::Leaf => {}
                    shape => inner.push((key.unbind(), shape)),
                }
            }
            Some(if inner.is_empty() {
                Shape::Flat
            } else {
                Shape::Dict(inner)
            })
        } else if let Ok(list) = value.cast_exact::<PyList>() {
            let mut inner = Vec::new();
            for (at, item) in list.iter().enumerate() {
                match Shape::at(&item, depth + 1, seen)? {
                    Shape::Leaf => {}
                    shape => inner.push((at, shape)),
                }
            }
            Some(if inner.is_empty() {
                Shape::Flat
            } else {
                Shape::List(inner)
            })
        } else if let Ok(tuple) = value.cast_exact::<PyTuple>() {
            let items = tuple
                .iter()
                .map(|item| Shape::at(&item, depth + 1, seen))
                .collect::<Option<Vec<_>>>()?;
            Some(Shape::Tuple(items))
        } else if let Ok(set) = value.cast_exact::<PySet>() {
            set.iter()
                .all(|item| immutable(&item, 0))
                .then_some(Shape::Flat)
        } else {
            Instance::of(value, depth, seen).map(|instance| Shape::Instance(Box::new(instance)))
        }
    }

    /// Puts a copy of `source`'s items, which has this shape (a `dict`'s), into `target`: the
    /// immutable ones as they are, copies of the mutable ones.
    fn fill(&self, target: &Bound<'_, PyDict>, source: &Bound<'_, PyDict>) -> PyResult<()> {
        target.update(source.as_mapping())?;
        if let Shape::Dict(inner) = self {
            for (key, shape) in inner {
                let key = key.bind(source.py());
                target.set_item(key, shape.copy(&source.as_any().get_item(key)?)?)?;
            }
        }
        Ok(())
    }

    /// A copy of `value`, which has this shape.
    fn copy<'py>(&self, value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Shape::Leaf => Ok(value.clone()),
            Shape::Flat => {
                if let Ok(dict) = value.cast_exact::<PyDict>() {
                    Ok(dict.copy()?.into_any())
                } else if let Ok(list) = value.cast_exact::<PyList>() {
                    Ok(list.get_slice(0, list.len()).into_any())
                } else {
                    value.call_method0("copy")
                }
            }
            Shape::Dict(_) => {
                let copy = PyDict::new(value.py());
                self.fill(&copy, value.cast_exact::<PyDict>()?)?;
                Ok(copy.into_any())
            }
            Shape::List(inner) => {
                let list = value.cast_exact::<PyList>()?;
                let copy = list.get_slice(0, list.len());
                for (at, shape) in inner {
                    copy.set_item(*at, shape.copy(&list.get_item(*at)?)?)?;
                }
                Ok(copy.into_any())
            }
            Shape::Tuple(items) => {
                let tuple = value.cast_exact::<PyTuple>()?;
                let copies = items
                    .iter()
                    .zip(tuple.iter())
                    .map(|(shape, item)| shape.copy(&item))
                    .collect::<PyResult<Vec<_>>>()?;
                Ok(PyTuple::new(value.py(), copies)?.into_any())
            }
            Shape::Instance(instance) => instance.copy(value.py()),
        }
    }
}

/// Reads a pickle object's value: a new Python object the caller may change (a copy of plain
/// data, else a decode), or the one shared immutable object (see [`immutable`]). Bytes
/// `pickle.loads` refuses raise `DecodeError`.
pub fn read_pickle(py: Python<'_>, object: &str, pickle: &Pickle) -> PyResult<Py<PyAny>> {
    let read = match pickle.made.get() {
        Some(Made::Value(value)) => return Ok(value.clone_ref(py)),
        Some(Made::Plain(value, shape)) => return shape.copy(value.bind(py)).map(Bound::unbind),
        Some(Made::Load(loads, args)) => loads.bind(py).call(args.bind(py), None),
        None => first_read(py, pickle),
    };
    read.map(Bound::unbind)
        .map_err(|cause| errors::decode(py, object, cause))
}

/// Decodes a pickle for the first time and keeps what the reads after it need.
fn first_read<'py>(py: Python<'py>, pickle: &Pickle) -> PyResult<Bound<'py, PyAny>> {
    let loads = PICKLE_LOADS.import(py, "pickle", "loads")?;
    let bytes = PyBytes::new(py, &pickle.bytes);
    let value = loads.call1((&bytes,))?;
    let (made, value) = if immutable(&value, 0) {
        (Made::Value(value.clone().unbind()), value)
    } else if let Some(shape) = Shape::of(&value) {
        // Kept, and the caller gets a copy like every later read.
        let copy = shape.copy(&value)?;
        (Made::Plain(value.unbind(), shape), copy)
    } else {
        let args = PyTuple::new(py, [bytes])?;
        (Made::Load(loads.clone().unbind(), args.unbind()), value)
    };
    // Another thread may have made it first: either is right.
    let _ = pickle.made.set(made);
    Ok(value)
}

/// How values of an object are encoded on the Python side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// `pickle.dumps` / `pickle.loads`: any picklable value.
    Pickle,
    /// `msgpack.packb` / `msgpack.unpackb`: None, bool, int, float, str, bytes, list, dict.
    Msgpack,
}

/// The protocol `pickle.dumps` is asked for: -1, the highest, the fastest.
const PICKLE_PROTOCOL: i32 = -1;

/// The protocol an instance is reduced with to see how it pickles: 2 and above reduce through
/// `copyreg.__newobj__`; 5 is the highest of every Python this package supports.
const REDUCE_PROTOCOL: i32 = 5;

static COPYREG_NEWOBJ: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
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
                .call1((value, PICKLE_PROTOCOL)),
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
            Encoded::Pickle(pickle) => &pickle.bytes,
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
        Ok(Pickle::new(bytes))
    }

    fn encoded<'v>(_: &str, value: &'v Pickle) -> Result<Cow<'v, [u8]>, Error> {
        Ok(Cow::Borrowed(&value.bytes))
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
