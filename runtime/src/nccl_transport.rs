//! The NCCL [`Transport`] (feature `nccl`): the messages and collectives of a sharded
//! artifact whose ranks run on GPUs go GPU to GPU through NCCL (`cudarc::nccl`, loaded at
//! run time), over NVLink/PCIe/InfiniBand as NCCL finds them.
//!
//! Bootstrap: another transport (MPI under `mpirun`, channels between threads) carries the
//! `ncclUniqueId`s. Rank 0 creates the world communicator's id and sends it to every rank;
//! then, for each collective group of [`ClusterPlan::groups`](crate::cluster::ClusterPlan::groups)
//! (the same list on every rank), the group's first rank creates an id and sends it to the
//! other members, and each member joins with its position in the group as NCCL rank (so
//! NCCL's all-gather order is the group order). Communicator creation is collective over
//! its members, and every rank creates them in the same order, so it cannot deadlock. A
//! group that is the whole world in rank order reuses the world communicator.
//!
//! Data path: the executor's tensors live in host memory between steps, so each operation
//! copies the bytes to the rank's GPU, runs the NCCL call on the transport's stream, waits
//! for it and copies the result back. All-reduce sums f32, f64, i32 and i64 tensors;
//! all-gather with unequal shard sizes pads every shard to the largest (NCCL gathers equal
//! counts) and compacts on the way back; point-to-point messages use `ncclSend`/`ncclRecv` on
//! the world communicator.
//!
//! Failure handling: a rank waits for an NCCL operation at most `timeout` (polling an event,
//! never blocking in the driver); past it the operation fails with an error naming it, and
//! dropping the transport aborts its communicators, so a dead or hung peer gives an error,
//! not a hang. NCCL refuses two ranks of one communicator on the same GPU ("duplicate
//! GPU"); [`NcclTransport::new`] then fails and the caller can fall back to its bootstrap
//! transport.

use crate::cluster::{add_into, poll_until, Transport};
use crate::plan::DType;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use std::sync::Arc;
use std::time::Duration;

/// Why NCCL cannot be used here (`Ok` when `libnccl.so` loads and a GPU is present).
pub fn available() -> Result<(), String> {
    // SAFETY: only tries to open the library with `libloading`.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err("no NCCL library (libnccl.so.2) on the library path".into());
    }
    if crate::cuda::device_count() == 0 {
        return Err("no CUDA device".into());
    }
    Ok(())
}

/// Whether the ranks of `artifact` should move tensors through NCCL. `KILN_NCCL=0`: never;
/// `KILN_NCCL=1`: always (an error says why it cannot); unset: when every compute segment
/// of every rank is a GPU plan, NCCL loads, and this node has a GPU for each of its
/// `local_ranks` ranks (NCCL refuses two ranks of one communicator on one GPU). Every rank
/// of a node gets the same answer.
pub fn wanted(artifact: &crate::Artifact, local_ranks: usize) -> Result<bool, String> {
    let forced = match std::env::var("KILN_NCCL").ok().as_deref() {
        Some("0") => return Ok(false),
        Some("1") => true,
        Some(v) => return Err(format!("KILN_NCCL={v}: use 0 or 1")),
        None => false,
    };
    let why_not = (|| {
        available()?;
        let (gpu, all) = crate::cluster::segment_counts(artifact)?;
        if gpu == 0 || gpu < all {
            return Err(format!("{gpu} of the {all} compute segments run on a GPU"));
        }
        let n = crate::cuda::device_count();
        if n < local_ranks {
            return Err(format!(
                "{local_ranks} ranks on this node share {n} GPU(s) (NCCL needs one GPU per rank)"
            ));
        }
        Ok(())
    })();
    match why_not {
        Ok(()) => Ok(true),
        Err(e) if forced => Err(format!("KILN_NCCL=1, but NCCL cannot be used: {e}")),
        Err(_) => Ok(false),
    }
}

fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> String {
    format!("NCCL {what}: {:?}", e.0)
}

fn drv_err(what: &str, e: cudarc::driver::DriverError) -> String {
    format!("CUDA {what}: {e}")
}

/// A group's communicator.
enum GroupComm {
    /// This rank is not a member.
    NotMember,
    /// The group is the world in rank order.
    World,
    /// A communicator of its own.
    Own(Comm),
}

