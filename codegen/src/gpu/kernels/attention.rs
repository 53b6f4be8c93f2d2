//! Fused attention, flash-attention style: `O = softmax(Q·Kᵀ·scale [+ causal mask]) · V` for
//! `Q: [BH, Sq, D]`, `K, V: [BH, Skv, D]`, `O: [BH, Sq, D]` (row-major, `BH` = batch·heads),
//! f32 or f16 buffers with f32 arithmetic, without materialising the `Sq × Skv` scores:
//!
//! ```text
//! block (qt, bh): W warps, warp w owns query row i = qt·W + w; Qs = Q rows · scale (shared)
//! (m, l, o[D]) = (-inf, 0, 0)          // o: D/32 values per lane, dims lane + 32·r
//! for t0 in 0..kv_end step 32          // kv_end = Skv, or min(Skv, qt·W + W) if causal
//!   the block stages K[t0..t0+32] (Ks, rows padded to D+1 floats) and V[t0..t0+32] (Vs)
//!   lane l: s_l = Qs[w]·Ks[l], -inf where t0 + l >= Skv or (causal and t0 + l > i)
//!   m' = max(m, warp max s); p_l = exp(s_l - m'); c = exp(m - m')
//!   l = l·c + warp sum p;  o = o·c + Σ_l p_l · Vs[l]   (p_l broadcast by gpu.shuffle idx)
//! O[i] = o / l
//! ```
//!
//! The causal mask is top-left aligned (key `j` is visible to query `i` iff `j ≤ i`, as
//! PyTorch's `is_causal` and a lower-triangular ONNX mask).

use super::emit::{dyn_memref, in_kernel, shared_memref, Emitter, WARP};
use crate::gpu::{Elem, GpuError, GpuKernel, KernelParam, Sku};

/// What an attention kernel is specialised for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// Head dimension `D` (a multiple of 32, at most 256).
    pub head_dim: u32,
    /// Mask keys after the query (`j > i`).
    pub causal: bool,
    /// The factor applied to `Q·Kᵀ` (usually `1 / sqrt(D)`).
    pub scale: f32,
    /// Element type of Q, K, V and O.
    pub elem: Elem,
    /// Query rows (warps) per block.
    pub rows_per_block: u32,
}

impl AttentionSpec {
    /// `D = head_dim`, scale `1/sqrt(D)`, 4 query rows per block.
    pub fn new(head_dim: u32, causal: bool, elem: Elem) -> Self {
        Self {
            head_dim,
            causal,
            scale: 1.0 / (head_dim as f32).sqrt(),
            elem,
            rows_per_block: 4,
        }
    }

    /// Static shared memory: `4 · (W·D + 32·(D+1) + 32·D)` bytes.
    pub fn shared_bytes(&self) -> u32 {
        let d = self.head_dim;
        4 * (self.rows_per_block * d + WARP * (d + 1) + WARP * d)
    }

    /// Threads per block `(32, W, 1)`.
    pub fn block(&self) -> [u32; 3] {
        [WARP, self.rows_per_block, 1]
    }

    /// Grid `(ceil(Sq / W), BH, 1)`; an error beyond CUDA's grid limits.
    pub fn grid(&self, bh: u64, sq: u64) -> Result<[u32; 3], GpuError> {
        let gx = sq.div_ceil(u64::from(self.rows_per_block.max(1))).max(1);
        if gx > u64::from(i32::MAX as u32) || bh > 65535 || bh == 0 {
            return Err(GpuError::Schedule(format!(
                "attention grid ({gx}, {bh}) outside CUDA's limits"
            )));
        }
        Ok([gx as u32, bh as u32, 1])
    }

    /// Checks the head dimension, the rows per block and the shared memory on `sku`.
    pub fn validate(&self, sku: &Sku) -> Result<(), GpuError> {
        let bad = |why: String| Err(GpuError::Schedule(format!("attention {self:?}: {why}")));
        let d = self.head_dim;
        if d == 0 || !d.is_multiple_of(WARP) || d > 256 {
            return bad("head_dim must be a positive multiple of 32, at most 256".into());
        }
        if !(1..=32).contains(&self.rows_per_block) {
            return bad("1..=32 rows per block".into());
        }
        if self.shared_bytes() > sku.shared_mem_per_block {
            return bad(format!(
                "{} B of shared memory (limit {} on {})",
                self.shared_bytes(),
                sku.shared_mem_per_block,
                sku.name
            ));
        }
        if !self.scale.is_finite() {
            return bad("scale must be finite".into());
        }
        Ok(())
    }
}

