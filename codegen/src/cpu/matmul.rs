//! f32 MatMul `C[M,N] = A[M,K] · B[K,N]` (+ optional fused `relu(· + bias[N])`) with a
//! parametric schedule.
//!
//! The kernel follows the BLIS/GotoBLAS structure, written directly in MLIR (`scf`, `memref`,
//! `vector`):
//!
//! ```text
//! for jc in 0..N step nc                 // B block of kc×nc lives in L3/L2
//!   for pc in 0..K step kc
//!     pack B[pc.., jc..] into nr-wide panels (zero padded)   -> Bp[kc×nc]
//!     for ic in 0..M step mc             // A block of mc×kc lives in L2
//!       pack A[ic.., pc..] into mr-tall panels (zero padded) -> Ap[mc×kc]
//!       for jr in 0..nc step nr          // one Bp panel (kc×nr) lives in L1
//!         for ir in 0..mc step mr
//!           micro-kernel: mr × (nr/8) ymm accumulators (scf.for iter_args),
//!                         per k: nr/8 vector loads of Bp, mr broadcasts of Ap, vector.fma
//!           C tile (+)= acc  (masked loads/stores at the M/N edges; epilogue on last pc)
//! ```
//!
//! Packing pads the edges with zeros, so the micro-kernel never branches; only the C update
//! is masked (`vector.create_mask` + `maskedload`/`maskedstore`), which makes every shape
//! correct, not only multiples of the tile sizes. All sizes are runtime `dims`, so one
//! compiled kernel serves every `M, N, K`.

use super::abi::{Dim, Prologue};
pub use super::matmul_transform::MatmulLowering;
use super::{Kernel, KernelSignature};
use std::fmt::Write as _;

/// A matmul schedule: cache blocking (`mc`, `kc`, `nc`) and register blocking (`mr`, `nr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulSchedule {
    /// Rows of the register tile (accumulator rows).
    pub mr: usize,
    /// Columns of the register tile; a multiple of `vector_width`.
    pub nr: usize,
    /// Rows of the packed A block (rounded up to a multiple of `mr`).
    pub mc: usize,
    /// Depth of the packed A and B blocks.
    pub kc: usize,
    /// Columns of the packed B block (rounded up to a multiple of `nr`).
    pub nc: usize,
    /// f32 lanes per vector (8 for AVX2).
    pub vector_width: usize,
    /// Which code generator lowers the matmul (see [`super::matmul_transform`]).
    pub lowering: MatmulLowering,
}

impl Default for MatmulSchedule {
    /// 6×16 register tile (12 ymm accumulators + 2 B vectors + 1 broadcast = 15 of the 16
    /// AVX2 registers), mc = 96, kc = 256, nc = 1024: about 88% of the measured one-core
    /// AVX2 FMA peak at 1024³ on an AMD EPYC Zen 4 (family 25) core (see the
    /// `matmul_gflops` example); kc·nr·4 B = 16 KiB of B stays in a 32 KiB L1.
    fn default() -> Self {
        Self {
            mr: 6,
            nr: 16,
            mc: 96,
            kc: 256,
            nc: 1024,
            vector_width: 8,
            lowering: MatmulLowering::default(),
        }
    }
}

impl MatmulSchedule {
    /// The default schedule for vector registers of `lanes` f32 (8: AVX2, the
    /// [`Default`]; 16: AVX-512, whose 32 registers hold an 8×32 tile — 16 accumulators —
    /// measured 236 against 129 GFLOP/s for the AVX2 tile at 1024³ on a Zen 5 core).
    pub fn for_lanes(lanes: usize) -> Self {
        if lanes == 16 {
            Self {
                mr: 8,
                nr: 32,
                vector_width: 16,
                ..Self::default()
            }
        } else {
            Self::default()
        }
    }

    /// The schedule with `mc`/`nc` rounded up to multiples of `mr`/`nr` and `nr` to a multiple
    /// of `vector_width`; panics on zero sizes.
    pub fn normalized(&self) -> Self {
        assert!(
            self.mr > 0 && self.nr > 0 && self.mc > 0 && self.kc > 0 && self.nc > 0,
            "matmul schedule sizes must be positive: {self:?}"
        );
        assert!(self.vector_width > 0, "vector width must be positive");
        let vw = self.vector_width;
        let nr = self.nr.div_ceil(vw) * vw;
        Self {
            mr: self.mr,
            nr,
            mc: self.mc.div_ceil(self.mr) * self.mr,
            kc: self.kc,
            nc: self.nc.div_ceil(nr) * nr,
            vector_width: vw,
            lowering: self.lowering,
        }
    }
}

