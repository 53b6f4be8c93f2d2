//! f32 MatMul scheduled by MLIR's transform dialect instead of Kiln's own loop generator.
//!
//! The kernel body is one `linalg.matmul` on tensors (`bufferization.to_tensor` views of the
//! ABI memrefs, the result materialized in place into `C`); a transform script
//! (`transform.named_sequence @__transform_main`, in a nested module) run by the
//! `transform-interpreter` pass of the kernel's pipeline schedules it with the sizes of a
//! [`MatmulSchedule`], so they stay autotuner parameters:
//!
//! ```text
//! tile_using_for [0, nc, kc]           jc, pc loops (B block kc×nc)
//! tile_using_for [mc, 0, 0]            ic loop     (A block mc×kc)
//! Transform, TransformUkernel (packed):
//!   tile [mr, nr, 0], interchange       jr, ir loops: mr×nr×kc register tiles
//!   structured.pad (zeros, static)      every tile padded to a static mr×nr×kc
//!   hoist_pad A by 2, B by 2 loops      the pads become the packed blocks, built per ic
//!                                       block: A as mc/mr panels mr×kc, B as nc/nr panels
//!                                       kc×nr (BLIS packing, zero-padded edges)
//! Transform:
//!   tile [0, 0, 1]                      k loop of the tile
//!   vectorize_children_and_apply_patterns, loop.hoist_loop_invariant_subsets (C tile in
//!   registers across k), lower_contraction(outerproduct) + lower_outerproduct -> vector.fma
//! TransformUkernel:
//!   func.cast_and_call + apply_dce      each packed tile becomes a call of `<kernel>_uk_t`
//!                                       (tensors), a wrapper calling Kiln's register-blocked
//!                                       micro-kernel `<kernel>_uk` on the panels' buffers
//! one_shot_bufferize {memcpy_op = "linalg.copy"}   (packing copies become loops)
//! TransformNoPack: tile [0, nr, 0] + loop.peel, tile [mr, 0, 0] + loop.peel, tile [0, 0, 1],
//!   vectorize, hoist, lower as above; operands read in place; edge rows one vectorized row
//!   at a time, edge columns scalar loops; bufferized by the `one-shot-bufferize` pass.
//! ```
//!
//! The packed buffers are `memref.alloc`s hoisted to the function entry and freed by MLIR's
//! buffer deallocation pipeline. The ukernel wrapper is bufferized across the function
//! boundary and inlined; the micro-kernel call is `no_inline` (LLVM may still inline it).
//! `convert-linalg-to-std`'s `library_call` route does not work for the call: it is a full
//! conversion that rejects the LLVM dialect ops of the ABI prologue. `C` is zeroed first and
//! the optional [`Epilogue::BiasRelu`] runs as a vectorized pass over `C` afterwards (not
//! fused into the register tile as in [`super::matmul`]). Measurements: docs/performance.md,
//! "MatMul: transform dialect vs micro-kernel".

use super::abi::{Dim, Prologue};
use super::matmul::{matmul, Epilogue, MatmulSchedule, STRIDED_2D};
use super::{Kernel, KernelSignature};
use std::fmt::Write as _;

/// How a MatMul is lowered: the choice the autotuner makes next to the tile sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulLowering {
    /// Kiln's BLIS-style generator ([`super::matmul`]): packing + 6×16 FMA micro-kernel.
    #[default]
    Generator,
    /// `linalg.matmul` tiled, packed (`structured.pad` + `hoist_pad`), vectorized and
    /// lowered to FMAs by a transform-dialect script.
    Transform,
    /// Like [`MatmulLowering::Transform`] without packing: operands read in place, edge
    /// tiles split off by `loop.peel`.
    TransformNoPack,
    /// The transform-dialect cache/register tiling and packing, each packed mr×nr×kc tile a
    /// call of Kiln's register-blocked micro-kernel (IREE-style ukernel).
    TransformUkernel,
}

/// Attribute marking the `linalg.matmul` the transform script schedules.
const MARK: &str = "__kiln_xform__";