/// `name(Q, K, V, O: memref<?xT>, bh: index, sq: index, skv: index)`; launch with grid
/// [`AttentionSpec::grid`] and block [`AttentionSpec::block`].
pub fn attention(name: &str, spec: &AttentionSpec, sku: &Sku) -> Result<GpuKernel, GpuError> {
    spec.validate(sku).map_err(in_kernel(name))?;
    let d = u64::from(spec.head_dim);
    let w = u64::from(spec.rows_per_block);
    let per_lane = d / u64::from(WARP);
    let el = spec.elem.mlir();
    let gty = dyn_memref(el);
    let (qs_ty, ks_ty, vs_ty) = (
        shared_memref(w * d),
        shared_memref(32 * (d + 1)),
        shared_memref(32 * d),
    );
    let threads = 32 * w;
    let mut e = Emitter::new();
    e.line("%lane = gpu.thread_id x");
    e.line("%wy = gpu.thread_id y");
    e.line("%qt = gpu.block_id x");
    e.line("%b = gpu.block_id y");
    let t = e.ic("muli", "%wy", 32);
    let tid = e.ii("addi", &t, "%lane");
    let ct = e.idx(threads);
    let q0 = e.ic("muli", "%qt", w);
    let row = e.ii("addi", &q0, "%wy");
    let rok = e.cmp("ult", &row, "%sq");
    let zero = e.f32c(0.0);
    let ninf = e.f32c(f32::NEG_INFINITY);
    // The output dims of this lane: lane + 32·r.
    let lane_offs: Vec<String> = (0..per_lane)
        .map(|r| e.ic("addi", "%lane", 32 * r))
        .collect();
    // Q tile, pre-scaled.
    let bq = e.ii("muli", "%b", "%sq");
    let cqe = e.idx(w * d);
    e.line(&format!("scf.for %e = {tid} to {cqe} step {ct} {{"));
    let r = e.ic("divui", "%e", d);
    let dd = e.ic("remui", "%e", d);
    let gr = e.ii("addi", &q0, &r);
    let ok = e.cmp("ult", &gr, "%sq");
    let v = e.fresh("qv");
    e.line(&format!("{v} = scf.if {ok} -> f32 {{"));
    let a = e.ii("addi", &bq, &gr);
    let a = e.ic("muli", &a, d);
    let a = e.ii("addi", &a, &dd);
    let x = e.load("%Q", &a, &gty, el);
    let sc = e.f32c(spec.scale);
    let x = e.ff("mulf", &x, &sc);
    e.line(&format!("scf.yield {x} : f32"));
    e.line("} else {");
    e.line(&format!("scf.yield {zero} : f32"));
    e.line("}");
    e.line(&format!("memref.store {v}, %Qs[%e] : {qs_ty}"));
    e.line("}");
    e.line("gpu.barrier");
    let kv_end = if spec.causal {
        let lim = e.ic("addi", &q0, w);
        e.ii("minui", "%skv", &lim)
    } else {
        "%skv".to_string()
    };
    let bk = e.ii("muli", "%b", "%skv");
    let c0 = e.idx(0);
    let c32 = e.idx(32);
    let oinit: Vec<String> = (0..per_lane).map(|r| format!("%ov{r} = {zero}")).collect();
    let n_iter = 2 + per_lane;
    let types = vec!["f32"; n_iter as usize].join(", ");
    e.line(&format!(
        "%fin:{n_iter} = scf.for %kt0 = {c0} to {kv_end} step {c32} iter_args(%m = {ninf}, %l = {zero}, {}) -> ({types}) {{",
        oinit.join(", ")
    ));
    // Stage K and V tiles.
    let ckv = e.idx(32 * d);
    e.line(&format!("scf.for %e = {tid} to {ckv} step {ct} {{"));
    let r = e.ic("divui", "%e", d);
    let dd = e.ic("remui", "%e", d);
    let j = e.ii("addi", "%kt0", &r);
    let ok = e.cmp("ult", &j, "%skv");
    e.line(&format!("%kv:2 = scf.if {ok} -> (f32, f32) {{"));
    let a = e.ii("addi", &bk, &j);
    let a = e.ic("muli", &a, d);
    let a = e.ii("addi", &a, &dd);
    let kx = e.load("%K", &a, &gty, el);
    let vx = e.load("%V", &a, &gty, el);
    e.line(&format!("scf.yield {kx}, {vx} : f32, f32"));
    e.line("} else {");
    e.line(&format!("scf.yield {zero}, {zero} : f32, f32"));
    e.line("}");
    let ks = e.ic("muli", &r, d + 1);
    let ks = e.ii("addi", &ks, &dd);
    e.line(&format!("memref.store %kv#0, %Ks[{ks}] : {ks_ty}"));
    e.line(&format!("memref.store %kv#1, %Vs[%e] : {vs_ty}"));
    e.line("}");
    e.line("gpu.barrier");
    // Scores: lane l against key t0 + l.
    let qo = e.ic("muli", "%wy", d);
    let ko = e.ic("muli", "%lane", d + 1);
    let (cd, c1) = (e.idx(d), e.idx(1));
    e.line(&format!(
        "%dot = scf.for %dd = {c0} to {cd} step {c1} iter_args(%acc = {zero}) -> f32 {{"
    ));
    let qi = e.ii("addi", &qo, "%dd");
    let ki = e.ii("addi", &ko, "%dd");
    let qv = e.fresh("q");
    e.line(&format!("{qv} = memref.load %Qs[{qi}] : {qs_ty}"));
    let kv = e.fresh("k");
    e.line(&format!("{kv} = memref.load %Ks[{ki}] : {ks_ty}"));
    let pr = e.fresh("pr");
    e.line(&format!(
        "{pr} = arith.mulf {qv}, {kv} fastmath<contract> : f32"
    ));
    let s = e.fresh("a");
    e.line(&format!(
        "{s} = arith.addf %acc, {pr} fastmath<contract> : f32"
    ));
    e.line(&format!("scf.yield {s} : f32"));
    e.line("}");
    let j = e.ii("addi", "%kt0", "%lane");
    let mut valid = e.cmp("ult", &j, "%skv");
    if spec.causal {
        let c = e.cmp("ule", &j, &row);
        valid = e.and(&valid, &c);
    }
    let s = e.select(&valid, "%dot", &ninf, "f32");
    let mt = e.warp_reduce(&s, "maximumf");
    let mn = e.ff("maximumf", "%m", &mt);
    let inf = e.fresh("inf");
    e.line(&format!("{inf} = arith.cmpf oeq, {mn}, {ninf} : f32"));
    let msafe = e.select(&inf, &zero, &mn, "f32");
    let dm = e.ff("subf", "%m", &msafe);
    let corr = e.fresh("corr");
    e.line(&format!("{corr} = math.exp {dm} fastmath<afn> : f32"));
    let ds = e.ff("subf", &s, &msafe);
    let p = e.fresh("p");
    e.line(&format!("{p} = math.exp {ds} fastmath<afn> : f32"));
    let psum = e.warp_reduce(&p, "addf");
    let lc = e.ff("mulf", "%l", &corr);
    let ln = e.ff("addf", &lc, &psum);
    let mut o: Vec<String> = (0..per_lane)
        .map(|r| e.ff("mulf", &format!("%ov{r}"), &corr))
        .collect();
    for src in 0..WARP {
        let pl = e.shuffle_idx(&p, src);
        for r in 0..per_lane as usize {
            let vi = e.ic("addi", &lane_offs[r], u64::from(src) * d);
            let vv = e.fresh("vv");
            e.line(&format!("{vv} = memref.load %Vs[{vi}] : {vs_ty}"));
            let pr = e.fresh("pv");
            e.line(&format!(
                "{pr} = arith.mulf {pl}, {vv} fastmath<contract> : f32"
            ));
            let acc = e.fresh("oa");
            e.line(&format!(
                "{acc} = arith.addf {}, {pr} fastmath<contract> : f32",
                o[r]
            ));
            o[r] = acc;
        }
    }
    e.line("gpu.barrier");
    e.line(&format!("scf.yield {mn}, {ln}, {} : {types}", o.join(", ")));
    e.line("}");
    // Normalise and store.
    e.line(&format!("scf.if {rok} {{"));
    let lpos = e.fresh("lpos");
    e.line(&format!("{lpos} = arith.cmpf ogt, %fin#1, {zero} : f32"));
    let one = e.f32c(1.0);
    let lsafe = e.select(&lpos, "%fin#1", &one, "f32");
    let inv = e.ff("divf", &one, &lsafe);
    let inv = e.select(&lpos, &inv, &zero, "f32");
    let ob = e.ii("addi", &bq, &row);
    let ob = e.ic("muli", &ob, d);
    for (r, lo) in lane_offs.iter().enumerate() {
        let y = e.ff("mulf", &format!("%fin#{}", r + 2), &inv);
        let at = e.ii("addi", &ob, lo);
        e.store(&y, "%O", &at, &gty, el);
    }
    e.line("}");
    let header = format!(
        "gpu.func @{name}(%Q: {gty}, %K: {gty}, %V: {gty}, %O: {gty}, %bh: index, %sq: index, %skv: index) workgroup(%Qs : {qs_ty} {{llvm.align = 16 : i64}}, %Ks : {ks_ty} {{llvm.align = 16 : i64}}, %Vs : {vs_ty} {{llvm.align = 16 : i64}}) kernel attributes {{known_block_size = array<i32: {WARP}, {w}, 1>}} {{"
    );
    let buf = |n: &str| KernelParam::Buffer {
        name: n.into(),
        elem: spec.elem,
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
        block: spec.block(),
        shared_bytes: spec.shared_bytes(),
        requires: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::DeviceDb;

    #[test]
    fn spec_validation_and_geometry() {
        let sku = DeviceDb::builtin()
            .unwrap()
            .parse_target("cuda:sm_80")
            .unwrap();
        let s = AttentionSpec::new(64, true, Elem::F32);
        s.validate(sku).unwrap();
        assert_eq!(
            (s.block(), s.grid(6, 77).unwrap()),
            ([32, 4, 1], [20, 6, 1])
        );
        assert!(AttentionSpec::new(48, false, Elem::F32)
            .validate(sku)
            .is_err());
        let big = AttentionSpec {
            rows_per_block: 32,
            ..AttentionSpec::new(256, false, Elem::F16)
        };
        assert!(attention("a", &big, sku).is_err());
        assert!(s.grid(70000, 10).is_err());
    }
}