/// An optional epilogue fused into the last update of each C tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `C = A·B`.
    None,
    /// `C = relu(A·B + bias[N])`; the bias is an extra input after `B`.
    BiasRelu,
}

/// Generates the matmul kernel `name`.
///
/// Arguments `[A, B, C]` (or `[A, B, bias, C]` with [`Epilogue::BiasRelu`]); dims `[M, N, K]`.
pub fn matmul(name: &str, schedule: &MatmulSchedule, epilogue: Epilogue) -> Kernel {
    let s = schedule.normalized();
    let bias_relu = epilogue == Epilogue::BiasRelu;

    let mut p = Prologue::new();
    let a = p.memref_f32(0, &[Dim::Sym(0), Dim::Sym(2)]);
    let b = p.memref_f32(1, &[Dim::Sym(2), Dim::Sym(1)]);
    let bias = bias_relu.then(|| p.memref_f32(2, &[Dim::Sym(1)]));
    let c = p.memref_f32(if bias_relu { 3 } else { 2 }, &[Dim::Sym(0), Dim::Sym(1)]);
    let m = p.dim_index(0);
    let n = p.dim_index(1);
    let k = p.dim_index(2);
    // M, N, K are runtime values: the packed panels take the schedule's full block sizes.
    let (ap_len, bp_len) = packed_lens(&s, None, None, None);
    let ap = p.scratch(&[ap_len], "f32", 4);
    let bp = p.scratch(&[bp_len], "f32", 4);
    let ops = Operands {
        a: &a,
        b: &b,
        bias: bias.as_deref(),
        c: &c,
        ap: &ap,
        bp: &bp,
        b_packed: false,
    };
    p.push(&body(&s, &ops, &m, &n, &k));
    let mut inputs = 2;
    if bias_relu {
        inputs += 1;
    }
    Kernel {
        signature: KernelSignature {
            name: name.to_string(),
            inputs,
            outputs: 1,
            dims: vec!["M".into(), "N".into(), "K".into()],
            tasks: 1,
            scratch_bytes: p.scratch_bytes(),
        },
        mlir: p.finish(name),
        pipeline: VECTOR_PIPELINE.to_string(),
    }
}

/// The operand type of [`matmul_memref_func`]: rows with unit stride (row-major memrefs
/// `memref.cast` to it, and so do row-block subviews).
pub const STRIDED_2D: &str = "memref<?x?xf32, strided<[?, 1], offset: ?>>";

/// The lengths (f32 elements) of the packed A and B panel buffers the matmul with schedule
/// `s` needs for an `M×K · K×N` product; a size not known at compile time (`None`) takes
/// the schedule's full block (`mc×kc`, `kc×nc`), an upper bound for every size.
pub fn packed_lens(
    s: &MatmulSchedule,
    m: Option<usize>,
    n: Option<usize>,
    k: Option<usize>,
) -> (usize, usize) {
    let s = s.normalized();
    let kc = k.map_or(s.kc, |k| k.min(s.kc));
    let mc = m.map_or(s.mc, |m| m.div_ceil(s.mr) * s.mr).min(s.mc);
    let nc = n.map_or(s.nc, |n| n.div_ceil(s.nr) * s.nr).min(s.nc);
    (mc * kc, nc * kc)
}

/// The operand types of [`matmul_memref_func`] after `A`, `B`, `C`: the packed A and B panel
/// buffers (at least [`packed_lens`] elements).
pub const PACKED_1D: &str = "memref<?xf32>";

/// A private helper `func.func private @name(%A, %B, %C, %AP, %BP)` computing `C = A·B` with
/// `schedule` on [`STRIDED_2D`] operands (sizes read from the memrefs), packing into the
/// caller's [`PACKED_1D`] buffers `%AP`, `%BP` (sized with [`packed_lens`], typically views
/// of the kernel's scratch), for kernels that call a matmul from their own body (graph
/// contraction kernels with a general epilogue).
pub fn matmul_memref_func(name: &str, schedule: &MatmulSchedule) -> String {
    memref_func(name, schedule, false)
}

