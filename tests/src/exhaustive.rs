//! Exhaustive checking of the membership models ([`crate::member_model`],
//! [`crate::view_model`]) with stateright.

use std::fmt::Debug;
use std::hash::Hash;
use std::time::Instant;

use stateright::{Checker, Expectation, Model};

/// Explores every state of `model` breadth-first on every core; panics with the path to a
/// state where an `always` or `eventually` property fails, or when a `sometimes` property is
/// never met (the run would show nothing). Prints and returns the number of unique states.
pub fn check<M>(name: &str, model: M) -> usize
where
    M: Model + Send + Sync + 'static,
    M::State: Clone + PartialEq + Hash + Debug + Send + Sync + 'static,
    M::Action: Clone + PartialEq + Debug,
{
    let start = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let checker = model.checker().threads(threads).spawn_bfs().join();
    let states = checker.unique_state_count();
    println!(
        "{name}: {states} unique states, depth {}, {:.2?}",
        checker.max_depth(),
        start.elapsed()
    );
    for property in checker.model().properties() {
        match (property.expectation, checker.discovery(property.name)) {
            (Expectation::Sometimes, None) => {
                panic!("{name}: no state where \"{}\"", property.name)
            }
            (Expectation::Sometimes, Some(_)) | (_, None) => {}
            (_, Some(path)) => panic!(
                "{name}: \"{}\" fails; path: {:#?}",
                property.name,
                path.into_actions()
            ),
        }
    }
    states
}
