//! Measuring the candidates of a tuning bundle ([`crate::tune_bundle`]) on the GPU present:
//! per candidate, load its PTX (the driver JIT-compiles it; an error makes it invalid), run it
//! once on the task's inputs and compare the output with the expected one (beyond the task's
//! tolerance: wrong), then warm up and time repeated launches with CUDA events, writing a
//! buffer twice the size of L2 before each timed launch so every run starts cold; the result
//! is the median. A kernel that faults poisons its CUDA context: callers that must go on
//! after one (the `gpu_measure` example) measure each candidate in a process of its own.

use crate::cuda::{CudaDevice, CudaError, DeviceBuffer, Elem16, KernelArg};
use crate::tune_bundle::{
    compare, read_f32, read_u16, BundleArg, BundleCandidate, BundleTask, Manifest, MeasureOutcome,
};
use cudarc::driver::sys::CUevent_flags;
use std::path::Path;

/// How candidates are timed.
#[derive(Debug, Clone, Copy)]
pub struct MeasureOptions {
    /// Untimed launches first.
    pub warmup: usize,
    /// Timed launches (the median is reported).
    pub runs: usize,
    /// Write a buffer of twice the L2 size before each timed launch.
    pub flush_l2: bool,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        Self {
            warmup: 3,
            runs: 20,
            flush_l2: true,
        }
    }
}

enum DevBuf {
    F32(DeviceBuffer<f32>),
    U16(DeviceBuffer<u16>),
}

/// A task's buffers on the device and its expected output.
pub struct TaskData {
    bufs: Vec<DevBuf>,
    expected: Vec<f32>,
}

/// The GPU and the L2 flush buffer.
pub struct GpuMeasurer {
    dev: CudaDevice,
    flush: Option<DeviceBuffer<u8>>,
    opts: MeasureOptions,
}

fn err(e: CudaError) -> String {
    e.to_string()
}

impl GpuMeasurer {
    /// Opens GPU 0 for bundle `m`: [`CudaError::NoDevice`] without a GPU; an error when its
    /// architecture is not the bundle's.
    pub fn new(m: &Manifest, opts: MeasureOptions) -> Result<Self, CudaError> {
        let dev = CudaDevice::new(0)?;
        let arch = dev.arch()?;
        if arch != m.arch {
            return Err(CudaError::Launch(format!(
                "the bundle is for {} ({}), this GPU ({}) is {arch}",
                m.sku,
                m.arch,
                dev.name().unwrap_or_default()
            )));
        }
        let flush = if opts.flush_l2 {
            Some(dev.zeros::<u8>((2 * m.l2_bytes).max(1 << 20) as usize)?)
        } else {
            None
        };
        Ok(Self { dev, flush, opts })
    }

    /// The device's name.
    pub fn device_name(&self) -> String {
        self.dev.name().unwrap_or_default()
    }

    /// Uploads task `t`'s buffers (files in `dir`).
    pub fn task_data(&self, dir: &Path, t: &BundleTask) -> Result<TaskData, String> {
        let mut bufs = Vec::new();
        for b in &t.buffers {
            let len = b.len as usize;
            bufs.push(match (b.elem_bytes, &b.file) {
                (4, Some(f)) => DevBuf::F32(
                    self.dev
                        .upload(&read_f32(&dir.join(f)).map_err(|e| e.0)?)
                        .map_err(err)?,
                ),
                (4, None) => DevBuf::F32(self.dev.zeros(len).map_err(err)?),
                (_, Some(f)) => DevBuf::U16(
                    self.dev
                        .upload(&read_u16(&dir.join(f)).map_err(|e| e.0)?)
                        .map_err(err)?,
                ),
                (_, None) => DevBuf::U16(self.dev.zeros(len).map_err(err)?),
            });
        }
        let expected = read_f32(&dir.join(&t.expected)).map_err(|e| e.0)?;
        Ok(TaskData { bufs, expected })
    }

