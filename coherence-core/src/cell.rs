//! The readable value of one object on this node, as reader threads see it.
//!
//! The driver publishes a value when the node holds a token and withdraws it when the last
//! token leaves. A read hit must cost tens of nanoseconds and scale with reader threads, so it
//! writes no shared memory: it loads the cell's state word (a generation and a readable bit)
//! and finds the decoded value in a small per-thread cache filled for that generation. Each
//! thread decodes its own copy of a version once, so the `Arc` a read returns has a reference
//! count no other thread touches (one shared `Arc` measured slower than an `RwLock` once two
//! threads cloned it). The price is one decode per thread and version, and each thread keeping
//! up to [`CACHE_ENTRIES`] values alive.

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::wire::Value;

/// How many objects' values one thread keeps decoded.
pub const CACHE_ENTRIES: usize = 32;

/// Gives every cell of the process its own id, so a thread's cache entry can never be taken
/// for another cell's, even one at the same address after the first was freed.
static NEXT_CELL_ID: AtomicU64 = AtomicU64::new(0);

/// One object's readable value on this node.
pub(crate) struct Cell {
    id: u64,
    /// `generation << 1 | readable`; the generation grows on every publish and withdrawal.
    state: AtomicU64,
    /// The value while readable, for cache misses. Written only under this lock, which also
    /// orders the state word's changes.
    current: Mutex<Option<(u64, Bytes)>>,
    /// Version of the last value this node held, readable or not.
    last_version: AtomicU64,
}

impl Default for Cell {
    fn default() -> Self {
        Cell {
            id: NEXT_CELL_ID.fetch_add(1, Ordering::Relaxed),
            state: AtomicU64::new(0),
            current: Mutex::new(None),
            last_version: AtomicU64::new(0),
        }
    }
}

impl Cell {
    /// Makes `value` the readable value.
    pub(crate) fn publish(&self, value: &Value) {
        self.saw_version(value.version);
        let mut current = self.lock();
        *current = Some((value.version, value.bytes.clone()));
        self.advance(true);
    }

    /// Withdraws the value: the node gave its last token away.
    pub(crate) fn invalidate(&self) {
        let mut current = self.lock();
        *current = None;
        self.advance(false);
    }

    /// Records a version this node held, even if only for the step that completed an operation.
    pub(crate) fn saw_version(&self, version: u64) {
        self.last_version.fetch_max(version, Ordering::AcqRel);
    }

    /// The version of the last value this node held.
    pub(crate) fn last_version(&self) -> u64 {
        self.last_version.load(Ordering::Acquire)
    }

    /// The readable value decoded as `T`, or `None` while the node holds no token.
    #[inline]
    pub(crate) fn read<T>(&self, object: &str) -> Result<Option<Arc<T>>, Error>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let state = self.state.load(Ordering::Acquire);
        if state & 1 == 0 {
            return Ok(None);
        }
        if let Some(value) = cached(self.id, state) {
            return Ok(Some(value));
        }
        self.read_slow(object)
    }

    #[cold]
    fn read_slow<T>(&self, object: &str) -> Result<Option<Arc<T>>, Error>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let (state, bytes) = {
            let current = self.lock();
            // Under the lock the state word matches `current`.
            let state = self.state.load(Ordering::Acquire);
            let Some((_, bytes)) = current.as_ref() else {
                return Ok(None);
            };
            (state, bytes.clone())
        };
        // Decoded outside the lock: the driver publishes under it, and a large value's decode
        // would stall every protocol step of the node. The read takes effect when the lock was
        // held, where this value was the readable one.
        let value: Arc<T> = Arc::new(decode(object, &bytes)?);
        remember(self.id, state, Arc::clone(&value));
        Ok(Some(value))
    }

    fn advance(&self, readable: bool) {
        let generation = (self.state.load(Ordering::Relaxed) >> 1) + 1;
        self.state
            .store(generation << 1 | u64::from(readable), Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, Option<(u64, Bytes)>> {
        // The value is replaced whole, so a poisoned lock still holds a consistent one.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Decodes an object's value.
pub(crate) fn decode<T: DeserializeOwned>(object: &str, bytes: &[u8]) -> Result<T, Error> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Decode {
        object: object.to_string(),
        reason: e.to_string(),
    })
}

/// A value one thread decoded for one cell at one generation.
struct Entry {
    cell: u64,
    state: u64,
    /// An `Arc<T>`.
    value: Box<dyn Any>,
}

thread_local! {
    static CACHE: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

#[inline]
fn cached<T: 'static>(cell: u64, state: u64) -> Option<Arc<T>> {
    CACHE.with(|cache| {
        let cache = cache.borrow();
        let entry = cache.iter().find(|e| e.cell == cell)?;
        if entry.state != state {
            return None;
        }
        entry.value.downcast_ref::<Arc<T>>().cloned()
    })
}

fn remember<T: 'static>(cell: u64, state: u64, value: Arc<T>) {
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        let entry = Entry {
            cell,
            state,
            value: Box::new(value),
        };
        match cache.iter_mut().find(|e| e.cell == cell) {
            Some(old) => *old = entry,
            None => {
                if cache.len() == CACHE_ENTRIES {
                    cache.remove(0);
                }
                cache.push(entry);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(version: u64, v: i64) -> Value {
        Value {
            version,
            type_name: "i64".into(),
            bytes: rmp_serde::to_vec(&v).unwrap().into(),
        }
    }

    #[test]
    fn reads_follow_publish_and_invalidate() {
        let cell = Cell::default();
        assert!(cell.read::<i64>("x").unwrap().is_none());
        cell.publish(&value(1, 10));
        assert_eq!(*cell.read::<i64>("x").unwrap().unwrap(), 10);
        assert_eq!(*cell.read::<i64>("x").unwrap().unwrap(), 10);
        cell.publish(&value(2, 20));
        assert_eq!(*cell.read::<i64>("x").unwrap().unwrap(), 20);
        cell.invalidate();
        assert!(cell.read::<i64>("x").unwrap().is_none());
        cell.publish(&value(2, 20));
        assert_eq!(*cell.read::<i64>("x").unwrap().unwrap(), 20);
        assert_eq!(cell.last_version(), 2);
    }

    #[test]
    fn threads_see_the_same_value_in_their_own_copies() {
        let cell = Arc::new(Cell::default());
        cell.publish(&value(3, 33));
        let mine = cell.read::<i64>("x").unwrap().unwrap();
        let theirs = {
            let cell = Arc::clone(&cell);
            std::thread::spawn(move || cell.read::<i64>("x").unwrap().unwrap())
                .join()
                .unwrap()
        };
        assert_eq!(*mine, *theirs);
        assert!(!Arc::ptr_eq(&mine, &theirs));
    }

    #[test]
    fn many_cells_evict_old_entries_but_stay_correct() {
        let cells: Vec<Cell> = (0..CACHE_ENTRIES * 2).map(|_| Cell::default()).collect();
        for (i, cell) in cells.iter().enumerate() {
            cell.publish(&value(1, i as i64));
        }
        for _ in 0..2 {
            for (i, cell) in cells.iter().enumerate() {
                assert_eq!(*cell.read::<i64>("x").unwrap().unwrap(), i as i64);
            }
        }
    }

    #[test]
    fn undecodable_value_is_an_error() {
        let cell = Cell::default();
        cell.publish(&Value {
            version: 1,
            type_name: "i64".into(),
            bytes: Bytes::from_static(&[0xc1]),
        });
        assert!(matches!(cell.read::<i64>("x"), Err(Error::Decode { .. })));
    }
}