/// [`matmul_memref_func`] (`b_packed = false`) or [`matmul_memref_func_prepacked`].
fn memref_func(name: &str, schedule: &MatmulSchedule, b_packed: bool) -> String {
    let s = schedule.normalized();
    let t = STRIDED_2D;
    let pt = PACKED_1D;
    // with B packed, N comes from C and there is no run-time B panel buffer
    let (sig, n_of, b, bp) = if b_packed {
        (
            format!("%A: {t}, %BK: {pt}, %C: {t}, %AP: {pt}"),
            "%C",
            "",
            "%BK",
        )
    } else {
        (
            format!("%A: {t}, %B: {t}, %C: {t}, %AP: {pt}, %BP: {pt}"),
            "%B",
            "%B",
            "%BP",
        )
    };
    let ops = Operands {
        a: "%A",
        b,
        bias: None,
        c: "%C",
        ap: "%AP",
        bp,
        b_packed,
    };
    format!(
        "func.func private @{name}({sig}) {{\n  %mm_i0 = arith.constant 0 : index\n  %mm_i1 = arith.constant 1 : index\n  %mm_m = memref.dim %A, %mm_i0 : {t}\n  %mm_k = memref.dim %A, %mm_i1 : {t}\n  %mm_n = memref.dim {n_of}, %mm_i1 : {t}\n{}  return\n}}\n",
        body(&s, &ops, "%mm_m", "%mm_n", "%mm_k").replace("memref<?x?xf32>", t)
    )
}

/// B (`K×N`, row-major `b`) packed at compile time in the order the micro-kernel of
/// `schedule` reads it, for [`matmul_memref_func_prepacked`]: for each `nc` column block
/// `jc` and `kc` depth block `pc`, at `jc·K + ncp·pc` (`ncp` = the block's columns rounded
/// up to `nr`), its `nr`-wide panels one after the other, each `kc` rows of `nr` values,
/// zero-padded past `N`.
pub fn pack_b(b: &[f32], k: usize, n: usize, schedule: &MatmulSchedule) -> Vec<f32> {
    let s = schedule.normalized();
    assert_eq!(b.len(), k * n, "B is K×N");
    let (nr, kc, nc) = (s.nr, s.kc, s.nc);
    let mut out = Vec::new();
    for jc in (0..n).step_by(nc) {
        let ncl = nc.min(n - jc);
        let ncp = ncl.div_ceil(nr) * nr;
        out.resize(jc * k + ncp * k, 0.0);
        for pc in (0..k).step_by(kc) {
            let kcl = kc.min(k - pc);
            let base = jc * k + ncp * pc;
            for jp in (0..ncl).step_by(nr) {
                for kk in 0..kcl {
                    let row = &b[(pc + kk) * n..(pc + kk + 1) * n];
                    let dst = base + jp * kcl + kk * nr;
                    let cols = nr.min(ncl - jp);
                    out[dst..dst + cols].copy_from_slice(&row[jc + jp..jc + jp + cols]);
                }
            }
        }
    }
    out
}

/// Like [`matmul_memref_func`] with B packed at compile time ([`pack_b`]): a private
/// `func.func private @name(%A, %BK, %C, %AP)` (`%BK: memref<?xf32>` the packed constant;
/// `K`, `N` read from `A` and `C`). No per-call packing of B: each thread of a row-split
/// kernel would repack all of it.
pub fn matmul_memref_func_prepacked(name: &str, schedule: &MatmulSchedule) -> String {
    memref_func(name, schedule, true)
}

/// The buffers of [`body`]: SSA names of `A`, `B`, `C` (`memref<?x?xf32>`), the bias
/// (`memref<?xf32>`), the packed A and B panel buffers (`memref<?xf32>`, at least
/// [`packed_lens`] long); with `b_packed`, `bp` is B packed by [`pack_b`] and `b` unused.
struct Operands<'a> {
    a: &'a str,
    b: &'a str,
    bias: Option<&'a str>,
    c: &'a str,
    ap: &'a str,
    bp: &'a str,
    b_packed: bool,
}

