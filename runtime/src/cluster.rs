//! Sharded execution: one artifact holding every rank's program, run with one process (or
//! thread) per rank.
//!
//! A cluster artifact's [`ExecPlan`](crate::ExecPlan) has no steps of its own; its
//! [`ExecPlan::cluster`](crate::ExecPlan::cluster) is a [`ClusterPlan`]: per rank, a list of
//! [`ClusterStep`]s over tensors named by *keys*. A [`ClusterStep::Compute`] step is a
//! complete nested CPU artifact (its bytes lie in the outer artifact's weights section) whose
//! input and output names are keys; communication steps move keys between ranks through a
//! [`Transport`]: MPI under `mpirun` (`crate::mpi_transport`, feature `mpi`), or threads and
//! channels in one process ([`run_threads`], for tests and single-machine runs).
//!
//! Rank 0 holds the graph inputs and receives the graph outputs. The steps of all ranks are
//! emitted by the compiler in one global order, so blocking point-to-point messages and
//! collectives cannot deadlock.

use crate::executor::{AlignedBuf, Model, Tensor, TensorView};
use crate::plan::DType;
use crate::Artifact;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// A slice `start..start + len` of one axis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AxisSlice {
    /// The axis.
    pub axis: usize,
    /// First index.
    pub start: usize,
    /// Number of entries.
    pub len: usize,
}

/// One step of a rank's program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterStep {
    /// Run a nested CPU artifact stored at `offset..offset + len` of the weights section;
    /// its inputs and outputs are named by key.
    Compute {
        /// Byte offset in the weights section (64-aligned).
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Send tensor `key` (or a slice of it) to rank `to`.
    Send {
        /// The key sent.
        key: String,
        /// The receiving rank.
        to: usize,
        /// Send only this slice.
        slice: Option<AxisSlice>,
    },
    /// Receive a tensor from rank `from` into `key`.
    Recv {
        /// The key written.
        key: String,
        /// The sending rank.
        from: usize,
        /// Element type.
        dtype: DType,
        /// Shape.
        shape: Vec<usize>,
    },
    /// Sum `key` over `group` into `out` on every rank of the group.
    AllReduce {
        /// This rank's partial sum.
        key: String,
        /// The key written.
        out: String,
        /// The ranks taking part.
        group: Vec<usize>,
    },
    /// Concatenate the shards `key` of `group` along `axis` (`sizes[i]` entries from rank
    /// `group[i]`) into `out` on every rank of the group.
    AllGather {
        /// This rank's shard.
        key: String,
        /// The key written.
        out: String,
        /// The axis.
        axis: usize,
        /// Entries per group rank.
        sizes: Vec<usize>,
        /// The ranks taking part.
        group: Vec<usize>,
    },
}

/// The program of one rank.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankPlan {
    /// Keys of the graph inputs (rank 0: one per input; other ranks: none).
    pub inputs: Vec<String>,
    /// The steps.
    pub steps: Vec<ClusterStep>,
    /// Keys of the graph outputs after the last step (rank 0 only).
    pub outputs: Vec<String>,
}

/// Every rank's program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPlan {
    /// Number of ranks (processes) the artifact runs on.
    pub world: usize,
    /// One program per rank.
    pub ranks: Vec<RankPlan>,
    /// Every rank runs its program this many times per call; rank 0 feeds consecutive
    /// slices of axis 0 of the inputs and concatenates the outputs along axis 0.
    #[serde(default = "one")]
    pub micro_batches: usize,
}

fn one() -> usize {
    1
}

