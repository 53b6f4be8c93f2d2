//! Sliding-window geometry shared by convolutions and pooling: the `auto_pad` / `pads` /
//! `strides` / `dilations` / `kernel_shape` attributes, the output size rules, and the
//! enumeration of (output position, kernel tap, input position) triples as contiguous runs
//! along the innermost axis.

use super::{dims_text, positive_ints, size_ints};
use crate::ops::{OnnxNode, OpResult};
use crate::shape::Dim;

/// The ONNX `auto_pad` attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AutoPad {
    /// Explicit `pads` (default).
    NotSet,
    /// Output size `ceil(in / stride)`, extra padding at the end.
    SameUpper,
    /// Output size `ceil(in / stride)`, extra padding at the beginning.
    SameLower,
    /// No padding.
    Valid,
}

impl AutoPad {
    /// Parses the `auto_pad` attribute (default `NOTSET`).
    pub fn parse(node: &OnnxNode) -> OpResult<AutoPad> {
        match node.string_or("auto_pad", "NOTSET")?.as_str() {
            "NOTSET" | "" => Ok(AutoPad::NotSet),
            "SAME_UPPER" => Ok(AutoPad::SameUpper),
            "SAME_LOWER" => Ok(AutoPad::SameLower),
            "VALID" => Ok(AutoPad::Valid),
            other => Err(format!(
                "attribute 'auto_pad': expected NOTSET, SAME_UPPER, SAME_LOWER or VALID, found {other:?}"
            )),
        }
    }

    /// True for `SAME_UPPER` and `SAME_LOWER`.
    pub fn is_same(self) -> bool {
        matches!(self, AutoPad::SameUpper | AutoPad::SameLower)
    }
}

/// The window attributes common to Conv, ConvTranspose and the pooling ops, as written on
/// the node (their length is checked against the spatial rank once it is known).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowAttrs {
    /// `auto_pad`.
    pub auto_pad: AutoPad,
    /// `kernel_shape` (for convolutions it defaults to the weight's spatial dims).
    pub kernel_shape: Option<Vec<usize>>,
    /// `strides` (default all 1).
    pub strides: Option<Vec<usize>>,
    /// `dilations` (default all 1).
    pub dilations: Option<Vec<usize>>,
    /// `pads` as `[x1_begin, x2_begin, ..., x1_end, x2_end, ...]` (default all 0).
    pub pads: Option<Vec<usize>>,
}

impl WindowAttrs {
    /// Parses and validates the window attributes; `kernel_required` for pooling ops.
    pub fn parse(node: &OnnxNode, kernel_required: bool) -> OpResult<WindowAttrs> {
        let kernel_shape = positive_ints(node, "kernel_shape")?;
        if kernel_required && kernel_shape.is_none() {
            return Err("required attribute 'kernel_shape' is missing".into());
        }
        let pads = size_ints(node, "pads", 0)?;
        if let Some(p) = &pads {
            if p.len() % 2 != 0 {
                return Err(format!(
                    "attribute 'pads': expected an even number of values, found {}",
                    p.len()
                ));
            }
        }
        let attrs = WindowAttrs {
            auto_pad: AutoPad::parse(node)?,
            kernel_shape,
            strides: positive_ints(node, "strides")?,
            dilations: positive_ints(node, "dilations")?,
            pads,
        };
        if let Some(k) = &attrs.kernel_shape {
            attrs.check_rank(k.len())?;
        }
        Ok(attrs)
    }

    /// Checks that the attribute lengths fit `rank` spatial dims.
    pub fn check_rank(&self, rank: usize) -> OpResult<()> {
        let check = |name: &str, v: &Option<Vec<usize>>, want: usize| match v {
            Some(v) if v.len() != want => Err(format!(
                "attribute '{name}': expected {want} values for {rank} spatial dims, found {}",
                v.len()
            )),
            _ => Ok(()),
        };
        check("kernel_shape", &self.kernel_shape, rank)?;
        check("strides", &self.strides, rank)?;
        check("dilations", &self.dilations, rank)?;
        check("pads", &self.pads, 2 * rank)
    }

    /// Stride of spatial axis `i` (after [`check_rank`](Self::check_rank)).
    pub fn stride(&self, i: usize) -> usize {
        self.strides.as_ref().map_or(1, |s| s[i])
    }

    /// Dilation of spatial axis `i`.
    pub fn dilation(&self, i: usize) -> usize {
        self.dilations.as_ref().map_or(1, |s| s[i])
    }

    /// Explicit (begin, end) padding of spatial axis `i` among `rank`.
    pub fn pad(&self, i: usize, rank: usize) -> (usize, usize) {
        self.pads.as_ref().map_or((0, 0), |p| (p[i], p[i + rank]))
    }

