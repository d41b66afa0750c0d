//! Sweeps of the seeded simulations ([`crate::sim`], [`crate::fault_sim`]) over many seeds.

/// The number in environment variable `name`, if it is set; panics if it is not a number.
pub fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

/// Runs `run` on seeds `0..seeds`, the even ones on this thread and the odd ones on another
/// (the machines the suite runs on have two cores). Returns the reports folded with `add` and
/// each failure's message, in seed order.
pub fn sweep<R: Default + Send>(
    seeds: u64,
    run: impl Fn(u64) -> Result<R, String> + Sync,
    add: impl Fn(&mut R, &R) + Sync,
) -> (R, Vec<String>) {
    let half = |first: u64| {
        let mut total = R::default();
        let mut failures = Vec::new();
        for seed in (first..seeds).step_by(2) {
            match run(seed) {
                Ok(report) => add(&mut total, &report),
                Err(failure) => failures.push((seed, failure)),
            }
        }
        (total, failures)
    };
    let (mut total, mut failures, (odd_total, odd_failures)) = std::thread::scope(|s| {
        let odd = s.spawn(|| half(1));
        let (total, failures) = half(0);
        let odd = odd.join().expect("the sweep thread panicked");
        (total, failures, odd)
    });
    add(&mut total, &odd_total);
    failures.extend(odd_failures);
    failures.sort_by_key(|(seed, _)| *seed);
    (
        total,
        failures.into_iter().map(|(_, failure)| failure).collect(),
    )
}