/// NCCL communicators of one rank, on GPU `device`.
pub struct NcclTransport {
    rank: usize,
    size: usize,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    world: Comm,
    groups: Vec<GroupComm>,
    timeout: Duration,
}

/// Sends an id from `from` to `members` (other than `from`) through `boot`, or receives it.
fn share_id(boot: &mut dyn Transport, leader: usize, members: &[usize]) -> Result<Id, String> {
    let me = boot.rank();
    if me == leader {
        let id = Id::new().map_err(|e| nccl_err("get unique id", e))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        for &r in members.iter().filter(|&&r| r != me) {
            boot.send(r, &bytes)?;
        }
        Ok(id)
    } else {
        let mut bytes = [0u8; 128];
        boot.recv(leader, &mut bytes)?;
        Ok(Id::uninit(bytes.map(|b| b as std::ffi::c_char)))
    }
}

impl NcclTransport {
    /// Creates the world communicator and one per group (collective: every rank of `boot`'s
    /// world calls it with the same `groups`), on GPU `device`; operations wait at most
    /// `timeout`.
    pub fn new(
        boot: &mut dyn Transport,
        groups: &[Vec<usize>],
        device: usize,
        timeout: Duration,
    ) -> Result<Self, String> {
        available()?;
        let (rank, size) = (boot.rank(), boot.size());
        let ctx = CudaContext::new(device).map_err(|e| drv_err("context", e))?;
        let stream = ctx.new_stream().map_err(|e| drv_err("stream", e))?;
        let all: Vec<usize> = (0..size).collect();
        let join = |id: Id, r: usize, n: usize| -> Result<Comm, String> {
            // NCCL takes the device from the thread's current context
            ctx.bind_to_thread().map_err(|e| drv_err("bind", e))?;
            Comm::from_rank(stream.clone(), r, n, id)
                .map_err(|e| nccl_err(&format!("init rank {r} of {n} on GPU {device}"), e))
        };
        let id = share_id(boot, 0, &all)?;
        let world = join(id, rank, size)?;
        let mut comms = Vec::with_capacity(groups.len());
        for g in groups {
            if g.is_empty() || g.iter().any(|&r| r >= size) {
                return Err(format!("NCCL: group {g:?} outside a world of {size}"));
            }
            comms.push(if *g == all {
                GroupComm::World
            } else if let Some(pos) = g.iter().position(|&r| r == rank) {
                let id = share_id(boot, g[0], g)?;
                GroupComm::Own(join(id, pos, g.len())?)
            } else {
                GroupComm::NotMember
            });
        }
        Ok(Self {
            rank,
            size,
            stream,
            ctx,
            world,
            groups: comms,
            timeout,
        })
    }

    fn group(&self, gi: usize, group: &[usize]) -> Result<&Comm, String> {
        match self.groups.get(gi) {
            Some(GroupComm::World) => Ok(&self.world),
            Some(GroupComm::Own(c)) => Ok(c),
            _ => Err(format!(
                "rank {}: no NCCL communicator for group {group:?}",
                self.rank
            )),
        }
    }

    /// Waits until the stream's work is done, at most the timeout.
    fn wait(&self, what: &dyn Fn() -> String) -> Result<(), String> {
        let ev = self
            .stream
            .record_event(None)
            .map_err(|e| drv_err("record event", e))?;
        let done = poll_until(self.timeout, || {
            ev.try_is_complete().map_err(|e| drv_err(&what(), e))
        })?;
        if done {
            Ok(())
        } else {
            Err(format!(
                "{} did not complete within {:.0} s (a rank died or hangs)",
                what(),
                self.timeout.as_secs_f64()
            ))
        }
    }

    fn upload(&self, data: &[u8]) -> Result<CudaSlice<u8>, String> {
        self.ctx.bind_to_thread().map_err(|e| drv_err("bind", e))?;
        self.stream
            .clone_htod(data)
            .map_err(|e| drv_err("host to device copy", e))
    }

    fn download(&self, d: &CudaSlice<u8>, out: &mut [u8]) -> Result<(), String> {
        self.stream
            .memcpy_dtoh(d, out)
            .map_err(|e| drv_err("device to host copy", e))?;
        self.stream
            .synchronize()
            .map_err(|e| drv_err("synchronize", e))
    }
}