    /// The kernel size of each spatial axis: the attribute, checked against the weight's
    /// spatial dims `from_weight` when they are given and known.
    pub fn kernel(&self, rank: usize, from_weight: Option<&[Dim]>) -> OpResult<Vec<Option<usize>>> {
        match (&self.kernel_shape, from_weight) {
            (Some(k), Some(w)) => {
                if k.iter().zip(w).any(|(&k, w)| !w.compatible(&Dim::Known(k))) {
                    return Err(format!(
                        "attribute 'kernel_shape' {k:?} does not match the weight's spatial dims {}",
                        dims_text(w)
                    ));
                }
                Ok(k.iter().map(|&k| Some(k)).collect())
            }
            (Some(k), None) => Ok(k.iter().map(|&k| Some(k)).collect()),
            (None, Some(w)) => Ok(w.iter().map(Dim::known).collect()),
            (None, None) => Ok(vec![None; rank]),
        }
    }

    /// The geometry of spatial axis `i` of `rank` for a forward sliding window (Conv and
    /// pooling) over an input of size `input` with a kernel of size `kernel`.
    pub fn axis(
        &self,
        i: usize,
        rank: usize,
        input: usize,
        kernel: usize,
        ceil_mode: bool,
    ) -> OpResult<Axis> {
        let (stride, dilation) = (self.stride(i), self.dilation(i));
        if kernel == 0 {
            return Err(format!("kernel size of spatial axis {i} is 0"));
        }
        let eff = (kernel - 1) * dilation + 1;
        let (output, pad_begin, pad_end) = match self.auto_pad {
            AutoPad::SameUpper | AutoPad::SameLower => {
                let output = input.div_ceil(stride);
                let total = if output == 0 {
                    0
                } else {
                    ((output - 1) * stride)
                        .saturating_add(eff)
                        .saturating_sub(input)
                };
                let begin = if self.auto_pad == AutoPad::SameUpper {
                    total / 2
                } else {
                    total - total / 2
                };
                (output, begin, total - begin)
            }
            AutoPad::NotSet | AutoPad::Valid => {
                let (pb, pe) = if self.auto_pad == AutoPad::Valid {
                    (0, 0)
                } else {
                    self.pad(i, rank)
                };
                let padded = input
                    .checked_add(pb + pe)
                    .ok_or_else(|| format!("spatial axis {i}: input size {input} too large"))?;
                if padded < eff {
                    return Err(format!(
                        "spatial axis {i}: padded input size {padded} is smaller than the \
                         dilated kernel size {eff}"
                    ));
                }
                let span = padded - eff;
                let mut output = if ceil_mode {
                    span.div_ceil(stride) + 1
                } else {
                    span / stride + 1
                };
                // In ceil mode the last window must start inside the input or the begin pad.
                if ceil_mode && (output - 1) * stride >= input + pb {
                    output -= 1;
                }
                (output, pb, pe)
            }
        };
        Ok(Axis {
            input,
            output,
            kernel,
            stride,
            dilation,
            pad_begin: pad_begin as i64,
            pad_end: pad_end as i64,
        })
    }
}

/// One spatial axis of a sliding window: output position `o` and kernel tap `k` read input
/// position `o * stride + k * dilation - pad_begin` (out of `[0, input)` is padding).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Axis {
    /// Input size.
    pub input: usize,
    /// Output size.
    pub output: usize,
    /// Kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Dilation.
    pub dilation: usize,
    /// Padding before the input (may be negative for ConvTranspose with `output_shape`).
    pub pad_begin: i64,
    /// Padding after the input.
    pub pad_end: i64,
}

impl Axis {
    /// The input position read by output `o` and tap `k` (possibly in the padding).
    pub fn position(&self, o: usize, k: usize) -> i64 {
        (o * self.stride + k * self.dilation) as i64 - self.pad_begin
    }

    /// The range of outputs `[lo, hi)` whose tap `k` lands inside the input.
    fn valid_outputs(&self, k: usize) -> (usize, usize) {
        let base = (k * self.dilation) as i64 - self.pad_begin;
        let s = self.stride as i64;
        // o * s + base >= 0  <=>  o >= ceil(-base / s)
        let lo = if base >= 0 { 0 } else { (-base + s - 1) / s };
        // o * s + base <= input - 1  <=>  o <= floor((input - 1 - base) / s)
        let last = self.input as i64 - 1 - base;
        let hi = if last < 0 { 0 } else { last / s + 1 };
        let hi = (hi as usize).min(self.output);
        ((lo as usize).min(hi), hi)
    }
}

/// A run of taps along the innermost axis: for `j in 0..len`, output element
/// `out + j` reads input element `inp + j * stride` through kernel element `k` (all flat
/// offsets within one channel plane).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Run {
    /// Flat output offset of the first element.
    pub out: usize,
    /// Flat input offset of the first element.
    pub inp: usize,
    /// Flat kernel offset.
    pub k: usize,
    /// Number of elements.
    pub len: usize,
}

