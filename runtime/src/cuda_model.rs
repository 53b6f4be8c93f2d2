//! Runs the GPU program of a `cuda:SKU` artifact ([`GpuPlan`]) with the CUDA driver.
//!
//! At load: the device's name and compute capability are checked against the plan's SKU
//! ([`GpuPlan::check_device`]; a mismatch is an error naming both unless allowed, then a
//! warning), the PTX module is loaded once (its JIT-compiled cubin cached on disk,
//! [`crate::cubin_cache`]) and every entry resolved, one device arena of
//! the memory plan's size is allocated, the weights are uploaded once, and device and
//! pinned host buffers are allocated for every input and output. Each launch's arguments
//! are resolved once to device addresses (a buffer is MLIR's memref descriptor
//! `(p, p, 0, len, 1)`).
//!
//! [`CudaModel::run`]: inputs are copied to pinned buffers and uploaded, the launches run in
//! order on one stream — the first run launches them directly and captures them into a
//! CUDA graph, later runs replay the graph — and the outputs come back through pinned
//! buffers.

use crate::artifact::Artifact;
use crate::cuda::{encode_tensor_map_2d, Elem16};
use crate::plan::{BufRef, DimSpec, ExecPlan, GpuArg, GpuPlan, IoSpec};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use std::sync::Arc;

/// An error loading or running a GPU artifact.
#[derive(Debug, thiserror::Error)]
pub enum CudaModelError {
    /// No driver or no device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// The artifact is not a GPU artifact, or its plan is inconsistent.
    #[error("GPU plan: {0}")]
    Plan(String),
    /// The GPU present is not the SKU the artifact was compiled for.
    #[error("{0}")]
    SkuMismatch(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// Inputs do not match the plan.
    #[error("inputs: {0}")]
    Inputs(String),
}

fn drv(e: cudarc::driver::DriverError) -> CudaModelError {
    CudaModelError::Driver(e.to_string())
}

/// One launch with its arguments resolved.
struct Launch {
    /// The entry and the partition kernel it belongs to (for error messages).
    label: String,
    func: CudaFunction,
    /// Per parameter: a device address (`u64`), an `i64`, or an `f32`.
    params: Vec<Param>,
    cfg: LaunchConfig,
}

#[derive(Clone, Copy)]
enum Param {
    U64(u64),
    I64(i64),
    F32(f32),
}

/// The device time of one launch ([`CudaModel::profile`]).
#[derive(Debug, Clone)]
pub struct LaunchTime {
    /// The entry and the partition kernel it belongs to: `entry (kernel label)`.
    pub label: String,
    /// Median over the profiled runs, microseconds.
    pub median_us: f64,
}

/// A Markdown table of a [`CudaModel::profile`]: launches grouped by entry (the kernel
/// function), the `top` costliest first — entry, launches, total and share of the summed
/// median times — then the sum.
pub fn profile_table(times: &[LaunchTime], top: usize) -> String {
    use std::fmt::Write as _;
    let mut by_entry: Vec<(String, usize, f64)> = Vec::new();
    for t in times {
        let entry = t.label.split(" (").next().unwrap_or(&t.label);
        match by_entry.iter_mut().find(|(e, _, _)| e == entry) {
            Some(row) => {
                row.1 += 1;
                row.2 += t.median_us;
            }
            None => by_entry.push((entry.to_string(), 1, t.median_us)),
        }
    }
    by_entry.sort_by(|a, b| b.2.total_cmp(&a.2));
    let total: f64 = times.iter().map(|t| t.median_us).sum();
    let mut out = String::from("| entry | launches | µs | share |\n|---|---|---|---|\n");
    for (e, n, us) in by_entry.iter().take(top) {
        let share = 100.0 * us / total.max(f64::MIN_POSITIVE);
        let _ = writeln!(out, "| {e} | {n} | {us:.1} | {share:.1}% |");
    }
    if by_entry.len() > top {
        let rest: f64 = by_entry[top..].iter().map(|r| r.2).sum();
        let _ = writeln!(
            out,
            "| ({} more entries) | | {rest:.1} | |",
            by_entry.len() - top
        );
    }
    let _ = writeln!(
        out,
        "| sum of {} launches | | {total:.1} | 100% |",
        times.len()
    );
    out
}

/// A loaded GPU artifact (see the module doc).
pub struct CudaModel {
    plan: ExecPlan,
    stream: Arc<CudaStream>,
    launches: Vec<Launch>,
    graph: Option<CudaGraph>,
    inputs: Vec<(CudaSlice<u8>, PinnedHostSlice<u8>)>,
    outputs: Vec<(CudaSlice<u8>, PinnedHostSlice<u8>)>,
    _arena: CudaSlice<u8>,
    _weights: CudaSlice<u8>,
    /// The TMA descriptors the launches point to.
    _tensor_maps: Vec<CudaSlice<u8>>,
    /// Warning printed at load (SKU mismatch allowed), if any.
    pub warning: Option<String>,
    /// Whether the module's cubin came from the cache ([`crate::cubin_cache`]).
    pub cubin: crate::cubin_cache::Source,
}

fn bytes_of(io: &IoSpec) -> Result<usize, CudaModelError> {
    let mut n = 1usize;
    for d in &io.shape {
        match d {
            DimSpec::Fixed(x) => n *= *x as usize,
            _ => {
                return Err(CudaModelError::Plan(format!(
                    "'{}' has a non-static shape",
                    io.name
                )))
            }
        }
    }
    io.dtype
        .bytes_for(n)
        .ok_or_else(|| CudaModelError::Plan(format!("'{}' is too large", io.name)))
}

impl CudaModel {
    /// Loads `artifact` on device 0 (see the module doc). `allow_sku_mismatch` turns a SKU
    /// mismatch into [`CudaModel::warning`].
    pub fn load(artifact: &Artifact, allow_sku_mismatch: bool) -> Result<Self, CudaModelError> {
        Self::load_on(artifact, 0, allow_sku_mismatch)
    }