impl Transport for NcclTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn send(&mut self, to: usize, data: &[u8]) -> Result<(), String> {
        if data.is_empty() {
            return Ok(());
        }
        let d = self.upload(data)?;
        self.world
            .send(&d, to as i32)
            .map_err(|e| nccl_err(&format!("send to rank {to}"), e))?;
        self.wait(&|| format!("NCCL send of {} bytes to rank {to}", data.len()))
    }
    fn recv(&mut self, from: usize, buf: &mut [u8]) -> Result<(), String> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self
            .stream
            .alloc_zeros::<u8>(buf.len())
            .map_err(|e| drv_err("alloc", e))?;
        self.world
            .recv(&mut d, from as i32)
            .map_err(|e| nccl_err(&format!("receive from rank {from}"), e))?;
        self.wait(&|| format!("NCCL receive of {} bytes from rank {from}", buf.len()))?;
        self.download(&d, buf)
    }
    fn all_reduce_sum(
        &mut self,
        group: &[usize],
        gi: usize,
        dtype: DType,
        data: &mut [u8],
    ) -> Result<(), String> {
        // check the dtype is summable at all, for the same error as the other transports
        add_into(dtype, &mut [], &[])?;
        if data.is_empty() {
            return Ok(());
        }
        let mut d = self.upload(data)?;
        let comm = self.group(gi, group)?;
        macro_rules! reduce {
            ($t:ty) => {{
                let n = data.len() / std::mem::size_of::<$t>();
                // SAFETY: a u8 device buffer reinterpreted as `n` elements of a plain
                // numeric type (device allocations are 256-byte aligned).
                let mut v = unsafe { d.transmute_mut::<$t>(n) }
                    .ok_or_else(|| format!("all-reduce: {} bytes", data.len()))?;
                comm.all_reduce_in_place(&mut v, &ReduceOp::Sum)
            }};
        }
        match dtype {
            DType::F32 => reduce!(f32),
            DType::F64 => reduce!(f64),
            DType::I32 => reduce!(i32),
            _ => reduce!(i64),
        }
        .map_err(|e| nccl_err(&format!("all-reduce over ranks {group:?}"), e))?;
        self.wait(&|| {
            format!(
                "NCCL all-reduce of {} bytes over ranks {group:?}",
                data.len()
            )
        })?;
        self.download(&d, data)
    }
    fn all_gather(
        &mut self,
        group: &[usize],
        gi: usize,
        mine: &[u8],
        out: &mut [u8],
        counts: &[usize],
    ) -> Result<(), String> {
        // NCCL gathers equal counts: pad every shard to the largest
        let max = counts.iter().copied().max().unwrap_or(0);
        if max == 0 {
            return Ok(());
        }
        let mut padded = mine.to_vec();
        padded.resize(max, 0);
        let d = self.upload(&padded)?;
        let mut all = self
            .stream
            .alloc_zeros::<u8>(max * counts.len())
            .map_err(|e| drv_err("alloc", e))?;
        self.group(gi, group)?
            .all_gather(&d, &mut all)
            .map_err(|e| nccl_err(&format!("all-gather over ranks {group:?}"), e))?;
        self.wait(&|| format!("NCCL all-gather over ranks {group:?}"))?;
        let mut host = vec![0u8; max * counts.len()];
        self.download(&all, &mut host)?;
        let mut at = 0;
        for (i, &c) in counts.iter().enumerate() {
            out[at..at + c].copy_from_slice(&host[i * max..i * max + c]);
            at += c;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_why_nccl_is_not_used() {
        if available().is_ok() {
            return; // a GPU machine with NCCL: tests/nccl.rs covers it
        }
        let e = available().unwrap_err();
        assert!(e.contains("NCCL") || e.contains("CUDA"), "{e}");
        // a CPU artifact never takes NCCL; KILN_NCCL is read per call, so the forced case
        // is checked through the error text of the policy's reasons
        let art = crate::Artifact {
            compiler_version: "test".into(),
            target: "cpu".into(),
            plan: crate::ExecPlan::default(),
            weights: Vec::new(),
            kernels: Vec::new(),
        };
        if std::env::var_os("KILN_NCCL").is_none() {
            assert_eq!(wanted(&art, 1), Ok(false));
        }
    }
}
