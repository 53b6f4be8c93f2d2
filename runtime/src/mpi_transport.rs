//! The MPI [`Transport`] (feature `mpi`): rank and size from `MPI_COMM_WORLD`, messages as
//! byte buffers, all-reduce (sum) and all-gather with unequal sizes (`MPI_Iallgatherv`) on
//! one communicator per collective group (split from the world at load, in the order of
//! [`ClusterPlan::groups`](crate::cluster::ClusterPlan::groups), ranked by group position).
//!
//! Failure handling: every operation is non-blocking and polled against a deadline
//! (`KILN_MPI_TIMEOUT` seconds, default 300). A rank that fails reports its error and calls
//! `MPI_Abort`, which makes `mpirun` terminate every rank; a rank that waits past the
//! deadline (its peer died without the launcher noticing, or hangs) reports what it waited
//! for and aborts the job the same way, so no rank hangs.

use crate::cluster::{add_into, poll_until, Transport};
use crate::plan::DType;
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::request::{Request, Scope};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;
use std::time::Duration;

/// Exit code of a job aborted by Kiln.
pub const ABORT_CODE: i32 = 70;

/// MPI for one process; dropping it finalizes MPI.
pub struct MpiTransport {
    /// One communicator per group (`None`: this rank is not a member); freed before MPI is
    /// finalized (fields drop in order).
    comms: Vec<Option<SimpleCommunicator>>,
    world: SimpleCommunicator,
    timeout: Duration,
    _universe: mpi::environment::Universe,
}

impl MpiTransport {
    /// Initializes MPI (`None` if it was already initialized).
    pub fn init() -> Option<Self> {
        let universe = mpi::initialize()?;
        let world = universe.world();
        let timeout = std::env::var("KILN_MPI_TIMEOUT")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .map_or(Duration::from_secs(300), Duration::from_secs_f64);
        Some(Self {
            _universe: universe,
            world,
            comms: Vec::new(),
            timeout,
        })
    }

    /// Creates the communicators of `groups` (collective over the world: every rank must
    /// call it with the same list).
    pub fn create_groups(&mut self, groups: &[Vec<usize>]) {
        self.comms = groups
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                let me = self.world.rank() as usize;
                match g.iter().position(|&r| r == me) {
                    Some(pos) => self
                        .world
                        .split_by_color_with_key(Color::with_value(gi as i32), pos as i32),
                    None => {
                        self.world.split_by_color(Color::undefined());
                        None
                    }
                }
            })
            .collect();
    }

    /// Prints `msg` and aborts the whole job (every rank exits).
    pub fn abort(&self, msg: &str) -> ! {
        eprintln!(
            "kiln: rank {}: {msg}; aborting all ranks",
            self.world.rank()
        );
        self.world.abort(ABORT_CODE)
    }

    /// Waits for `req`, aborting the job after the timeout.
    fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, req: Request<'a, D, S>, what: &dyn Fn() -> String) {
        let mut pending = Some(req);
        let done = poll_until(self.timeout, || {
            let r = pending.take().expect("a pending request");
            Ok(match r.test() {
                Ok(_) => true,
                Err(r) => {
                    pending = Some(r);
                    false
                }
            })
        });
        if done != Ok(true) {
            self.abort(&format!(
                "{} did not complete within {:.0} s (a rank died or hangs)",
                what(),
                self.timeout.as_secs_f64()
            ));
        }
    }

    fn comm(&self, gi: usize, group: &[usize]) -> Result<&SimpleCommunicator, String> {
        self.comms
            .get(gi)
            .and_then(|c| c.as_ref())
            .ok_or_else(|| format!("no communicator for group {group:?}"))
    }
}

impl Transport for MpiTransport {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn send(&mut self, to: usize, data: &[u8]) -> Result<(), String> {
        let p = self.world.process_at_rank(to as i32);
        mpi::request::scope(|sc| {
            let req = p.immediate_send(sc, data);
            self.wait(req, &|| {
                format!("send of {} bytes to rank {to}", data.len())
            });
        });
        Ok(())
    }
    fn recv(&mut self, from: usize, buf: &mut [u8]) -> Result<(), String> {
        let p = self.world.process_at_rank(from as i32);
        let n = buf.len();
        mpi::request::scope(|sc| {
            let req = p.immediate_receive_into(sc, buf);
            self.wait(req, &|| format!("receive of {n} bytes from rank {from}"));
        });
        Ok(())
    }
    fn all_reduce_sum(
        &mut self,
        group: &[usize],
        gi: usize,
        dtype: DType,
        data: &mut [u8],
    ) -> Result<(), String> {
        let comm = self.comm(gi, group)?;
        let w = format!("all-reduce of {} bytes over ranks {group:?}", data.len());
        macro_rules! reduce {
            ($t:ty) => {{
                let n = data.len() / std::mem::size_of::<$t>();
                // SAFETY: tensor buffers are 64-byte aligned and hold `n` elements.
                let send: Vec<$t> =
                    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<$t>(), n) }.to_vec();
                let recv: &mut [$t] =
                    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<$t>(), n) };
                mpi::request::scope(|sc| {
                    let req =
                        comm.immediate_all_reduce_into(sc, &send[..], recv, SystemOperation::sum());
                    self.wait(req, &|| w.clone());
                });
            }};
        }
        match dtype {
            DType::F32 => reduce!(f32),
            DType::F64 => reduce!(f64),
            DType::I32 => reduce!(i32),
            DType::I64 => reduce!(i64),
            d => {
                // check the dtype is summable at all, for the error message
                add_into(d, &mut [], &[])?;
            }
        }
        Ok(())
    }
    fn all_gather(
        &mut self,
        group: &[usize],
        gi: usize,
        mine: &[u8],
        out: &mut [u8],
        counts: &[usize],
    ) -> Result<(), String> {
        let comm = self.comm(gi, group)?;
        let c: Vec<Count> = counts.iter().map(|&x| x as Count).collect();
        let displs: Vec<Count> = c
            .iter()
            .scan(0, |acc, &x| {
                let d = *acc;
                *acc += x;
                Some(d)
            })
            .collect();
        let w = format!("all-gather of {} bytes over ranks {group:?}", out.len());
        let mut part = PartitionMut::new(out, c, &displs[..]);
        mpi::request::scope(|sc| {
            let req = comm.immediate_all_gather_varcount_into(sc, mine, &mut part);
            self.wait(req, &|| w.clone());
        });
        Ok(())
    }
}