    /// [`CudaModel::load`] on device `ordinal` (a rank of a sharded model takes its own).
    pub fn load_on(
        artifact: &Artifact,
        ordinal: usize,
        allow_sku_mismatch: bool,
    ) -> Result<Self, CudaModelError> {
        let plan = artifact.plan.clone();
        plan.validate(artifact.weights.len() as u64)
            .map_err(CudaModelError::Plan)?;
        let gp: GpuPlan = plan
            .gpu
            .clone()
            .ok_or_else(|| CudaModelError::Plan("the artifact has no GPU plan".into()))?;
        if crate::cuda::device_count() == 0 {
            return Err(CudaModelError::NoDevice(
                "no CUDA driver (libcuda) could be loaded or it reports no GPU".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        let name = ctx.name().map_err(drv)?;
        let (ma, mi) = ctx.compute_capability().map_err(drv)?;
        let arch = format!("sm_{ma}{mi}");
        let mut warning = None;
        if let Err(e) = gp.check_device(&name, &arch) {
            if !allow_sku_mismatch {
                return Err(CudaModelError::SkuMismatch(e));
            }
            warning = Some(format!("warning: {e}"));
        }
        let ptx = std::str::from_utf8(&artifact.kernels)
            .map_err(|_| CudaModelError::Plan("the kernel section is not PTX text".into()))?;
        let (module, cubin) = crate::cubin_cache::load(&ctx, ptx, &name, &arch).map_err(drv)?;
        let stream = ctx.new_stream().map_err(drv)?;
        let alloc = |n: usize| -> Result<CudaSlice<u8>, CudaModelError> {
            stream.alloc_zeros::<u8>(n.max(1)).map_err(drv)
        };
        let arena = alloc(plan.arena_bytes as usize)?;
        let weights = if artifact.weights.is_empty() {
            alloc(1)?
        } else {
            stream.clone_htod(&artifact.weights).map_err(drv)?
        };
        let pinned = |n: usize| -> Result<PinnedHostSlice<u8>, CudaModelError> {
            // SAFETY: the buffer is written before it is read (inputs by `run`, outputs by
            // the device-to-host copy).
            unsafe { ctx.alloc_pinned::<u8>(n.max(1)) }.map_err(drv)
        };
        let mut inputs = Vec::new();
        for io in &plan.inputs {
            let n = bytes_of(io)?;
            inputs.push((alloc(n)?, pinned(n)?));
        }
        let mut outputs = Vec::new();
        for io in &plan.outputs {
            let n = bytes_of(io)?;
            outputs.push((alloc(n)?, pinned(n)?));
        }
        let addr = |s: &CudaSlice<u8>| -> u64 {
            let (p, _sync) = s.device_ptr(&stream);
            p
        };
        let base = |b: &BufRef| -> Result<u64, CudaModelError> {
            Ok(match b {
                BufRef::Arena { offset, .. } => addr(&arena) + offset,
                BufRef::Weight { index } => {
                    let w = plan.weights.get(*index).ok_or_else(|| {
                        CudaModelError::Plan(format!("weight {index} out of range"))
                    })?;
                    addr(&weights) + w.offset
                }
                BufRef::Input { index } => addr(
                    &inputs
                        .get(*index)
                        .ok_or_else(|| CudaModelError::Plan(format!("input {index}")))?
                        .0,
                ),
                BufRef::Output { index } => addr(
                    &outputs
                        .get(*index)
                        .ok_or_else(|| CudaModelError::Plan(format!("output {index}")))?
                        .0,
                ),
            })
        };
        let mut launches = Vec::new();
        let mut tensor_maps = Vec::new();
        for s in &gp.steps {
            let func = module
                .load_function(&s.kernel)
                .map_err(|e| CudaModelError::Plan(format!("PTX entry '{}': {e}", s.kernel)))?;
            if s.shared_bytes > 0 {
                // Static and dynamic shared memory above 48 KiB together must be opted into
                // per function (a wgmma kernel's exactly 48 KiB of stages plus its static
                // mbarriers was refused at launch on an H200): always say the dynamic size.
                func.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    s.shared_bytes as i32,
                )
                .map_err(|e| {
                    CudaModelError::Plan(format!(
                        "'{}': {} B of dynamic shared memory refused: {e}",
                        s.kernel, s.shared_bytes
                    ))
                })?;
            }
            let mut params = Vec::new();
            for a in &s.args {
                match a {
                    GpuArg::Buf {
                        buf, offset, len, ..
                    } => {
                        let p = base(buf)? + offset;
                        params.extend([
                            Param::U64(p),
                            Param::U64(p),
                            Param::I64(0),
                            Param::I64(*len as i64),
                            Param::I64(1),
                        ]);
                    }
                    GpuArg::Index(v) => params.push(Param::I64(*v)),
                    GpuArg::F32(bits) => params.push(Param::F32(f32::from_bits(*bits))),
                    GpuArg::TensorMap {
                        buf,
                        offset,
                        dims,
                        row_bytes,
                        box_dims,
                        bf16,
                        ..
                    } => {
                        let p = base(buf)? + offset;
                        let elem = if *bf16 { Elem16::BF16 } else { Elem16::F16 };
                        let map = encode_tensor_map_2d(p, elem, *dims, *row_bytes, *box_dims)
                            .map_err(|e| CudaModelError::Plan(format!("'{}': {e}", s.kernel)))?;
                        let dev = stream.clone_htod(&map).map_err(drv)?;
                        params.push(Param::U64(addr(&dev)));
                        tensor_maps.push(dev);
                    }
                }
            }
            launches.push(Launch {
                label: format!("{} ({})", s.kernel, s.label),
                func,
                params,
                cfg: LaunchConfig {
                    grid_dim: (s.grid[0], s.grid[1], s.grid[2]),
                    block_dim: (s.block[0], s.block[1], s.block[2]),
                    shared_mem_bytes: s.shared_bytes,
                },
            });
        }
        Ok(Self {
            plan,
            stream,
            launches,
            graph: None,
            inputs,
            outputs,
            _arena: arena,
            _weights: weights,
            _tensor_maps: tensor_maps,
            warning,
            cubin,
        })
    }

    /// The plan.
    pub fn plan(&self) -> &ExecPlan {
        &self.plan
    }

    /// Launches every step; `check`: waits for each and names the launch that failed (the
    /// first run, so that a faulting kernel is reported by name, not by a later call).
    fn launch_all(&self, check: bool) -> Result<(), CudaModelError> {
        for (i, l) in self.launches.iter().enumerate() {
            self.launch_one(l)?;
            if check {
                self.stream
                    .synchronize()
                    .map_err(|e| CudaModelError::Driver(format!("launch {i}, {}: {e}", l.label)))?;
            }
        }
        Ok(())
    }

    /// Queues one launch on the stream.
    fn launch_one(&self, l: &Launch) -> Result<(), CudaModelError> {
        let mut b = self.stream.launch_builder(&l.func);
        for p in &l.params {
            match p {
                Param::U64(v) => b.arg(v),
                Param::I64(v) => b.arg(v),
                Param::F32(v) => b.arg(v),
            };
        }
        // SAFETY: the parameters follow the kernel ABI the compiler emitted for this
        // entry, and every buffer view was checked against its buffer by
        // `ExecPlan::validate` in `load` (the scalars of the specialized kernels are
        // trusted to match their views, as the compiler wrote them).
        unsafe { b.launch(l.cfg) }.map_err(drv)?;
        Ok(())
    }

    /// Per-launch device times: uploads `inputs`, runs the model once (checked, launch by
    /// launch), then `runs` times with a CUDA event between consecutive launches (no graph:
    /// each launch is timed on its own, so the sum exceeds a graph replay by the launch
    /// gaps). Returns one entry per launch in plan order with its median.
    pub fn profile(
        &mut self,
        inputs: &[&[u8]],
        runs: usize,
    ) -> Result<Vec<LaunchTime>, CudaModelError> {
        self.upload(inputs)?;
        self.launch_all(true)?;
        let ctx = self.stream.context();
        let events = (0..=self.launches.len())
            .map(|_| ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(drv)?;
        let mut times = vec![Vec::with_capacity(runs); self.launches.len()];
        for _ in 0..runs.max(1) {
            for (l, e) in self.launches.iter().zip(&events) {
                e.record(&self.stream).map_err(drv)?;
                self.launch_one(l)?;
            }
            events[self.launches.len()]
                .record(&self.stream)
                .map_err(drv)?;
            self.stream.synchronize().map_err(drv)?;
            for (i, t) in times.iter_mut().enumerate() {
                let ms = events[i].elapsed_ms(&events[i + 1]).map_err(drv)?;
                t.push(f64::from(ms) * 1e3);
            }
        }
        Ok(self
            .launches
            .iter()
            .zip(times)
            .map(|(l, mut t)| {
                t.sort_by(f64::total_cmp);
                LaunchTime {
                    label: l.label.clone(),
                    median_us: t[t.len() / 2],
                }
            })
            .collect())
    }

    /// Copies `inputs` (raw bytes, plan order) to the device through the pinned buffers.
    fn upload(&mut self, inputs: &[&[u8]]) -> Result<(), CudaModelError> {
        if inputs.len() != self.inputs.len() {
            return Err(CudaModelError::Inputs(format!(
                "{} given, the model has {}",
                inputs.len(),
                self.inputs.len()
            )));
        }
        for (i, (x, (dev, pin))) in inputs.iter().zip(&mut self.inputs).enumerate() {
            let host = pin.as_mut_slice().map_err(drv)?;
            let n = bytes_of(&self.plan.inputs[i])?;
            if x.len() != n {
                return Err(CudaModelError::Inputs(format!(
                    "input '{}': {} bytes, expected {n}",
                    self.plan.inputs[i].name,
                    x.len()
                )));
            }
            host[..n].copy_from_slice(x);
            self.stream.memcpy_htod(&*pin, dev).map_err(drv)?;
        }
        Ok(())
    }

    /// Runs the model: `inputs` are the raw bytes of each input (plan order), returns the
    /// raw bytes of each output.
    pub fn run(&mut self, inputs: &[&[u8]]) -> Result<Vec<Vec<u8>>, CudaModelError> {
        self.upload(inputs)?;
        match &self.graph {
            Some(g) => g.launch().map_err(drv)?,
            None => {
                // First run: launch directly (checks every launch), then capture the same
                // sequence into a graph for the next runs.
                self.launch_all(true)?;
                self.stream
                    .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(drv)?;
                let captured = self.launch_all(false);
                let graph = self
                    .stream
                    .end_capture(sys::CUgraphInstantiate_flags(0))
                    .map_err(drv)?;
                captured?;
                self.graph = graph;
            }
        }
        let mut out = Vec::new();
        for (i, (dev, pin)) in self.outputs.iter_mut().enumerate() {
            self.stream.memcpy_dtoh(&*dev, pin).map_err(drv)?;
            let n = bytes_of(&self.plan.outputs[i])?;
            self.stream.synchronize().map_err(drv)?;
            out.push(pin.as_slice().map_err(drv)?[..n].to_vec());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod profile_tests {
    use super::*;

    #[test]
    fn profile_table_groups_launches_by_entry() {
        let t = |label: &str, us: f64| LaunchTime {
            label: label.into(),
            median_us: us,
        };
        let times = [
            t("gemm (k0)", 10.0),
            t("softmax (k1)", 5.0),
            t("gemm (k2)", 20.0),
            t("zero (k3)", 1.0),
        ];
        let table = profile_table(&times, 2);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[2], "| gemm | 2 | 30.0 | 83.3% |");
        assert_eq!(lines[3], "| softmax | 1 | 5.0 | 13.9% |");
        assert_eq!(lines[4], "| (1 more entries) | | 1.0 | |");
        assert_eq!(lines[5], "| sum of 4 launches | | 36.0 | 100% |");
    }
}