    /// Measures candidate `c` of task `t` (see the module doc).
    pub fn measure(
        &mut self,
        dir: &Path,
        t: &BundleTask,
        c: &BundleCandidate,
        data: &mut TaskData,
    ) -> MeasureOutcome {
        let ptx = match std::fs::read_to_string(dir.join(&c.ptx)) {
            Ok(p) => p,
            Err(e) => {
                return MeasureOutcome::Invalid {
                    msg: format!("{}: {e}", c.ptx),
                }
            }
        };
        let kernel = match self.dev.load_ptx(&ptx, &c.entry) {
            Ok(k) => k,
            Err(e) => {
                return MeasureOutcome::Invalid {
                    msg: format!("module load: {e}"),
                }
            }
        };
        // TMA descriptors for this candidate.
        let mut maps = Vec::new();
        for a in &c.args {
            if let BundleArg::TensorMap {
                buffer,
                dims,
                row_bytes,
                box_dims,
                bf16,
            } = a
            {
                let DevBuf::U16(b) = &data.bufs[*buffer] else {
                    return MeasureOutcome::Invalid {
                        msg: "tensor map of an f32 buffer".into(),
                    };
                };
                let elem = if *bf16 { Elem16::BF16 } else { Elem16::F16 };
                match self
                    .dev
                    .tensor_map_2d(b, elem, *dims, *row_bytes, *box_dims)
                {
                    Ok(m) => maps.push(m),
                    Err(e) => return MeasureOutcome::Invalid { msg: e.to_string() },
                }
            }
        }
        if let DevBuf::F32(o) = &mut data.bufs[t.output] {
            if let Err(e) = self.dev.memset_zeros(o) {
                return MeasureOutcome::Crash { msg: e.to_string() };
            }
        }
        let mut mi = maps.iter();
        let mut args = Vec::new();
        for a in &c.args {
            args.push(match a {
                BundleArg::Buf { buffer } => match &data.bufs[*buffer] {
                    DevBuf::F32(b) => KernelArg::Buffer(b.raw()),
                    DevBuf::U16(b) => KernelArg::Half(b.raw16()),
                },
                BundleArg::Index { value } => KernelArg::Index(*value),
                BundleArg::F32 { value } => KernelArg::F32(*value),
                BundleArg::TensorMap { .. } => match mi.next() {
                    Some(m) => KernelArg::TensorMap(m.slice()),
                    None => {
                        return MeasureOutcome::Invalid {
                            msg: "tensor map bookkeeping".into(),
                        }
                    }
                },
            });
        }
        let launch = |dev: &CudaDevice| {
            // SAFETY: the arguments follow the kernel's parameters as the bundle's generator
            // wrote them (buffers sized for the launch's problem).
            unsafe { dev.launch(&kernel, c.grid, c.block, c.shared_bytes, &args) }
        };
        if let Err(e) = launch(&self.dev) {
            return MeasureOutcome::Invalid {
                msg: format!("launch: {e}"),
            };
        }
        if let Err(e) = self.dev.synchronize() {
            return MeasureOutcome::Crash {
                msg: format!("kernel: {e}"),
            };
        }
        let DevBuf::F32(out) = &data.bufs[t.output] else {
            return MeasureOutcome::Invalid {
                msg: "output is not f32".into(),
            };
        };
        match self.dev.download(out) {
            Ok(got) => {
                if let Err(m) = compare(&got, &data.expected, t.tolerance) {
                    return MeasureOutcome::Wrong { msg: m };
                }
            }
            Err(e) => {
                return MeasureOutcome::Crash {
                    msg: format!("download: {e}"),
                }
            }
        }
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(self.opts.runs);
        for i in 0..self.opts.warmup + self.opts.runs.max(1) {
            if let Some(f) = &mut self.flush {
                if let Err(e) = self.dev.memset_zeros(f) {
                    return MeasureOutcome::Crash {
                        msg: format!("L2 flush: {e}"),
                    };
                }
            }
            let start = match self.dev.stream().record_event(flags) {
                Ok(e) => e,
                Err(e) => {
                    return MeasureOutcome::Crash {
                        msg: format!("event: {e}"),
                    }
                }
            };
            if let Err(e) = launch(&self.dev) {
                return MeasureOutcome::Crash {
                    msg: format!("launch: {e}"),
                };
            }
            let end = match self.dev.stream().record_event(flags) {
                Ok(e) => e,
                Err(e) => {
                    return MeasureOutcome::Crash {
                        msg: format!("event: {e}"),
                    }
                }
            };
            if let Err(e) = end.synchronize() {
                return MeasureOutcome::Crash {
                    msg: format!("kernel: {e}"),
                };
            }
            if i >= self.opts.warmup {
                match start.elapsed_ms(&end) {
                    Ok(ms) => times.push(f64::from(ms) * 1e-3),
                    Err(e) => {
                        return MeasureOutcome::Crash {
                            msg: format!("event: {e}"),
                        }
                    }
                }
            }
        }
        times.sort_by(f64::total_cmp);
        MeasureOutcome::Ok {
            seconds: times[times.len() / 2],
        }
    }
}

/// Measures the candidates of the bundle in `dir` in this process (all, or task `only.0`'s,
/// or one candidate `only.1` of it), calling `report(task, candidate, outcome)` for each.
/// Errors: no GPU, another architecture, a bad bundle.
pub fn measure_bundle(
    dir: &Path,
    opts: MeasureOptions,
    only: Option<(usize, Option<usize>)>,
    mut report: impl FnMut(usize, usize, &MeasureOutcome),
) -> Result<Manifest, String> {
    let m = Manifest::load(dir).map_err(|e| e.0)?;
    let mut g = GpuMeasurer::new(&m, opts).map_err(err)?;
    for (ti, t) in m.tasks.iter().enumerate() {
        if only.is_some_and(|(o, _)| o != ti) {
            continue;
        }
        let mut data = g.task_data(dir, t)?;
        for (ci, c) in t.candidates.iter().enumerate() {
            if only.is_some_and(|(_, oc)| oc.is_some_and(|oc| oc != ci)) {
                continue;
            }
            let o = g.measure(dir, t, c, &mut data);
            report(ti, ci, &o);
        }
    }
    Ok(m)
}