/// The lowering passes after bufferization (those of graph kernels, but multi-dimensional
/// vector transfers, such as the packing copies, are unrolled into 1-D ones rather than
/// staged through a stack buffer).
const TAIL: &str = "func.func(convert-linalg-to-loops),convert-vector-to-scf{full-unroll=true target-rank=1},convert-scf-to-cf,expand-strided-metadata,lower-affine,convert-math-to-llvm,convert-math-to-libm,convert-vector-to-llvm,finalize-memref-to-llvm,convert-to-llvm,reconcile-unrealized-casts";

/// Hoists the buffers bufferization allocates (the packed blocks) out of the loops and frees
/// them (also a graph kernel's other temporaries, which must then have no explicit
/// `memref.dealloc`). scratch: these are `memref.alloc`s for now.
const DEALLOC: &str = "func.func(buffer-hoisting,buffer-loop-hoisting),buffer-deallocation-pipeline,convert-bufferization-to-memref";

/// The pass pipeline of a kernel containing a matmul lowered with `lowering`
/// ([`MatmulLowering::Generator`] gives the graph-kernel pipeline).
pub fn pipeline(lowering: MatmulLowering) -> String {
    match lowering {
        MatmulLowering::Generator => super::lower::GRAPH_KERNEL_PIPELINE.to_string(),
        MatmulLowering::TransformNoPack => format!(
            "builtin.module(transform-interpreter,canonicalize,one-shot-bufferize,cse,canonicalize,symbol-dce,{DEALLOC},{TAIL})"
        ),
        // The packed buffers (static size) are hoisted to the function entry and freed at its
        // end by the buffer deallocation pipeline.
        // These scripts bufferize themselves (with `linalg.copy` as the copy op, so the
        // packing copies become loops rather than calls of MLIR's `memrefCopy` runtime).
        MatmulLowering::Transform => format!(
            "builtin.module(transform-interpreter,canonicalize,cse,canonicalize,symbol-dce,{DEALLOC},{TAIL})"
        ),
        MatmulLowering::TransformUkernel => format!(
            "builtin.module(transform-interpreter,canonicalize,inline,cse,canonicalize,symbol-dce,{DEALLOC},{TAIL})"
        ),
    }
}

/// Generates the matmul kernel `name` lowered as `schedule.lowering` says: same ABI as
/// [`matmul`] (arguments `[A, B, C]` or `[A, B, bias, C]`, dims `[M, N, K]`, one task).
pub fn matmul_kernel(name: &str, schedule: &MatmulSchedule, epilogue: Epilogue) -> Kernel {
    if schedule.lowering == MatmulLowering::Generator {
        return matmul(name, schedule, epilogue);
    }
    let s = schedule.normalized();
    let bias_relu = epilogue == Epilogue::BiasRelu;
    let mut p = Prologue::new();
    let a = p.memref_f32(0, &[Dim::Sym(0), Dim::Sym(2)]);
    let b = p.memref_f32(1, &[Dim::Sym(2), Dim::Sym(1)]);
    let bias = bias_relu.then(|| p.memref_f32(2, &[Dim::Sym(1)]));
    let c = p.memref_f32(if bias_relu { 3 } else { 2 }, &[Dim::Sym(0), Dim::Sym(1)]);
    let m = p.dim_index(0);
    let n = p.dim_index(1);
    p.push(&body(
        &s,
        "memref<?x?xf32>",
        [&a, &b, &c],
        bias.as_deref(),
        &m,
        &n,
    ));
    let mut mlir = p.finish(name);
    mlir.push_str(&support(name, &s));
    Kernel {
        signature: KernelSignature {
            name: name.to_string(),
            inputs: if bias_relu { 3 } else { 2 },
            outputs: 1,
            dims: vec!["M".into(), "N".into(), "K".into()],
            tasks: 1,
            // scratch: the transform schedules' packed panels are `memref.alloc`s still.
            scratch_bytes: 0,
        },
        mlir,
        pipeline: pipeline(s.lowering),
    }
}