/// The kernel body (after the memrefs and sizes are available) over the buffers `ops`;
/// `m`, `n`, `k` are SSA names of `index` values. The body defines SSA names starting with
/// `%c`, `%a`, `%b`, ... and must not share a region with other code using those names.
fn body(s: &MatmulSchedule, ops: &Operands, m: &str, n: &str, k: &str) -> String {
    let Operands {
        a,
        b,
        bias,
        c,
        ap,
        bp,
        b_packed,
    } = *ops;
    let (mr, nr, vw) = (s.mr, s.nr, s.vector_width);
    let nv = nr / vw;
    let vt = format!("vector<{vw}xf32>");
    let mt = format!("vector<{vw}xi1>");
    let bias_relu = bias.is_some();
    let mut t = String::new();
    let w = &mut t;
    // The packed buffers come from the caller (scratch memory): at most mc×kc and kc×nc.
    let ap_len = "?";
    let bp_len = "?";
    let _ = writeln!(
        w,
        r#"  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %cmr = arith.constant {mr} : index
  %cnr = arith.constant {nr} : index
  %cmc = arith.constant {mc} : index
  %ckc = arith.constant {kc} : index
  %cnc = arith.constant {nc} : index
  %zf = arith.constant 0.0 : f32
  %zv = arith.constant dense<0.0> : {vt}
  scf.for %jc = %c0 to {n} step %cnc {{
    %nrem = arith.subi {n}, %jc : index
    %nc = arith.minsi %cnc, %nrem : index
    scf.for %pc = %c0 to {k} step %ckc {{
      %krem = arith.subi {k}, %pc : index
      %kc = arith.minsi %ckc, %krem : index
      %first = arith.cmpi eq, %pc, %c0 : index
      %pend = arith.addi %pc, %kc : index
      %last = arith.cmpi sge, %pend, {k} : index"#,
        mc = s.mc,
        kc = s.kc,
        nc = s.nc,
    );
    if b_packed {
        // this (jc, pc) block of the packed constant starts at jc·K + ncp·pc
        let _ = writeln!(
            w,
            r#"      %cnrm1 = arith.constant {nrm1} : index
      %ncr0 = arith.addi %nc, %cnrm1 : index
      %ncr1 = arith.divui %ncr0, %cnr : index
      %ncp = arith.muli %ncr1, %cnr : index
      %bbj = arith.muli %jc, {k} : index
      %bbp = arith.muli %ncp, %pc : index
      %bbo = arith.addi %bbj, %bbp : index"#,
            nrm1 = nr - 1
        );
    } else {
        emit_pack_b(w, s, b, bp);
    }
    let _ = writeln!(
        w,
        r#"      scf.for %ic = %c0 to {m} step %cmc {{
        %mrem = arith.subi {m}, %ic : index
        %mc = arith.minsi %cmc, %mrem : index
        scf.for %ip = %c0 to %mc step %cmr {{
          %nrows = arith.subi %mc, %ip : index
          %abase = arith.muli %ip, %kc : index
          %arow0 = arith.addi %ic, %ip : index"#
    );
    for r in 0..mr {
        let _ = writeln!(
            w,
            r#"          %av{r} = arith.cmpi slt, %cr{r}, %nrows : index
          %arr{r} = arith.addi %arow0, %cr{r} : index
          %ar{r} = arith.select %av{r}, %arr{r}, %arow0 : index"#
        );
    }
    // k outer, rows inner: mr contiguous read streams, one contiguous write stream.
    let _ = writeln!(
        w,
        r#"          scf.for %kk = %c0 to %kc step %c1 {{
            %acol = arith.addi %pc, %kk : index
            %ak = arith.muli %kk, %cmr : index
            %ak2 = arith.addi %abase, %ak : index"#
    );
    for r in 0..mr {
        let _ = writeln!(
            w,
            r#"            %ax{r} = memref.load {a}[%ar{r}, %acol] : memref<?x?xf32>
            %ay{r} = arith.select %av{r}, %ax{r}, %zf : f32
            %ad{r} = arith.addi %ak2, %cr{r} : index
            memref.store %ay{r}, {ap}[%ad{r}] : memref<{ap_len}xf32>"#
        );
    }
    let _ = writeln!(w, "          }}");
    let bpb = if b_packed {
        "%bpb0 = arith.muli %jp, %kc : index\n          %bpb = arith.addi %bpb0, %bbo : index"
    } else {
        "%bpb = arith.muli %jp, %kc : index"
    };
    let _ = writeln!(
        w,
        r#"        }}
        scf.for %jp = %c0 to %nc step %cnr {{
          {bpb}
          scf.for %ip = %c0 to %mc step %cmr {{
            %apb = arith.muli %ip, %kc : index"#
    );
    // Micro-kernel.
    let accs: Vec<String> = (0..mr)
        .flat_map(|r| (0..nv).map(move |v| format!("%acc{r}_{v}")))
        .collect();
    let inits: Vec<String> = accs.iter().map(|a| format!("{a} = %zv")).collect();
    let res: Vec<String> = (0..mr)
        .flat_map(|r| (0..nv).map(move |v| format!("%res#{}", r * nv + v)))
        .collect();
    let _ = writeln!(
        w,
        r#"            %res:{cnt} = scf.for %kk = %c0 to %kc step %c1 iter_args({inits}) -> ({types}) {{
              %bo = arith.muli %kk, %cnr : index
              %bo2 = arith.addi %bpb, %bo : index
              %ao = arith.muli %kk, %cmr : index
              %ao2 = arith.addi %apb, %ao : index"#,
        cnt = accs.len(),
        inits = inits.join(", "),
        types = vec![vt.as_str(); accs.len()].join(", "),
    );
    for v in 0..nv {
        let _ = writeln!(
            w,
            r#"              %bi{v} = arith.addi %bo2, %cv{v} : index
              %bv{v} = vector.load {bp}[%bi{v}] : memref<{bp_len}xf32>, {vt}"#
        );
    }
    let mut outs = Vec::new();
    for r in 0..mr {
        let _ = writeln!(
            w,
            r#"              %ai{r} = arith.addi %ao2, %cr{r} : index
              %as{r} = memref.load {ap}[%ai{r}] : memref<{ap_len}xf32>
              %ab{r} = vector.broadcast %as{r} : f32 to {vt}"#
        );
        for v in 0..nv {
            let _ = writeln!(
                w,
                "              %f{r}_{v} = vector.fma %ab{r}, %bv{v}, %acc{r}_{v} : {vt}"
            );
            outs.push(format!("%f{r}_{v}"));
        }
    }
    let _ = writeln!(
        w,
        r#"              scf.yield {} : {}
            }}
            %i0 = arith.addi %ic, %ip : index
            %j0 = arith.addi %jc, %jp : index
            %mr_rem = arith.subi {m}, %i0 : index
            %nr_rem = arith.subi {n}, %j0 : index"#,
        outs.join(", "),
        vec![vt.as_str(); outs.len()].join(", "),
    );
    for v in 0..nv {
        let _ = writeln!(
            w,
            r#"            %cn{v} = arith.subi %nr_rem, %cv{v} : index
            %cj{v} = arith.addi %j0, %cv{v} : index"#
        );
        if let Some(bias) = &bias {
            let _ = writeln!(
                w,
                r#"            %bmk{v} = vector.create_mask %cn{v} : {mt}
            %bias{v} = vector.maskedload {bias}[%cj{v}], %bmk{v}, %zv : memref<?xf32>, {mt}, {vt} into {vt}"#
            );
        }
    }
    // Full tiles take plain vector loads/stores; edge tiles masked ones (vmaskmov is slow on
    // some cores, e.g. Zen 1).
    let _ = writeln!(
        w,
        r#"            %fm = arith.cmpi sge, %mr_rem, %cmr : index
            %fn = arith.cmpi sge, %nr_rem, %cnr : index
            %full = arith.andi %fm, %fn : i1
            scf.if %full {{"#
    );
    for masked in [false, true] {
        if masked {
            let _ = writeln!(w, "            }} else {{");
        }
        for r in 0..mr {
            if masked {
                let _ = writeln!(
                    w,
                    r#"            %cv_{r} = arith.cmpi slt, %cr{r}, %mr_rem : index
            %crr{r} = arith.addi %i0, %cr{r} : index
            %crow{r} = arith.select %cv_{r}, %crr{r}, %i0 : index"#
                );
            } else {
                let _ = writeln!(w, "            %crow{r} = arith.addi %i0, %cr{r} : index");
            }
            for v in 0..nv {
                let i = r * nv + v;
                if masked {
                    let _ = writeln!(
                        w,
                        r#"            %mn{r}_{v} = arith.select %cv_{r}, %cn{v}, %c0 : index
            %mk{r}_{v} = vector.create_mask %mn{r}_{v} : {mt}
            %old{r}_{v} = vector.maskedload {c}[%crow{r}, %cj{v}], %mk{r}_{v}, %zv : memref<?x?xf32>, {mt}, {vt} into {vt}"#
                    );
                } else {
                    let _ = writeln!(
                        w,
                        "            %old{r}_{v} = vector.load {c}[%crow{r}, %cj{v}] : memref<?x?xf32>, {vt}"
                    );
                }
                let _ = writeln!(
                    w,
                    r#"            %base{r}_{v} = arith.select %first, %zv, %old{r}_{v} : {vt}
            %sum{r}_{v} = arith.addf %base{r}_{v}, {acc} : {vt}"#,
                    acc = res[i]
                );
                let out = if bias_relu {
                    let _ = writeln!(
                        w,
                        r#"            %bs{r}_{v} = arith.addf %sum{r}_{v}, %bias{v} : {vt}
            %rl{r}_{v} = arith.maximumf %bs{r}_{v}, %zv : {vt}
            %out{r}_{v} = arith.select %last, %rl{r}_{v}, %sum{r}_{v} : {vt}"#
                    );
                    format!("%out{r}_{v}")
                } else {
                    format!("%sum{r}_{v}")
                };
                if masked {
                    let _ = writeln!(
                        w,
                        "            vector.maskedstore {c}[%crow{r}, %cj{v}], %mk{r}_{v}, {out} : memref<?x?xf32>, {mt}, {vt}"
                    );
                } else {
                    let _ = writeln!(
                        w,
                        "            vector.store {out}, {c}[%crow{r}, %cj{v}] : memref<?x?xf32>, {vt}"
                    );
                }
            }
        }
    }
    let _ = writeln!(w, "            }}");
    // With K = 0 the product is all zeros; the epilogue still applies.
    let zval = match &bias {
        Some(bias) => format!(
            "%zb = memref.load {bias}[%zj] : memref<?xf32>\n        %zval = arith.maximumf %zb, %zf : f32"
        ),
        None => "%zval = arith.constant 0.0 : f32".to_string(),
    };
    let _ = writeln!(
        w,
        r#"          }}
        }}
      }}
    }}
  }}
  %kzero = arith.cmpi eq, {k}, %c0 : index
  scf.if %kzero {{
    scf.for %zi = %c0 to {m} step %c1 {{
      scf.for %zj = %c0 to {n} step %c1 {{
        {zval}
        memref.store %zval, {c}[%zi, %zj] : memref<?x?xf32>
      }}
    }}
  }}"#
    );
    // Index constants used above.
    let mut consts = String::new();
    for r in 0..mr {
        let _ = writeln!(consts, "  %cr{r} = arith.constant {r} : index");
    }
    for v in 0..nv {
        let _ = writeln!(consts, "  %cv{v} = arith.constant {} : index", v * vw);
    }
    consts.push_str(&t);
    consts
}

/// Emits the run-time packing of the `(jc, pc)` block of B (`b`, `memref<?x?xf32>`) into
/// `bp`: `nr`-wide panels of `kc` rows, masked (zero) past `N`. Inside [`body`]'s `pc` loop.
fn emit_pack_b(w: &mut String, s: &MatmulSchedule, b: &str, bp: &str) {
    let (nr, vw) = (s.nr, s.vector_width);
    let nv = nr / vw;
    let vt = format!("vector<{vw}xf32>");
    let mt = format!("vector<{vw}xi1>");
    let _ = writeln!(
        w,
        r#"      scf.for %jp = %c0 to %nc step %cnr {{
        %ncl = arith.subi %nc, %jp : index
        %bbase = arith.muli %jp, %kc : index
        %bcol = arith.addi %jc, %jp : index"#
    );
    for v in 0..nv {
        let _ = writeln!(
            w,
            r#"        %bcn{v} = arith.subi %ncl, %cv{v} : index
        %bm{v} = vector.create_mask %bcn{v} : {mt}
        %bcol{v} = arith.addi %bcol, %cv{v} : index"#
        );
    }
    let _ = writeln!(
        w,
        r#"        scf.for %kk = %c0 to %kc step %c1 {{
          %brow = arith.addi %pc, %kk : index
          %bk = arith.muli %kk, %cnr : index
          %bdst = arith.addi %bbase, %bk : index"#
    );
    for v in 0..nv {
        let _ = writeln!(
            w,
            r#"          %bx{v} = vector.maskedload {b}[%brow, %bcol{v}], %bm{v}, %zv : memref<?x?xf32>, {mt}, {vt} into {vt}
          %bd{v} = arith.addi %bdst, %cv{v} : index
          vector.store %bx{v}, {bp}[%bd{v}] : memref<?xf32>, {vt}"#
        );
    }
    let _ = writeln!(w, "        }}\n      }}");
}

/// Lowers `scf` + `memref` + `vector` code to the LLVM dialect.
pub const VECTOR_PIPELINE: &str = "builtin.module(convert-vector-to-scf,convert-scf-to-cf,expand-strided-metadata,lower-affine,convert-vector-to-llvm,finalize-memref-to-llvm,convert-to-llvm,reconcile-unrealized-casts)";