impl ClusterPlan {
    /// Checks ranks, groups and nested-artifact ranges against a `blob_len`-byte weights
    /// section.
    pub fn validate(&self, blob_len: u64) -> Result<(), String> {
        if self.micro_batches == 0 {
            return Err("cluster: micro_batches must be at least 1".into());
        }
        if self.world == 0 || self.ranks.len() != self.world {
            return Err(format!(
                "cluster: {} rank programs for a world of {}",
                self.ranks.len(),
                self.world
            ));
        }
        for (r, p) in self.ranks.iter().enumerate() {
            if r != 0 && (!p.inputs.is_empty() || !p.outputs.is_empty()) {
                return Err(format!("cluster: rank {r} holds graph inputs or outputs"));
            }
            for (i, s) in p.steps.iter().enumerate() {
                let bad = |m: String| format!("cluster: rank {r} step {i}: {m}");
                match s {
                    ClusterStep::Compute { offset, len } => {
                        if offset % crate::plan::ALIGNMENT as u64 != 0
                            || offset.checked_add(*len).is_none_or(|e| e > blob_len)
                        {
                            return Err(bad(format!(
                                "segment bytes {offset}..+{len} outside the {blob_len}-byte blob"
                            )));
                        }
                    }
                    ClusterStep::Send { to: peer, .. } | ClusterStep::Recv { from: peer, .. } => {
                        if *peer >= self.world || *peer == r {
                            return Err(bad(format!("peer rank {peer}")));
                        }
                    }
                    ClusterStep::AllReduce { group, .. } | ClusterStep::AllGather { group, .. } => {
                        if !group.contains(&r) || group.iter().any(|&g| g >= self.world) {
                            return Err(bad(format!("group {group:?}")));
                        }
                        if let ClusterStep::AllGather { sizes, .. } = s {
                            if sizes.len() != group.len() {
                                return Err(bad("one size per group rank needed".into()));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The distinct collective groups, in order of first use (rank 0's steps first): the
    /// same list on every rank, so communicators can be created collectively.
    pub fn groups(&self) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = Vec::new();
        for p in &self.ranks {
            for s in &p.steps {
                if let ClusterStep::AllReduce { group, .. } | ClusterStep::AllGather { group, .. } =
                    s
                {
                    if !out.contains(group) {
                        out.push(group.clone());
                    }
                }
            }
        }
        out
    }
}

/// Moves bytes between ranks. Collectives have default implementations over
/// point-to-point messages; MPI overrides them with its own.
pub trait Transport {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Sends `data` to rank `to`.
    fn send(&mut self, to: usize, data: &[u8]) -> Result<(), String>;
    /// Receives exactly `buf.len()` bytes from rank `from`.
    fn recv(&mut self, from: usize, buf: &mut [u8]) -> Result<(), String>;
    /// Sums `data` (elements of `dtype`) over the ranks of `group` (index `gi` in
    /// [`ClusterPlan::groups`]), leaving the sum in `data` on every member.
    fn all_reduce_sum(
        &mut self,
        group: &[usize],
        _gi: usize,
        dtype: DType,
        data: &mut [u8],
    ) -> Result<(), String> {
        let me = self.rank();
        let leader = group[0];
        if me == leader {
            let mut other = vec![0u8; data.len()];
            for &r in &group[1..] {
                self.recv(r, &mut other)?;
                add_into(dtype, data, &other)?;
            }
            for &r in &group[1..] {
                self.send(r, data)?;
            }
        } else {
            self.send(leader, data)?;
            self.recv(leader, data)?;
        }
        Ok(())
    }
    /// Concatenates the members' `mine` (member `i` holding `counts[i]` bytes) into `out`
    /// in group order, on every member.
    fn all_gather(
        &mut self,
        group: &[usize],
        _gi: usize,
        mine: &[u8],
        out: &mut [u8],
        counts: &[usize],
    ) -> Result<(), String> {
        let me = self.rank();
        for &r in group {
            if r != me {
                self.send(r, mine)?;
            }
        }
        let mut at = 0;
        for (&r, &c) in group.iter().zip(counts) {
            if r == me {
                out[at..at + c].copy_from_slice(mine);
            } else {
                self.recv(r, &mut out[at..at + c])?;
            }
            at += c;
        }
        Ok(())
    }
}

/// Polls `done` until it returns `true` or `timeout` has passed (`Ok(false)`): the first
/// 2000 polls yield the core, later ones sleep 50 µs (which matters when ranks
/// oversubscribe the cores). How the MPI and NCCL transports wait without blocking forever.
pub fn poll_until(
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool, String>,
) -> Result<bool, String> {
    let t0 = std::time::Instant::now();
    let mut polls = 0u32;
    loop {
        if done()? {
            return Ok(true);
        }
        if t0.elapsed() > timeout {
            return Ok(false);
        }
        polls += 1;
        if polls < 2000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// `acc += other` elementwise for a summable dtype.
pub fn add_into(dtype: DType, acc: &mut [u8], other: &[u8]) -> Result<(), String> {
    macro_rules! add {
        ($t:ty) => {{
            let n = std::mem::size_of::<$t>();
            for (a, b) in acc.chunks_exact_mut(n).zip(other.chunks_exact(n)) {
                let s = <$t>::from_ne_bytes(a.try_into().unwrap())
                    + <$t>::from_ne_bytes(b.try_into().unwrap());
                a.copy_from_slice(&s.to_ne_bytes());
            }
        }};
    }
    match dtype {
        DType::F32 => add!(f32),
        DType::F64 => add!(f64),
        DType::I32 => add!(i32),
        DType::I64 => add!(i64),
        d => return Err(format!("all-reduce of {d} tensors is not supported")),
    }
    Ok(())
}

/// `(outer, axis length, inner bytes)` of a shape split at `axis`.
fn split_dims(shape: &[usize], axis: usize, elem: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product::<usize>() * elem;
    (outer, shape[axis], inner)
}

/// Bytes of `t[.., start..start + len, ..]` along `s.axis`.
fn slice_bytes(t: &Tensor, s: &AxisSlice) -> Result<Vec<u8>, String> {
    if s.axis >= t.shape.len() || s.start + s.len > t.shape[s.axis] {
        return Err(format!("slice {s:?} outside shape {:?}", t.shape));
    }
    let (outer, n, inner) = split_dims(&t.shape, s.axis, t.dtype.size_of());
    let data = t.data.as_slice();
    let mut out = Vec::with_capacity(outer * s.len * inner);
    for o in 0..outer {
        let at = (o * n + s.start) * inner;
        out.extend_from_slice(&data[at..at + s.len * inner]);
    }
    Ok(out)
}

/// `(GPU segments, all compute segments)` over every rank of a cluster artifact (reads
/// the nested artifacts' plans; the same answer on every rank).
pub fn segment_counts(artifact: &Artifact) -> Result<(usize, usize), String> {
    let Some(cp) = &artifact.plan.cluster else {
        return Ok((0, 0));
    };
    let (mut gpu, mut all) = (0, 0);
    for (r, p) in cp.ranks.iter().enumerate() {
        for (i, s) in p.steps.iter().enumerate() {
            if let ClusterStep::Compute { offset, len } = s {
                let bytes = offset
                    .checked_add(*len)
                    .and_then(|e| artifact.weights.get(*offset as usize..e as usize))
                    .ok_or_else(|| format!("rank {r} segment {i}: bytes outside the blob"))?;
                let name = format!("rank {r} segment {i}");
                let art = Artifact::from_bytes(bytes, &name).map_err(|e| e.to_string())?;
                all += 1;
                gpu += usize::from(art.plan.gpu.is_some());
            }
        }
    }
    Ok((gpu, all))
}

/// A loaded rank program: nested models instantiated once, reused across runs.
pub struct ClusterModel {
    rank: usize,
    world: usize,
    micro_batches: usize,
    groups: Vec<Vec<usize>>,
    plan: RankPlan,
    /// One model per step (`None` for communication steps).
    models: Vec<Option<Segment>>,
    /// Time of the last run spent in communication steps.
    comm: Duration,
    /// Test hook: `KILN_TEST_DIE_RANK=<this rank>` makes the process exit with status 3
    /// halfway through its first run (failure-handling tests).
    die_at: Option<usize>,
}

/// A compute segment of a rank: on the CPU executor, or on a GPU (feature `cuda`) when its
/// nested artifact was compiled for one (`kiln compile --cluster` with GPU devices, or
/// `--target cuda:SKU`): rank `r` runs on GPU `r mod <GPUs visible>`, tensors move through
/// host memory between steps (the collectives are the transport's, e.g. MPI; no NCCL).
enum Segment {
    Cpu(Box<Model>),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda_model::CudaModel>),
}

impl Segment {
    fn load(art: Artifact, rank: usize, name: &str) -> Result<Segment, String> {
        if art.plan.gpu.is_none() {
            return Model::from_artifact(art, name)
                .map(|m| Segment::Cpu(Box::new(m)))
                .map_err(|e| e.to_string());
        }
        #[cfg(feature = "cuda")]
        {
            crate::cuda_model::CudaModel::load_on(&art, crate::cuda::rank_device(rank), false)
                .map(|m| Segment::Cuda(Box::new(m)))
                .map_err(|e| format!("{name}: {e}"))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = rank;
            Err(format!(
                "{name}: compiled for a GPU, but this runtime was built without CUDA (feature `cuda`)"
            ))
        }
    }

    fn plan(&self) -> &crate::plan::ExecPlan {
        match self {
            Segment::Cpu(m) => m.plan(),
            #[cfg(feature = "cuda")]
            Segment::Cuda(m) => m.plan(),
        }
    }

    fn run(&mut self, ins: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        match self {
            Segment::Cpu(m) => {
                let views: Vec<TensorView> = ins.iter().map(|t| t.view()).collect();
                m.run(&views).map_err(|e| e.to_string())
            }
            #[cfg(feature = "cuda")]
            Segment::Cuda(m) => {
                let bytes: Vec<&[u8]> = ins.iter().map(|t| t.data.as_slice()).collect();
                let outs = m.run(&bytes).map_err(|e| e.to_string())?;
                let specs = m.plan().outputs.clone();
                specs
                    .iter()
                    .zip(outs)
                    .map(|(io, b)| {
                        let shape: Vec<usize> = io
                            .shape
                            .iter()
                            .map(|d| match d {
                                crate::plan::DimSpec::Fixed(v) => Ok(*v as usize),
                                _ => Err(format!("output '{}' has a symbolic shape", io.name)),
                            })
                            .collect::<Result<_, _>>()?;
                        let mut t = Tensor::zeroed(io.dtype, shape);
                        if t.data.as_slice().len() != b.len() {
                            return Err(format!("output '{}': {} bytes", io.name, b.len()));
                        }
                        t.data.as_mut_slice().copy_from_slice(&b);
                        Ok(t)
                    })
                    .collect()
            }
        }
    }
}

impl ClusterModel {
    /// Prepares rank `rank`'s program of a cluster artifact; `origin` names it in errors.
    pub fn new(artifact: &Artifact, rank: usize, origin: &str) -> Result<Self, String> {
        let cp = artifact.plan.cluster.as_ref().ok_or_else(|| {
            format!("{origin}: not a cluster artifact (compile with --cluster or --ranks)")
        })?;
        cp.validate(artifact.weights.len() as u64)
            .map_err(|e| format!("{origin}: {e}"))?;
        let plan = cp
            .ranks
            .get(rank)
            .ok_or_else(|| format!("{origin}: rank {rank} ≥ world {}", cp.world))?
            .clone();
        let mut models = Vec::new();
        for (i, s) in plan.steps.iter().enumerate() {
            models.push(match s {
                ClusterStep::Compute { offset, len } => {
                    let name = format!("{origin} (rank {rank} segment {i})");
                    let bytes = &artifact.weights[*offset as usize..(*offset + *len) as usize];
                    let art = Artifact::from_bytes(bytes, &name).map_err(|e| e.to_string())?;
                    Some(Segment::load(art, rank, &name)?)
                }
                _ => None,
            });
        }
        Ok(Self {
            rank,
            world: cp.world,
            micro_batches: cp.micro_batches,
            groups: cp.groups(),
            plan,
            die_at: std::env::var("KILN_TEST_DIE_RANK")
                .ok()
                .filter(|v| v.parse::<usize>() == Ok(rank))
                .map(|_| models.len() / 2),
            models,
            comm: Duration::ZERO,
        })
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Time the last run spent in communication steps (waiting included).
    pub fn comm_time(&self) -> Duration {
        self.comm
    }

    /// The collective groups of the artifact ([`ClusterPlan::groups`]).
    pub fn groups(&self) -> &[Vec<usize>] {
        &self.groups
    }

    /// Number of compute segments of this rank.
    pub fn segments(&self) -> usize {
        self.models.iter().flatten().count()
    }

    /// Runs the program: rank 0 passes the graph inputs and gets the outputs; other ranks
    /// pass and get nothing. Errors name the rank and step.
    pub fn run(
        &mut self,
        t: &mut dyn Transport,
        inputs: &[TensorView<'_>],
    ) -> Result<Vec<Tensor>, String> {
        let m = self.micro_batches;
        if m == 1 {
            return self.run_once(t, inputs);
        }
        let mut comm = Duration::ZERO;
        let mut outs: Vec<Tensor> = Vec::new();
        for k in 0..m {
            // axis-0 slices are contiguous bytes
            let mut shapes = Vec::new();
            for v in inputs {
                let b = v.shape.first().copied().unwrap_or(0);
                if b % m != 0 {
                    return Err(format!(
                        "rank {}: batch {b} does not split into {m} micro-batches",
                        self.rank
                    ));
                }
                let mut sh = v.shape.to_vec();
                sh[0] = b / m;
                shapes.push(sh);
            }
            let views: Vec<TensorView> = inputs
                .iter()
                .zip(&shapes)
                .map(|(v, sh)| {
                    let n = v.data.len() / m;
                    TensorView::new(v.dtype, sh, &v.data[k * n..(k + 1) * n])
                })
                .collect();
            let part = self.run_once(t, &views)?;
            comm += self.comm;
            if k == 0 {
                outs = part;
            } else {
                for (o, p) in outs.iter_mut().zip(part) {
                    let mut data = o.data.as_slice().to_vec();
                    data.extend_from_slice(p.data.as_slice());
                    o.shape[0] += p.shape[0];
                    o.data = AlignedBuf::from_bytes(&data);
                }
            }
        }
        self.comm = comm;
        Ok(outs)
    }

    fn run_once(
        &mut self,
        t: &mut dyn Transport,
        inputs: &[TensorView<'_>],
    ) -> Result<Vec<Tensor>, String> {
        let r = self.rank;
        if inputs.len() != self.plan.inputs.len() {
            return Err(format!(
                "rank {r}: {} inputs given, the program takes {}",
                inputs.len(),
                self.plan.inputs.len()
            ));
        }
        let mut env: HashMap<String, Tensor> = HashMap::new();
        for (k, v) in self.plan.inputs.iter().zip(inputs) {
            env.insert(
                k.clone(),
                Tensor {
                    dtype: v.dtype,
                    shape: v.shape.to_vec(),
                    data: AlignedBuf::from_bytes(v.data),
                },
            );
        }
        self.comm = Duration::ZERO;
        for (i, step) in self.plan.steps.iter().enumerate() {
            if self.die_at == Some(i) {
                eprintln!("kiln: rank {r}: KILN_TEST_DIE_RANK: exiting with status 3 at step {i}");
                std::process::exit(3);
            }
            let err = |m: String| format!("rank {r} step {i}: {m}");
            let get = |env: &HashMap<String, Tensor>, k: &str| -> Result<Tensor, String> {
                env.get(k)
                    .cloned()
                    .ok_or_else(|| err(format!("no tensor '{k}'")))
            };
            let t0 = std::time::Instant::now();
            match step {
                ClusterStep::Compute { .. } => {
                    let m = self.models[i].as_mut().expect("compute step has a model");
                    let names: Vec<String> =
                        m.plan().inputs.iter().map(|io| io.name.clone()).collect();
                    let outs: Vec<String> =
                        m.plan().outputs.iter().map(|io| io.name.clone()).collect();
                    let ins = names
                        .iter()
                        .map(|n| env.get(n).ok_or_else(|| err(format!("no tensor '{n}'"))))
                        .collect::<Result<Vec<_>, _>>()?;
                    let res = m.run(&ins).map_err(err)?;
                    for (n, t) in outs.into_iter().zip(res) {
                        env.insert(n, t);
                    }
                    continue;
                }
                ClusterStep::Send { key, to, slice } => {
                    let x = get(&env, key)?;
                    match slice {
                        Some(s) => t.send(*to, &slice_bytes(&x, s).map_err(err)?),
                        None => t.send(*to, x.data.as_slice()),
                    }
                    .map_err(err)?;
                }
                ClusterStep::Recv {
                    key,
                    from,
                    dtype,
                    shape,
                } => {
                    let mut x = Tensor::zeroed(*dtype, shape.clone());
                    t.recv(*from, x.data.as_mut_slice()).map_err(err)?;
                    env.insert(key.clone(), x);
                }
                ClusterStep::AllReduce { key, out, group } => {
                    let mut x = get(&env, key)?;
                    let gi = self.group_index(group);
                    t.all_reduce_sum(group, gi, x.dtype, x.data.as_mut_slice())
                        .map_err(err)?;
                    env.insert(out.clone(), x);
                }
                ClusterStep::AllGather {
                    key,
                    out,
                    axis,
                    sizes,
                    group,
                } => {
                    let x = get(&env, key)?;
                    let gi = self.group_index(group);
                    let me = group.iter().position(|&g| g == r).unwrap();
                    if x.shape.get(*axis) != Some(&sizes[me]) {
                        return Err(err(format!(
                            "all-gather '{key}': local shape {:?} has not {} entries on axis {axis}",
                            x.shape, sizes[me]
                        )));
                    }
                    let es = x.dtype.size_of();
                    let (outer, _, inner) = split_dims(&x.shape, *axis, es);
                    let counts: Vec<usize> = sizes.iter().map(|s| outer * s * inner).collect();
                    let mut all = vec![0u8; counts.iter().sum()];
                    t.all_gather(group, gi, x.data.as_slice(), &mut all, &counts)
                        .map_err(err)?;
                    let mut shape = x.shape.clone();
                    shape[*axis] = sizes.iter().sum();
                    let mut y = Tensor::zeroed(x.dtype, shape);
                    // rank-major parts → interleave along `axis`
                    let dst = y.data.as_mut_slice();
                    let total: usize = sizes.iter().sum();
                    let mut part_at = 0;
                    let mut col = 0;
                    for &s in sizes {
                        for o in 0..outer {
                            let src = &all[part_at + o * s * inner..part_at + (o + 1) * s * inner];
                            let d = (o * total + col) * inner;
                            dst[d..d + s * inner].copy_from_slice(src);
                        }
                        part_at += outer * s * inner;
                        col += s;
                    }
                    env.insert(out.clone(), y);
                }
            }
            self.comm += t0.elapsed();
        }
        self.plan
            .outputs
            .iter()
            .map(|k| {
                env.remove(k)
                    .ok_or_else(|| format!("rank {r}: output '{k}' was never produced"))
            })
            .collect()
    }

    fn group_index(&self, group: &[usize]) -> usize {
        self.groups.iter().position(|g| g == group).unwrap_or(0)
    }
}

/// A [`Transport`] between threads of one process (channels).
pub struct ThreadTransport {
    rank: usize,
    size: usize,
    to: Vec<std::sync::mpsc::Sender<Vec<u8>>>,
    from: Vec<std::sync::mpsc::Receiver<Vec<u8>>>,
    timeout: Duration,
}

impl ThreadTransport {
    /// One transport per rank of a world of `n`, fully connected; a receive waiting longer
    /// than `timeout` fails (a peer died or hangs).
    pub fn world(n: usize, timeout: Duration) -> Vec<ThreadTransport> {
        // chan[a][b]: a → b
        let mut senders: Vec<Vec<Option<std::sync::mpsc::Sender<Vec<u8>>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut receivers: Vec<Vec<Option<std::sync::mpsc::Receiver<Vec<u8>>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for (a, row) in senders.iter_mut().enumerate() {
            for (b, s) in row.iter_mut().enumerate() {
                let (tx, rx) = std::sync::mpsc::channel();
                *s = Some(tx);
                receivers[b][a] = Some(rx);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(r, (s, rx))| ThreadTransport {
                rank: r,
                size: n,
                to: s.into_iter().map(Option::unwrap).collect(),
                from: rx.into_iter().map(Option::unwrap).collect(),
                timeout,
            })
            .collect()
    }
}

impl Transport for ThreadTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn send(&mut self, to: usize, data: &[u8]) -> Result<(), String> {
        self.to[to]
            .send(data.to_vec())
            .map_err(|_| format!("rank {to} has exited"))
    }
    fn recv(&mut self, from: usize, buf: &mut [u8]) -> Result<(), String> {
        let m = self.from[from].recv_timeout(self.timeout).map_err(|e| {
            format!(
                "no message from rank {from} within {:?} ({e}): it died or hangs",
                self.timeout
            )
        })?;
        if m.len() != buf.len() {
            return Err(format!(
                "message from rank {from} has {} bytes, expected {}",
                m.len(),
                buf.len()
            ));
        }
        buf.copy_from_slice(&m);
        Ok(())
    }
}

/// Runs a cluster artifact with one thread per rank in this process; returns rank 0's
/// outputs. (Without MPI: tests, and `kiln run` outside `mpirun`.) With feature `nccl`,
/// ranks whose segments all run on GPUs exchange tensors through NCCL when
/// [`nccl_transport::wanted`](crate::nccl_transport::wanted) says so.
pub fn run_threads(
    artifact: &Artifact,
    origin: &str,
    inputs: &[TensorView<'_>],
) -> Result<Vec<Tensor>, String> {
    let cp = artifact
        .plan
        .cluster
        .as_ref()
        .ok_or_else(|| format!("{origin}: not a cluster artifact"))?;
    let timeout = Duration::from_secs(120);
    #[cfg(feature = "nccl")]
    let nccl = crate::nccl_transport::wanted(artifact, cp.world)?;
    let transports = ThreadTransport::world(cp.world, timeout);
    let owned: Vec<(DType, Vec<usize>, Vec<u8>)> = inputs
        .iter()
        .map(|v| (v.dtype, v.shape.to_vec(), v.data.to_vec()))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = transports
            .into_iter()
            .map(|mut tr| {
                let owned = &owned;
                s.spawn(move || {
                    let res = (|| -> Result<Vec<Tensor>, String> {
                        let r = tr.rank();
                        let mut m = ClusterModel::new(artifact, r, origin)?;
                        let bufs: Vec<AlignedBuf> = owned
                            .iter()
                            .map(|(_, _, d)| AlignedBuf::from_bytes(d))
                            .collect();
                        let views: Vec<TensorView> = if r == 0 {
                            owned
                                .iter()
                                .zip(&bufs)
                                .map(|((d, sh, _), b)| TensorView::new(*d, sh, b.as_slice()))
                                .collect()
                        } else {
                            Vec::new()
                        };
                        #[cfg(feature = "nccl")]
                        if nccl {
                            let dev = crate::cuda::rank_device(r);
                            let mut t = crate::nccl_transport::NcclTransport::new(
                                &mut tr,
                                m.groups(),
                                dev,
                                timeout,
                            )
                            .map_err(|e| format!("rank {r}: {e}"))?;
                            return m.run(&mut t, &views);
                        }
                        m.run(&mut tr, &views)
                    })();
                    // a failing rank drops its channels: peers waiting on it fail next
                    (res, std::time::Instant::now())
                })
            })
            .collect();
        let mut results: Vec<(Result<Vec<Tensor>, String>, std::time::Instant)> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (Err("a rank panicked".into()), std::time::Instant::now()))
            })
            .collect();
        // the earliest failure is the cause; the others are its consequences
        if let Some((e, _)) = results
            .iter()
            .filter_map(|(r, t)| r.as_ref().err().map(|e| (e, t)))
            .min_by_key(|(_, t)| **t)
        {
            return Err(e.clone());
        }
        results.remove(0).0
    })
}