/// Like [`super::matmul::matmul_memref_func`] for any lowering: a private
/// `func.func @name(%A, %B, %C)` on [`STRIDED_2D`] operands computing `C = A·B`, plus what
/// it needs at module level (micro-kernel, transform script). The module must then be
/// lowered with [`pipeline`]`(schedule.lowering)`; at most one transform-lowered matmul per
/// module.
pub fn matmul_memref_func(name: &str, schedule: &MatmulSchedule) -> String {
    if schedule.lowering == MatmulLowering::Generator {
        return super::matmul::matmul_memref_func(name, schedule);
    }
    let s = schedule.normalized();
    let t = STRIDED_2D;
    // The packed-panel arguments of the generator's helper (same call site); the transform
    // schedules pack into buffers of their own.
    let pt = super::matmul::PACKED_1D;
    let mut f = format!(
        "func.func private @{name}(%A: {t}, %B: {t}, %C: {t}, %AP: {pt}, %BP: {pt}) {{\n  %xm_i0 = arith.constant 0 : index\n  %xm_i1 = arith.constant 1 : index\n  %xm_m = memref.dim %A, %xm_i0 : {t}\n  %xm_n = memref.dim %B, %xm_i1 : {t}\n"
    );
    f.push_str(&body(&s, t, ["%A", "%B", "%C"], None, "%xm_m", "%xm_n"));
    f.push_str("  return\n}\n");
    f.push_str(&support(name, &s));
    f
}

/// The micro-kernel (ukernel variant) and the nested module holding the transform script.
fn support(name: &str, s: &MatmulSchedule) -> String {
    let mut t = String::new();
    let uk = format!("{name}_uk");
    if s.lowering == MatmulLowering::TransformUkernel {
        t.push_str(&ukernel(&uk, s));
        // The tensor-level entry the script calls in place of each tile: the micro-kernel
        // updates the C tile's buffer in place (bufferized across the function boundary,
        // then inlined by `inline`, which leaves the `no_inline` micro-kernel call).
        let d = "memref<?x?xf32, strided<[?, ?], offset: ?>>";
        let (mr, nr, kc) = (s.mr, s.nr, s.kc);
        let (ta, tb, tc) = (
            format!("tensor<{mr}x{kc}xf32>"),
            format!("tensor<{kc}x{nr}xf32>"),
            "tensor<?x?xf32>",
        );
        let sd = |shape: &str| format!("memref<{shape}xf32, strided<[?, ?], offset: ?>>");
        let (ma, mb) = (sd(&format!("{mr}x{kc}")), sd(&format!("{kc}x{nr}")));
        // A and B: the packed, zero-padded panels; C: the (possibly partial) tile of C.
        let _ = writeln!(
            t,
            "func.func private @{uk}_t(%a: {ta}, %b: {tb}, %c: {tc} {{bufferization.writable = true}}) -> {tc} {{\n  %am = bufferization.to_buffer %a read_only : {ta} to {ma}\n  %bm = bufferization.to_buffer %b read_only : {tb} to {mb}\n  %cm = bufferization.to_buffer %c : {tc} to {d}\n  %ad = memref.cast %am : {ma} to {d}\n  %bd = memref.cast %bm : {mb} to {d}\n  func.call @{uk}(%ad, %bd, %cm) {{no_inline}} : ({d}, {d}, {d}) -> ()\n  %r = bufferization.to_tensor %cm restrict writable : {d} to {tc}\n  return %r : {tc}\n}}"
        );
    }
    let _ = write!(
        t,
        "module attributes {{transform.with_named_sequence}} {{\n{}}}\n",
        transform_script(s, &uk)
    );
    t
}

