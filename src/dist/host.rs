//! The host-side rendezvous of the ranks of one process: a reusable barrier that can be
//! aborted, and collectives over host slices built on it.
//!
//! Every collective has three phases: each rank publishes the address of its input and waits
//! for the others (barrier 1); each rank reads every rank's input and writes only its own
//! output; a second barrier keeps every input alive and unchanged until all ranks have read it.
//! Sums run in rank order (rank 0 + rank 1 + ...), so results are deterministic and the same on
//! every rank.
//!
//! A rank that fails calls [`HostRank::abort`] (dropping a rank does the same): every rank
//! waiting in or later entering a collective of the group gets an error naming the failed rank
//! and its reason, instead of waiting forever.

use std::sync::{Arc, Condvar, Mutex};

use crate::{Error, Result};

struct State {
    /// Barrier generation: bumped when the last rank arrives.
    generation: u64,
    arrived: usize,
    /// (rank, reason) of the first abort.
    aborted: Option<(usize, String)>,
    /// Per rank: address and length of the slice it published for the current collective.
    slots: Vec<(usize, usize)>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

/// One rank's handle on a group of `world` ranks living in threads of this process.
pub struct HostRank {
    rank: usize,
    shared: Arc<Shared>,
}

/// Creates the handles of a group of `world` ranks (index = rank); hand one to each thread.
pub fn host_group(world: usize) -> Result<Vec<HostRank>> {
    crate::ensure!(world >= 1, "a rank group needs at least one rank (got 0)");
    let shared = Arc::new(Shared {
        world,
        state: Mutex::new(State {
            generation: 0,
            arrived: 0,
            aborted: None,
            slots: vec![(0, 0); world],
        }),
        cv: Condvar::new(),
    });
    Ok((0..world)
        .map(|rank| HostRank {
            rank,
            shared: shared.clone(),
        })
        .collect())
}

fn aborted_err(rank: usize, why: &str) -> Error {
    Error::msg(format!("rank {rank} stopped the rank group: {why}"))
}

impl HostRank {
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.shared.world
    }

