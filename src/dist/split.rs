//! Which prompt groups each rank runs. A group (one prompt and its n samples) never spans two
//! ranks, so its advantages need no communication; a mini-batch keeps its global number of
//! groups whatever the rank count, each rank taking a contiguous, near-equal part of it.

use std::ops::Range;

/// The groups of a mini-batch of `n_groups` that rank `rank` of `world` runs: a contiguous
/// range, the first `n_groups % world` ranks taking one group more than the others. Ranks past
/// the groups get an empty range (they still join every collective).
pub fn rank_groups(n_groups: usize, world: usize, rank: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (n_groups / world, n_groups % world);
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start.min(n_groups)..(start + len).min(n_groups)
}