/// The kernel body on memrefs `[a, b, c]` of type `mt` (`m`, `n`: `index` values): zero `C`,
/// the marked `linalg.matmul` on tensors, the optional bias + ReLU pass. SSA names start
/// with `%x`.
fn body(
    s: &MatmulSchedule,
    mt: &str,
    [a, b, c]: [&str; 3],
    bias: Option<&str>,
    m: &str,
    n: &str,
) -> String {
    let vw = s.vector_width;
    let vt = format!("vector<{vw}xf32>");
    let mk = format!("vector<{vw}xi1>");
    let tt = "tensor<?x?xf32>";
    let mut t = String::new();
    let rows = |t: &mut String, inner: &str| {
        let _ = writeln!(
            t,
            "  scf.for %xi = %x0 to {m} step %x1 {{\n    scf.for %xj = %x0 to {n} step %xvw {{\n      %xrem = arith.subi {n}, %xj : index\n      %xmask = vector.create_mask %xrem : {mk}\n{inner}    }}\n  }}"
        );
    };
    let _ = writeln!(
        t,
        "  %x0 = arith.constant 0 : index\n  %x1 = arith.constant 1 : index\n  %xvw = arith.constant {vw} : index\n  %xzv = arith.constant dense<0.0> : {vt}"
    );
    // scratch: none; C is zeroed in place, then accumulated into tile by tile.
    rows(
        &mut t,
        &format!("      vector.maskedstore {c}[%xi, %xj], %xmask, %xzv : {mt}, {mk}, {vt}\n"),
    );
    let _ = writeln!(
        t,
        "  %xa = bufferization.to_tensor {a} restrict : {mt} to {tt}\n  %xb = bufferization.to_tensor {b} restrict : {mt} to {tt}\n  %xc = bufferization.to_tensor {c} restrict writable : {mt} to {tt}\n  %xr = linalg.matmul {{{MARK}}} ins(%xa, %xb : {tt}, {tt}) outs(%xc : {tt}) -> {tt}\n  bufferization.materialize_in_destination %xr in restrict writable {c} : ({tt}, {mt}) -> ()"
    );
    if let Some(bias) = bias {
        rows(
            &mut t,
            &format!(
                "      %xo = vector.maskedload {c}[%xi, %xj], %xmask, %xzv : {mt}, {mk}, {vt} into {vt}\n      %xbv = vector.maskedload {bias}[%xj], %xmask, %xzv : memref<?xf32>, {mk}, {vt} into {vt}\n      %xs = arith.addf %xo, %xbv : {vt}\n      %xy = arith.maximumf %xs, %xzv : {vt}\n      vector.maskedstore {c}[%xi, %xj], %xmask, %xy : {mt}, {mk}, {vt}\n"
            ),
        );
    }
    t
}