    /// Stops the group: every rank waiting in or later entering a collective gets an error
    /// naming this rank and `why`. The first abort's reason is the one reported.
    pub fn abort(&self, why: &str) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.aborted.is_none() {
            st.aborted = Some((self.rank, why.to_string()));
        }
        self.shared.cv.notify_all();
    }

    /// Passes `r` through, stopping the group first when it is an error (an argument error of
    /// one rank would otherwise leave the others waiting for it).
    pub fn checked<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.abort(&e.to_string());
        }
        r
    }

    /// Waits until every rank has arrived; `publish` is stored as this rank's slot first.
    fn barrier(&self, publish: Option<(usize, usize)>) -> Result<()> {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((r, why)) = &st.aborted {
            return Err(aborted_err(*r, why));
        }
        if let Some(p) = publish {
            st.slots[self.rank] = p;
        }
        let gen = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            self.shared.cv.notify_all();
            return Ok(());
        }
        loop {
            st = self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            if st.generation != gen {
                return Ok(());
            }
            if let Some((r, why)) = &st.aborted {
                return Err(aborted_err(*r, why));
            }
        }
    }

    /// Every rank's published slot (after barrier 1).
    fn slots(&self) -> Vec<(usize, usize)> {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.slots.clone()
    }

    /// Runs one collective: publish `input`, then `body` reads every rank's input (as slices
    /// of `T`, by rank) once all have arrived, then a second barrier.
    fn collective<T: Copy, R>(
        &self,
        op: &str,
        input: &[T],
        body: impl FnOnce(&[&[T]]) -> R,
    ) -> Result<R> {
        self.barrier(Some((input.as_ptr() as usize, input.len())))?;
        let slots = self.slots();
        // SAFETY: every rank published a live slice of T and does not touch it until the second
        // barrier below (it is blocked in this function); the slices are only read here.
        let inputs: Vec<&[T]> = slots
            .iter()
            .map(|&(p, n)| unsafe { std::slice::from_raw_parts(p as *const T, n) })
            .collect();
        let lens_agree = inputs.iter().all(|s| s.len() == input.len());
        let out = if lens_agree {
            Some(body(&inputs))
        } else {
            None
        };
        drop(inputs);
        self.barrier(None)?;
        out.ok_or_else(|| {
            Error::Invalid(format!(
                "{op}: the ranks passed different lengths ({:?})",
                slots.iter().map(|s| s.1).collect::<Vec<_>>()
            ))
        })
    }

    /// Checks that every rank passed the same `key` (for example an op code and its sizes)
    /// before a device collective is queued: a disagreement, or a rank that stopped, is an error
    /// on every rank instead of a device collective that waits forever for a peer.
    pub fn agree(&self, what: &str, key: &[u64]) -> Result<()> {
        let keys = self.collective(what, key, |ins| {
            ins.iter().map(|k| k.to_vec()).collect::<Vec<_>>()
        })?;
        if keys.iter().any(|k| k != key) {
            return Err(Error::Invalid(format!(
                "{what}: the ranks disagree on the call (per rank: {keys:?})"
            )));
        }
        Ok(())
    }

    /// v = Σ_ranks v, in rank order (f64), on every rank.
    pub fn all_reduce_f64(&self, v: &mut [f64]) -> Result<()> {
        let sums = self.collective("all_reduce", v, |ins| {
            let mut acc = ins[0].to_vec();
            for x in &ins[1..] {
                for (a, b) in acc.iter_mut().zip(x.iter()) {
                    *a += *b;
                }
            }
            acc
        })?;
        v.copy_from_slice(&sums);
        Ok(())
    }

    /// acc[..n] += Σ_ranks send[rank*n .. (rank+1)*n], the rank's shard of the summed `send`
    /// (`send` holds world * n elements on every rank), summed in rank order in f32 and then
    /// added to `acc`. The caller checked the sizes (`backend::check::reduce_scatter`).
    pub(crate) fn reduce_scatter_add_f32(
        &self,
        send: &[f32],
        acc: &mut [f32],
        n: usize,
    ) -> Result<()> {
        let start = self.rank * n;
        let sums = self.collective("reduce_scatter", send, |ins| sum_range(ins, start, n))?;
        for (a, s) in acc[..n].iter_mut().zip(&sums) {
            *a += *s;
        }
        Ok(())
    }

    /// out[r*n .. (r+1)*n] = shard of rank r, for every rank r (`shard` holds n elements; the
    /// caller checked the sizes, `backend::check::all_gather`).
    pub(crate) fn all_gather_f32(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        let n = shard.len();
        self.collective("all_gather", shard, |ins| {
            for (r, s) in ins.iter().enumerate() {
                out[r * n..(r + 1) * n].copy_from_slice(s);
            }
        })
    }
}

impl HostRank {
    /// The concatenation of every rank's `v` in rank order (host values; every rank passes
    /// the same length).
    pub fn all_gather_host_f32(&self, v: &[f32]) -> Result<Vec<f32>> {
        self.collective("all_gather_host", v, |ins| ins.concat())
    }
}

/// Σ_r ins[r][start..start + n] in rank order.
fn sum_range(ins: &[&[f32]], start: usize, n: usize) -> Vec<f32> {
    let mut acc = ins[0][start..start + n].to_vec();
    for x in &ins[1..] {
        for (a, b) in acc.iter_mut().zip(&x[start..start + n]) {
            *a += *b;
        }
    }
    acc
}

impl Drop for HostRank {
    /// A rank that leaves stops the group, so that nobody waits for it forever (harmless once
    /// every rank has passed its last collective).
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort("its thread panicked");
        } else {
            self.abort("it left the group");
        }
    }
}
