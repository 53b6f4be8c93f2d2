//! Fused attention on tensor cores (f16 Q, K, V, O; f32 softmax and accumulation), the
//! flash-attention-2 scheme with `nvgpu.mma.sync` m16n8k16 (sm_80+); same semantics and
//! layouts as [`attention`](super::attention) (`[BH, S, D]`, top-left causal mask):
//!
//! ```text
//! block (qt, bh): W warps, warp w owns the 16 query rows qt·16W + 16w ..; Q → shared,
//!   each warp keeps its Q A-fragments (D/16 of them) in registers
//! for t0 in 0..kv_end step 32: K, V tiles (32 keys × D, f16) → shared
//!   S = Q·Kᵀ: 4 n-tiles of 8 keys × D/16 k-steps of mma.sync (B fragment = K rows)
//!   lane = 4g + t holds S rows g and g+8, keys 8j + 2t, +1: scale, mask, row max and sum
//!   over the 4 lanes of a quad (gpu.shuffle xor 1, 2), online-softmax rescale of O
//!   O += P·V: P's accumulator layout is the A-fragment layout (keys 16kk.. = S tiles 2kk,
//!   2kk+1), truncated to f16; B fragment = V[key][dim]; D/8 n-tiles of O
//! O / l → f16
//! ```

use super::attention::AttentionSpec;
use super::emit::{dyn_memref, Emitter, WARP};
use crate::gpu::{Elem, GpuError, GpuKernel, KernelParam, Sku};

/// Keys per K/V tile.
const BKV: u64 = 32;

/// Shared memory of [`attention_f16_mma`]: `2 · (16W·D + 2·32·D)` bytes.
pub fn shared_bytes(spec: &AttentionSpec) -> u32 {
    2 * (16 * spec.rows_per_block * spec.head_dim + 2 * BKV as u32 * spec.head_dim)
}

/// Grid `(ceil(Sq / 16W), BH, 1)` and block `(32, W, 1)`, where `W = spec.rows_per_block`
/// counts warps (16 query rows each).
pub fn launch(spec: &AttentionSpec, bh: u64, sq: u64) -> Result<([u32; 3], [u32; 3]), GpuError> {
    let per = 16 * u64::from(spec.rows_per_block.max(1));
    let gx = sq.div_ceil(per).max(1);
    if gx > u64::from(i32::MAX as u32) || bh == 0 || bh > 65535 {
        return Err(GpuError::Schedule(format!(
            "attention grid ({gx}, {bh}) outside CUDA's limits"
        )));
    }
    Ok(([gx as u32, bh as u32, 1], [WARP, spec.rows_per_block, 1]))
}