/// The transform script scheduling the marked matmul with `s` (`uk`: the micro-kernel's name
/// for [`MatmulLowering::TransformUkernel`]).
pub fn transform_script(s: &MatmulSchedule, uk: &str) -> String {
    let (mr, nr, mc, kc, nc) = (s.mr, s.nr, s.mc, s.kc, s.nc);
    let any = "!transform.any_op";
    let fo = "!transform.op<\"scf.for\">";
    let packed = s.lowering != MatmulLowering::TransformNoPack;
    let mut t = format!(
        "  transform.named_sequence private @__transform_main(%root: {any} {{{}}}) {{\n",
        if packed {
            "transform.consumed"
        } else {
            "transform.readonly"
        }
    );
    let w = &mut t;
    let _ = writeln!(
        w,
        r#"    %mm = transform.structured.match ops{{["linalg.matmul"]}} attributes {{{MARK}}} in %root : ({any}) -> {any}
    %f = transform.get_parent_op %mm {{op_name = "func.func"}} : ({any}) -> {any}
    %t1, %l1:2 = transform.structured.tile_using_for %mm tile_sizes [0, {nc}, {kc}] : ({any}) -> ({any}, {any}, {any})
    %t2, %l2 = transform.structured.tile_using_for %t1 tile_sizes [{mc}, 0, 0] : ({any}) -> ({any}, {any})"#
    );
    if packed {
        // Register tiles (jr outer, ir inner), padded to a static mr×nr×kc with zeros; the
        // A and B pads hoisted out of the ir and jr loops become the packed blocks: A as
        // mc/mr panels of mr×kc, B as nc/nr panels of kc×nr, packed once per ic block.
        let _ = writeln!(
            w,
            r#"    %t3, %l3:2 = transform.structured.tile_using_for %t2 tile_sizes [{mr}, {nr}, 0] interchange = [1, 0, 2] : ({any}) -> ({any}, {any}, {any})
    %p, %pads, %cb = transform.structured.pad %t3 {{padding_values = [0.0 : f32, 0.0 : f32, 0.0 : f32], padding_dimensions = [0, 1, 2], nofold_flags = [1, 1, 0], copy_back_op = "none"}} : ({any}) -> ({any}, {any}, {any})
    %pa = transform.get_producer_of_operand %p[0] : ({any}) -> {any}
    %pb = transform.get_producer_of_operand %p[1] : ({any}) -> {any}
    %ha = transform.structured.hoist_pad %pa by 2 loops : ({any}) -> {any}
    %hb = transform.structured.hoist_pad %pb by 2 loops : ({any}) -> {any}
    %tile = transform.structured.match ops{{["linalg.matmul"]}} in %f : ({any}) -> {any}"#
        );
    }
    if s.lowering == MatmulLowering::TransformUkernel {
        let _ = writeln!(
            w,
            r#"    %abp = transform.get_operand %tile[0, 1] : ({any}) -> !transform.any_value
    %cpad = transform.get_producer_of_operand %tile[2] : ({any}) -> {any}
    %ctile = transform.get_operand %cpad[0] : ({any}) -> !transform.any_value
    %ins = transform.merge_handles %abp, %ctile : !transform.any_value
    %unpad = transform.get_consumers_of_result %tile[0] : ({any}) -> {any}
    %out = transform.get_result %unpad[0] : ({any}) -> !transform.any_value
    %call = transform.func.cast_and_call @{uk}_t(%ins) -> %out before %tile : ({any}, !transform.any_value, !transform.any_value) -> {any}
    transform.apply_dce to %f : {any}
    %fv = transform.structured.vectorize_children_and_apply_patterns %f : ({any}) -> {any}
    %bz = transform.bufferization.one_shot_bufferize %root {{bufferize_function_boundaries = true, memcpy_op = "linalg.copy"}} : ({any}) -> {any}
    transform.yield
  }}"#
        );
        return t;
    }
    if s.lowering == MatmulLowering::Transform {
        let _ = writeln!(
            w,
            r#"    %t5, %lk = transform.structured.tile_using_for %tile tile_sizes [0, 0, 1] : ({any}) -> ({any}, {any})"#
        );
    } else {
        let _ = writeln!(
            w,
            r#"    %t3, %ln = transform.structured.tile_using_for %t2 tile_sizes [0, {nr}, 0] : ({any}) -> ({any}, {fo})
    %main_n, %rem_n = transform.loop.peel %ln : ({fo}) -> ({fo}, {fo})
    %mm_n = transform.structured.match ops{{["linalg.matmul"]}} in %main_n : ({fo}) -> {any}
    %t4, %lm = transform.structured.tile_using_for %mm_n tile_sizes [{mr}, 0, 0] : ({any}) -> ({any}, {fo})
    %main_m, %rem_m = transform.loop.peel %lm : ({fo}) -> ({fo}, {fo})
    %full = transform.structured.match ops{{["linalg.matmul"]}} in %main_m : ({fo}) -> {any}
    %t5, %lk = transform.structured.tile_using_for %full tile_sizes [0, 0, 1] : ({any}) -> ({any}, {any})
    %edge = transform.structured.match ops{{["linalg.matmul"]}} in %rem_m : ({fo}) -> {any}
    %t6, %lr = transform.structured.tile_using_for %edge tile_sizes [1, 0, 0] : ({any}) -> ({any}, {any})
    %t7, %lk2 = transform.structured.tile_using_for %t6 tile_sizes [0, 0, 1] : ({any}) -> ({any}, {any})"#
        );
    }
    let _ = writeln!(
        w,
        r#"    %fv = transform.structured.vectorize_children_and_apply_patterns %f : ({any}) -> {any}
    transform.apply_patterns to %fv {{
      transform.apply_patterns.canonicalization
      transform.apply_patterns.tensor.fold_tensor_subset_ops_into_vector_transfers
    }} : {any}
    %loops = transform.structured.match ops{{["scf.for"]}} in %fv : ({any}) -> {any}
    transform.loop.hoist_loop_invariant_subsets %loops : {any}
    transform.apply_patterns to %fv {{
      transform.apply_patterns.vector.lower_contraction lowering_strategy = "outerproduct"
      transform.apply_patterns.vector.transfer_permutation_patterns
      transform.apply_patterns.vector.lower_outerproduct
      transform.apply_patterns.canonicalization
    }} : {any}"#
    );
    if packed {
        let _ = write!(
            t,
            r#"    %bz = transform.bufferization.one_shot_bufferize %root {{memcpy_op = "linalg.copy"}} : ({any}) -> {any}"#
        );
        t.push('\n');
    }
    t.push_str("    transform.yield\n  }\n");
    t
}