/// Row-major strides of `dims`.
pub fn strides_of(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Decodes flat row-major index `flat` of `dims` into `idx`.
pub fn unravel(mut flat: usize, dims: &[usize], idx: &mut [usize]) {
    for i in (0..dims.len()).rev() {
        idx[i] = flat % dims[i];
        flat /= dims[i];
    }
}

/// The geometry of all spatial axes.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Window(pub Vec<Axis>);

impl Window {
    /// Input spatial dims.
    pub fn input_dims(&self) -> Vec<usize> {
        self.0.iter().map(|a| a.input).collect()
    }

    /// Output spatial dims.
    pub fn output_dims(&self) -> Vec<usize> {
        self.0.iter().map(|a| a.output).collect()
    }

    /// Kernel spatial dims.
    pub fn kernel_dims(&self) -> Vec<usize> {
        self.0.iter().map(|a| a.kernel).collect()
    }

    /// Stride of the innermost axis (the input step within a [`Run`]).
    pub fn inner_stride(&self) -> usize {
        self.0.last().map_or(1, |a| a.stride)
    }

    /// All (output, tap, input) triples with the input position inside the input, grouped
    /// into runs along the innermost axis. For a fixed output element, its taps appear in
    /// row-major kernel order.
    pub fn runs(&self) -> Vec<Run> {
        let Some((inner, outer)) = self.0.split_last() else {
            return Vec::new();
        };
        let out_outer: Vec<usize> = outer.iter().map(|a| a.output).collect();
        let k_outer: Vec<usize> = outer.iter().map(|a| a.kernel).collect();
        let (in_st, out_st, k_st) = (
            strides_of(&self.input_dims()),
            strides_of(&self.output_dims()),
            strides_of(&self.kernel_dims()),
        );
        let (mut oi, mut ki) = (vec![0; outer.len()], vec![0; outer.len()]);
        let mut runs = Vec::new();
        for of in 0..out_outer.iter().product() {
            unravel(of, &out_outer, &mut oi);
            for kf in 0..k_outer.iter().product() {
                unravel(kf, &k_outer, &mut ki);
                let (mut inp, mut out, mut k) = (0, 0, 0);
                let mut inside = true;
                for (d, a) in outer.iter().enumerate() {
                    let p = a.position(oi[d], ki[d]);
                    if p < 0 || p >= a.input as i64 {
                        inside = false;
                        break;
                    }
                    inp += p as usize * in_st[d];
                    out += oi[d] * out_st[d];
                    k += ki[d] * k_st[d];
                }
                if !inside {
                    continue;
                }
                for kl in 0..inner.kernel {
                    let (lo, hi) = inner.valid_outputs(kl);
                    if lo < hi {
                        runs.push(Run {
                            out: out + lo,
                            inp: inp + inner.position(lo, kl) as usize,
                            k: k + kl,
                            len: hi - lo,
                        });
                    }
                }
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axis(input: usize, kernel: usize, stride: usize, dilation: usize, pad: i64) -> Axis {
        let output = ((input as i64 + 2 * pad - ((kernel - 1) * dilation + 1) as i64)
            / stride as i64
            + 1) as usize;
        Axis {
            input,
            output,
            kernel,
            stride,
            dilation,
            pad_begin: pad,
            pad_end: pad,
        }
    }

    /// Runs enumerate exactly the in-bounds taps of a brute-force enumeration.
    #[test]
    fn runs_match_brute_force() {
        for (i0, i1) in [(5, 7), (1, 4), (6, 6)] {
            for (k, s, d, p) in [(3, 1, 1, 1), (3, 2, 1, 0), (2, 3, 2, 2), (1, 2, 1, 0)] {
                if (i0 as i64 + 2 * p) < ((k - 1) * d + 1) as i64
                    || (i1 as i64 + 2 * p) < ((k - 1) * d + 1) as i64
                {
                    continue;
                }
                let w = Window(vec![axis(i0, k, s, d, p), axis(i1, k, s, d, p)]);
                let mut got = Vec::new();
                for r in w.runs() {
                    for j in 0..r.len {
                        got.push((r.out + j, r.k, r.inp + j * w.inner_stride()));
                    }
                }
                let mut want = Vec::new();
                let (a, b) = (&w.0[0], &w.0[1]);
                for o0 in 0..a.output {
                    for o1 in 0..b.output {
                        for k0 in 0..k {
                            for k1 in 0..k {
                                let (p0, p1) = (a.position(o0, k0), b.position(o1, k1));
                                if p0 >= 0 && p1 >= 0 && p0 < i0 as i64 && p1 < i1 as i64 {
                                    want.push((
                                        o0 * b.output + o1,
                                        k0 * k + k1,
                                        p0 as usize * i1 + p1 as usize,
                                    ));
                                }
                            }
                        }
                    }
                }
                got.sort();
                want.sort();
                assert_eq!(got, want, "in {i0}x{i1} k{k} s{s} d{d} p{p}");
            }
        }
    }
}