/// `name(Q, K, V, O: memref<?xf16>, bh, sq, skv: index)`: `spec.elem` must be f16,
/// `spec.head_dim` a multiple of 16 up to 128, `spec.rows_per_block` warps (1..=8) of 16
/// query rows each; launch with [`launch`]. Needs `mma.sync.f16`.
pub fn attention_f16_mma(
    name: &str,
    spec: &AttentionSpec,
    sku: &Sku,
) -> Result<GpuKernel, GpuError> {
    let bad = |why: String| Err(GpuError::Schedule(format!("attention '{name}': {why}")));
    let d = u64::from(spec.head_dim);
    let w = u64::from(spec.rows_per_block);
    if spec.elem != Elem::F16 {
        return bad("the tensor-core kernel takes f16 buffers".into());
    }
    if d == 0 || !d.is_multiple_of(16) || d > 128 {
        return bad(format!("head_dim {d}: a multiple of 16, at most 128"));
    }
    if !(1..=8).contains(&w) {
        return bad(format!("{w} warps per block (1..=8)"));
    }
    if shared_bytes(spec) > sku.shared_mem_per_block {
        return bad(format!(
            "{} B of shared memory (limit {} on {})",
            shared_bytes(spec),
            sku.shared_mem_per_block,
            sku.name
        ));
    }
    if !spec.scale.is_finite() {
        return bad("scale must be finite".into());
    }
    let rows = 16 * w;
    let threads = 32 * w;
    let ws = "#gpu.address_space<workgroup>";
    let (qs_ty, kv_ty) = (
        format!("memref<{}xf16, {ws}>", rows * d),
        format!("memref<{}xf16, {ws}>", BKV * d),
    );
    let gty = dyn_memref("f16");
    let ksteps = (d / 16) as usize;
    let dtiles = (d / 8) as usize;
    let mut e = Emitter::new();
    e.line("%h0 = arith.constant 0.0 : f16");
    e.line("%zacc = arith.constant dense<0.0> : vector<2x2xf32>");
    e.line("%lane = gpu.thread_id x");
    e.line("%wy = gpu.thread_id y");
    e.line("%qt = gpu.block_id x");
    e.line("%b = gpu.block_id y");
    let t = e.ic("muli", "%wy", 32);
    let tid = e.ii("addi", &t, "%lane");
    let ct = e.idx(threads);
    let q0 = e.ic("muli", "%qt", rows);
    let gq = e.ic("divui", "%lane", 4);
    let tq = e.ic("remui", "%lane", 4);
    let t2 = e.ic("muli", &tq, 2);
    let wr = e.ic("muli", "%wy", 16);
    let ra = e.ii("addi", &wr, &gq); // row inside the block tile
    let rb = e.ic("addi", &ra, 8);
    let qa = e.ii("addi", &q0, &ra); // query index of accumulator row 0
    let qb = e.ii("addi", &q0, &rb);
    let kc = [
        t2.clone(),
        e.ic("addi", &t2, 1),
        e.ic("addi", &t2, 8),
        e.ic("addi", &t2, 9),
    ];
    let zero = e.f32c(0.0);
    let one = e.f32c(1.0);
    let ninf = e.f32c(f32::NEG_INFINITY);
    let scale = e.f32c(spec.scale);
    // Q tile → shared.
    let bq = e.ii("muli", "%b", "%sq");
    let cq = e.idx(rows * d);
    e.line(&format!("scf.for %e = {tid} to {cq} step {ct} {{"));
    let r = e.ic("divui", "%e", d);
    let dd = e.ic("remui", "%e", d);
    let gr = e.ii("addi", &q0, &r);
    let ok = e.cmp("ult", &gr, "%sq");
    e.line(&format!("%qv = scf.if {ok} -> f16 {{"));
    let a = e.ii("addi", &bq, &gr);
    let a = e.ic("muli", &a, d);
    let a = e.ii("addi", &a, &dd);
    let x = e.fresh("q");
    e.line(&format!("{x} = memref.load %Q[{a}] : {gty}"));
    e.line(&format!("scf.yield {x} : f16"));
    e.line("} else {");
    e.line("scf.yield %h0 : f16");
    e.line("}");
    e.line(&format!("memref.store %qv, %Qs[%e] : {qs_ty}"));
    e.line("}");
    e.line("gpu.barrier");
    // This warp's Q A-fragments, one per 16-wide slice of D.
    let mut qfrag = Vec::new();
    for kk in 0..ksteps {
        let mut el = Vec::new();
        for (row, half) in [(&ra, 0), (&rb, 0), (&ra, 2), (&rb, 2)] {
            let base = e.ic("muli", row, d);
            let base = e.ic("addi", &base, 16 * kk as u64);
            for col in &kc[half..half + 2] {
                let i = e.ii("addi", &base, col);
                let v = e.fresh("qf");
                e.line(&format!("{v} = memref.load %Qs[{i}] : {qs_ty}"));
                el.push(v);
            }
        }
        let f = e.fresh("qa");
        e.line(&format!(
            "{f} = vector.from_elements {} : vector<4x2xf16>",
            el.join(", ")
        ));
        qfrag.push(f);
    }
    let kv_end = if spec.causal {
        let lim = e.ic("addi", &q0, rows);
        e.ii("minui", "%skv", &lim)
    } else {
        "%skv".to_string()
    };
    let bk = e.ii("muli", "%b", "%skv");
    let (c0, cbkv) = (e.idx(0), e.idx(BKV));
    let mut inits = vec![
        format!("%ma = {ninf}"),
        format!("%mb = {ninf}"),
        format!("%la = {zero}"),
        format!("%lb = {zero}"),
    ];
    inits.extend((0..dtiles).map(|j| format!("%o{j}x = %zacc")));
    let mut types = vec!["f32"; 4];
    types.extend(vec!["vector<2x2xf32>"; dtiles]);
    let types = types.join(", ");
    let n_iter = 4 + dtiles;
    e.line(&format!(
        "%fin:{n_iter} = scf.for %kt0 = {c0} to {kv_end} step {cbkv} iter_args({}) -> ({types}) {{",
        inits.join(", ")
    ));
    e.line("gpu.barrier");
    let ckv = e.idx(BKV * d);
    e.line(&format!("scf.for %e = {tid} to {ckv} step {ct} {{"));
    let r = e.ic("divui", "%e", d);
    let dd = e.ic("remui", "%e", d);
    let j = e.ii("addi", "%kt0", &r);
    let ok = e.cmp("ult", &j, "%skv");
    e.line(&format!("%kv:2 = scf.if {ok} -> (f16, f16) {{"));
    let a = e.ii("addi", &bk, &j);
    let a = e.ic("muli", &a, d);
    let a = e.ii("addi", &a, &dd);
    let (kx, vx) = (e.fresh("k"), e.fresh("v"));
    e.line(&format!("{kx} = memref.load %K[{a}] : {gty}"));
    e.line(&format!("{vx} = memref.load %V[{a}] : {gty}"));
    e.line(&format!("scf.yield {kx}, {vx} : f16, f16"));
    e.line("} else {");
    e.line("scf.yield %h0, %h0 : f16, f16");
    e.line("}");
    e.line(&format!("memref.store %kv#0, %Ks[%e] : {kv_ty}"));
    e.line(&format!("memref.store %kv#1, %Vs[%e] : {kv_ty}"));
    e.line("}");
    e.line("gpu.barrier");
    // S = Q·Kᵀ for 4 tiles of 8 keys; then scale and mask, per element.
    // s[j][i][c]: tile j, row (g, g+8)[i], key 8j + 2t + c.
    let mut s = vec![
        [
            [String::new(), String::new()],
            [String::new(), String::new()]
        ];
        4
    ];
    for (jt, sj) in s.iter_mut().enumerate() {
        let key = e.ic("addi", &gq, 8 * jt as u64); // B fragment column: key 8j + g
        let kb = e.ic("muli", &key, d);
        let mut acc = "%zacc".to_string();
        for (kk, qf) in qfrag.iter().enumerate() {
            let base = e.ic("addi", &kb, 16 * kk as u64);
            let mut el = Vec::new();
            for col in &kc {
                let i = e.ii("addi", &base, col);
                let v = e.fresh("kf");
                e.line(&format!("{v} = memref.load %Ks[{i}] : {kv_ty}"));
                el.push(v);
            }
            let bf = e.fresh("kb");
            e.line(&format!(
                "{bf} = vector.from_elements {} : vector<2x2xf16>",
                el.join(", ")
            ));
            let dv = e.fresh("s");
            e.line(&format!(
                "{dv} = nvgpu.mma.sync({qf}, {bf}, {acc}) {{mmaShape = [16, 8, 16]}} : (vector<4x2xf16>, vector<2x2xf16>, vector<2x2xf32>) -> vector<2x2xf32>"
            ));
            acc = dv;
        }
        for (i, qrow) in [&qa, &qb].into_iter().enumerate() {
            for (c, slot) in sj[i].iter_mut().enumerate() {
                let x = e.fresh("sx");
                e.line(&format!(
                    "{x} = vector.extract {acc}[{i}, {c}] : f32 from vector<2x2xf32>"
                ));
                let x = e.ff("mulf", &x, &scale);
                let k0 = e.ic("addi", &t2, 8 * jt as u64 + c as u64);
                let key = e.ii("addi", "%kt0", &k0);
                let mut valid = e.cmp("ult", &key, "%skv");
                if spec.causal {
                    let cm = e.cmp("ule", &key, qrow);
                    valid = e.and(&valid, &cm);
                }
                *slot = e.select(&valid, &x, &ninf, "f32");
            }
        }
    }
    // Online softmax per accumulator row (i = 0: row g, i = 1: row g + 8).
    let quad_reduce = |e: &mut Emitter, v: &str, op: &str| {
        let mut cur = v.to_string();
        for off in [1, 2] {
            let (wd, o) = (e.fresh("w"), e.fresh("o"));
            e.line(&format!("{wd} = arith.constant 32 : i32"));
            e.line(&format!("{o} = arith.constant {off} : i32"));
            let (sh, okv) = (e.fresh("sh"), e.fresh("ok"));
            e.line(&format!(
                "{sh}, {okv} = gpu.shuffle xor {cur}, {o}, {wd} : f32"
            ));
            cur = e.ff(op, &cur, &sh);
        }
        cur
    };
    let mut p = s.clone();
    let mut corr = Vec::new();
    let mut m_new = Vec::new();
    let mut l_new = Vec::new();
    for (i, (mo, lo)) in [("%ma", "%la"), ("%mb", "%lb")].into_iter().enumerate() {
        let mut mx = s[0][i][0].clone();
        for sj in &s {
            for v in &sj[i] {
                mx = e.ff("maximumf", &mx, v);
            }
        }
        let mt = quad_reduce(&mut e, &mx, "maximumf");
        let mn = e.ff("maximumf", mo, &mt);
        let inf = e.fresh("inf");
        e.line(&format!("{inf} = arith.cmpf oeq, {mn}, {ninf} : f32"));
        let msafe = e.select(&inf, &zero, &mn, "f32");
        let dm = e.ff("subf", mo, &msafe);
        let cr = e.fresh("corr");
        e.line(&format!("{cr} = math.exp {dm} fastmath<afn> : f32"));
        let mut sum = zero.clone();
        for (jt, sj) in s.iter().enumerate() {
            for c in 0..2 {
                let ds = e.ff("subf", &sj[i][c], &msafe);
                let pv = e.fresh("p");
                e.line(&format!("{pv} = math.exp {ds} fastmath<afn> : f32"));
                sum = e.ff("addf", &sum, &pv);
                p[jt][i][c] = pv;
            }
        }
        let rs = quad_reduce(&mut e, &sum, "addf");
        let lc = e.ff("mulf", lo, &cr);
        l_new.push(e.ff("addf", &lc, &rs));
        m_new.push(mn);
        corr.push(cr);
    }
    // Rescale O, then O += P·V.
    let mut o: Vec<String> = Vec::new();
    for j in 0..dtiles {
        let mut el = Vec::new();
        for (i, cr) in corr.iter().enumerate() {
            for c in 0..2 {
                let x = e.fresh("ox");
                e.line(&format!(
                    "{x} = vector.extract %o{j}x[{i}, {c}] : f32 from vector<2x2xf32>"
                ));
                el.push(e.ff("mulf", &x, cr));
            }
        }
        let v = e.fresh("or");
        e.line(&format!(
            "{v} = vector.from_elements {} : vector<2x2xf32>",
            el.join(", ")
        ));
        o.push(v);
    }
    for kk in 0..2usize {
        // A fragment from P: [0] = (g; tile 2kk), [1] = (g+8; tile 2kk),
        // [2] = (g; tile 2kk+1), [3] = (g+8; tile 2kk+1), two keys each.
        let mut el = Vec::new();
        for (tile, i) in [(2 * kk, 0), (2 * kk, 1), (2 * kk + 1, 0), (2 * kk + 1, 1)] {
            for pv in &p[tile][i] {
                let h = e.fresh("ph");
                e.line(&format!("{h} = arith.truncf {pv} : f32 to f16"));
                el.push(h);
            }
        }
        let pa = e.fresh("pa");
        e.line(&format!(
            "{pa} = vector.from_elements {} : vector<4x2xf16>",
            el.join(", ")
        ));
        for (j, oj) in o.iter_mut().enumerate() {
            // B fragment: keys 16kk + (2t, 2t+1, 2t+8, 2t+9), dim 8j + g.
            let dim = e.ic("addi", &gq, 8 * j as u64);
            let mut el = Vec::new();
            for col in &kc {
                let key = e.ic("addi", col, 16 * kk as u64);
                let i = e.ic("muli", &key, d);
                let i = e.ii("addi", &i, &dim);
                let v = e.fresh("vf");
                e.line(&format!("{v} = memref.load %Vs[{i}] : {kv_ty}"));
                el.push(v);
            }
            let vb = e.fresh("vb");
            e.line(&format!(
                "{vb} = vector.from_elements {} : vector<2x2xf16>",
                el.join(", ")
            ));
            let dv = e.fresh("pv");
            e.line(&format!(
                "{dv} = nvgpu.mma.sync({pa}, {vb}, {oj}) {{mmaShape = [16, 8, 16]}} : (vector<4x2xf16>, vector<2x2xf16>, vector<2x2xf32>) -> vector<2x2xf32>"
            ));
            *oj = dv;
        }
    }
    e.line(&format!(
        "scf.yield {}, {}, {}, {}, {} : {types}",
        m_new[0],
        m_new[1],
        l_new[0],
        l_new[1],
        o.join(", ")
    ));
    e.line("}");
    // O / l → f16.
    for (i, qrow) in [&qa, &qb].into_iter().enumerate() {
        let ok = e.cmp("ult", qrow, "%sq");
        e.line(&format!("scf.if {ok} {{"));
        let l = format!("%fin#{}", 2 + i);
        let lpos = e.fresh("lpos");
        e.line(&format!("{lpos} = arith.cmpf ogt, {l}, {zero} : f32"));
        let lsafe = e.select(&lpos, &l, &one, "f32");
        let inv = e.ff("divf", &one, &lsafe);
        let inv = e.select(&lpos, &inv, &zero, "f32");
        let ob = e.ii("addi", &bq, qrow);
        let ob = e.ic("muli", &ob, d);
        for j in 0..dtiles {
            for c in 0..2 {
                let x = e.fresh("fo");
                e.line(&format!(
                    "{x} = vector.extract %fin#{}[{i}, {c}] : f32 from vector<2x2xf32>",
                    4 + j
                ));
                let y = e.ff("mulf", &x, &inv);
                let col = e.ic("addi", &t2, 8 * j as u64 + c as u64);
                let at = e.ii("addi", &ob, &col);
                e.store(&y, "%O", &at, &gty, "f16");
            }
        }
        e.line("}");
    }
    let header = format!(
        "gpu.func @{name}(%Q: {gty}, %K: {gty}, %V: {gty}, %O: {gty}, %bh: index, %sq: index, %skv: index) workgroup(%Qs : {qs_ty} {{llvm.align = 16 : i64}}, %Ks : {kv_ty} {{llvm.align = 16 : i64}}, %Vs : {kv_ty} {{llvm.align = 16 : i64}}) kernel attributes {{known_block_size = array<i32: {WARP}, {w}, 1>}} {{"
    );
    let buf = |n: &str| KernelParam::Buffer {
        name: n.into(),
        elem: Elem::F16,
    };
    Ok(GpuKernel {
        name: name.into(),
        mlir: e.finish(&header),
        params: vec![
            buf("Q"),
            buf("K"),
            buf("V"),
            buf("O"),
            KernelParam::Index("bh".into()),
            KernelParam::Index("sq".into()),
            KernelParam::Index("skv".into()),
        ],
        block: [WARP, spec.rows_per_block, 1],
        shared_bytes: shared_bytes(spec),
        requires: vec!["mma.sync.f16".into()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::DeviceDb;

    #[test]
    fn validation_launch_and_ptx() {
        let sku = DeviceDb::builtin()
            .unwrap()
            .parse_target("cuda:sm_80")
            .unwrap();
        let spec = AttentionSpec::new(64, true, Elem::F16);
        assert_eq!(launch(&spec, 3, 100).unwrap(), ([2, 3, 1], [32, 4, 1]));
        assert!(attention_f16_mma("a", &AttentionSpec::new(64, false, Elem::F32), sku).is_err());
        assert!(attention_f16_mma("a", &AttentionSpec::new(40, false, Elem::F16), sku).is_err());
        let k = attention_f16_mma("a", &spec, sku).unwrap();
        let ptx = crate::gpu::compile_kernel(&k, sku).unwrap();
        assert!(ptx
            .text
            .contains("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"));
    }
}