/// Kiln's register-blocked micro-kernel (the same scheme as [`super::matmul`]'s, on an
/// A panel mr×kc and a B panel kc×nr instead of its packed layout) as a function on one
/// tile: `C[m×n] += A[m×kc]·B[kc×n]` with `m ≤ mr`, `n ≤ nr` read from the operands (fully
/// dynamic strided memrefs, the layout of a bufferized function boundary). mr×(nr/vw)
/// vector accumulators, per k: nr/vw loads of B, mr broadcasts of A, `vector.fma`; full
/// tiles use plain loads/stores, partial ones masks.
fn ukernel(name: &str, s: &MatmulSchedule) -> String {
    let (mr, nr, vw) = (s.mr, s.nr, s.vector_width);
    let nv = nr / vw;
    let dynt = "memref<?x?xf32, strided<[?, ?], offset: ?>>";
    let st = STRIDED_2D;
    let vt = format!("vector<{vw}xf32>");
    let mk = format!("vector<{vw}xi1>");
    let mut t = format!("func.func private @{name}(%ua: {dynt}, %ub: {dynt}, %uc: {dynt}) {{\n");
    let w = &mut t;
    let _ = writeln!(
        w,
        "  %c0 = arith.constant 0 : index\n  %c1 = arith.constant 1 : index\n  %cmr = arith.constant {mr} : index\n  %cnr = arith.constant {nr} : index\n  %zv = arith.constant dense<0.0> : {vt}"
    );
    for r in 0..mr {
        let _ = writeln!(w, "  %cr{r} = arith.constant {r} : index");
    }
    for v in 0..nv {
        let _ = writeln!(w, "  %cv{v} = arith.constant {} : index", v * vw);
    }
    // The operands have unit inner stride (row-major tiles): say so, for vector loads.
    for x in ["a", "b", "c"] {
        let _ = writeln!(
            w,
            "  %{x}base, %{x}off, %{x}sz:2, %{x}st:2 = memref.extract_strided_metadata %u{x} : {dynt} -> memref<f32>, index, index, index, index, index\n  %{x} = memref.reinterpret_cast %{x}base to offset: [%{x}off], sizes: [%{x}sz#0, %{x}sz#1], strides: [%{x}st#0, 1] : memref<f32> to {st}"
        );
    }
    let _ = writeln!(
        w,
        "  %m = memref.dim %c, %c0 : {st}\n  %n = memref.dim %c, %c1 : {st}\n  %k = memref.dim %a, %c1 : {st}\n  %fm = arith.cmpi eq, %m, %cmr : index\n  %fn = arith.cmpi eq, %n, %cnr : index\n  %full = arith.andi %fm, %fn : i1\n  scf.if %full {{"
    );
    let cnt = mr * nv;
    let types = vec![vt.as_str(); cnt].join(", ");
    for masked in [false, true] {
        if masked {
            let _ = writeln!(w, "  }} else {{");
            for v in 0..nv {
                let _ = writeln!(
                    w,
                    "    %nl{v} = arith.subi %n, %cv{v} : index\n    %bm{v} = vector.create_mask %nl{v} : {mk}"
                );
            }
            for r in 0..mr {
                let _ = writeln!(
                    w,
                    "    %rv{r} = arith.cmpi slt, %cr{r}, %m : index\n    %rs{r} = arith.select %rv{r}, %cr{r}, %c0 : index"
                );
                for v in 0..nv {
                    let _ = writeln!(
                        w,
                        "    %rn{r}_{v} = arith.select %rv{r}, %nl{v}, %c0 : index\n    %cm{r}_{v} = vector.create_mask %rn{r}_{v} : {mk}"
                    );
                }
            }
        }
        let row = |r: usize| {
            if masked {
                format!("%rs{r}")
            } else {
                format!("%cr{r}")
            }
        };
        let mut inits = Vec::new();
        for r in 0..mr {
            for v in 0..nv {
                let ri = row(r);
                if masked {
                    let _ = writeln!(
                        w,
                        "    %i{r}_{v} = vector.maskedload %c[{ri}, %cv{v}], %cm{r}_{v}, %zv : {st}, {mk}, {vt} into {vt}"
                    );
                } else {
                    let _ = writeln!(
                        w,
                        "    %i{r}_{v} = vector.load %c[{ri}, %cv{v}] : {st}, {vt}"
                    );
                }
                inits.push(format!("%acc{r}_{v} = %i{r}_{v}"));
            }
        }
        let _ = writeln!(
            w,
            "    %res:{cnt} = scf.for %kk = %c0 to %k step %c1 iter_args({}) -> ({types}) {{",
            inits.join(", ")
        );
        for v in 0..nv {
            if masked {
                let _ = writeln!(
                    w,
                    "      %bv{v} = vector.maskedload %b[%kk, %cv{v}], %bm{v}, %zv : {st}, {mk}, {vt} into {vt}"
                );
            } else {
                let _ = writeln!(w, "      %bv{v} = vector.load %b[%kk, %cv{v}] : {st}, {vt}");
            }
        }
        let mut outs = Vec::new();
        for r in 0..mr {
            let _ = writeln!(
                w,
                "      %as{r} = memref.load %a[{}, %kk] : {st}\n      %ab{r} = vector.broadcast %as{r} : f32 to {vt}",
                row(r)
            );
            for v in 0..nv {
                let _ = writeln!(
                    w,
                    "      %f{r}_{v} = vector.fma %ab{r}, %bv{v}, %acc{r}_{v} : {vt}"
                );
                outs.push(format!("%f{r}_{v}"));
            }
        }
        let _ = writeln!(w, "      scf.yield {} : {types}\n    }}", outs.join(", "));
        for r in 0..mr {
            for v in 0..nv {
                let i = r * nv + v;
                let ri = row(r);
                if masked {
                    let _ = writeln!(
                        w,
                        "    vector.maskedstore %c[{ri}, %cv{v}], %cm{r}_{v}, %res#{i} : {st}, {mk}, {vt}"
                    );
                } else {
                    let _ = writeln!(
                        w,
                        "    vector.store %res#{i}, %c[{ri}, %cv{v}] : {st}, {vt}"
                    );
                }
            }
        }
    }
    let _ = writeln!(w, "  }}\n  return\n}}");
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::pipeline::kernel_llvm_ir;

    fn schedule(lowering: MatmulLowering) -> MatmulSchedule {
        MatmulSchedule {
            lowering,
            ..MatmulSchedule::default()
        }
    }

    #[test]
    fn transform_kernel_lowers_to_fmas() {
        let k = matmul_kernel(
            "mmx",
            &schedule(MatmulLowering::Transform),
            Epilogue::BiasRelu,
        );
        let ir = kernel_llvm_ir(&k).unwrap_or_else(|e| panic!("{e}\n{}", k.mlir));
        assert!(
            ir.contains("define void @mmx(ptr %0, ptr %1, ptr %2)"),
            "{ir}"
        );
        assert!(ir.contains("@llvm.fmuladd.v"), "{ir}");
    }

    #[test]
    fn ukernel_kernel_calls_the_micro_kernel() {
        let k = matmul_kernel(
            "mmu",
            &schedule(MatmulLowering::TransformUkernel),
            Epilogue::None,
        );
        let ir = kernel_llvm_ir(&k).unwrap_or_else(|e| panic!("{e}\n{}", k.mlir));
        assert!(
            ir.contains("define void @mmu(ptr %0, ptr %1, ptr %2)"),
            "{ir}"
        );
        assert!(ir.contains("call void @mmu_uk("), "{ir}");
    }
}
