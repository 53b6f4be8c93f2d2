//! Memory planning over the kernel order: every intermediate value (a kernel output that is
//! not a graph output) gets a byte range in one arena. Graph inputs, graph outputs and
//! constants live outside the arena; values internal to a fused kernel are never
//! materialized.
//!
//! - Liveness is counted in kernel steps: a buffer is live from the kernel writing it to the
//!   last kernel reading it (or any view of it), both inclusive.
//! - `Alias` kernels (zero-copy views) share their input's buffer and extend its liveness.
//! - An `Elementwise` kernel writes an output in place of an input buffer of the same shape
//!   and element size (not a broadcast one) that dies at that kernel (the generated code reads every input element before writing
//!   the output element at the same index).
//! - A kernel that is one `Concat` whose parts are contiguous pieces of its output (every
//!   axis before the concat axis of size 1) is *elided*: each part is planned at its place
//!   inside the output's buffer, so the producers write the concatenation directly and the
//!   concat step has nothing to do ([`MemoryPlan::elided`]; run anyway, it copies every
//!   element onto itself). Parts must be arena values produced by earlier kernels, not
//!   views, at offsets that are multiples of [`ALIGNMENT`], and in no other elided concat.
//! - Symmetrically, a kernel that is one `Slice` whose output is a contiguous range of its
//!   input (every axis before the last cut of extent 1 in the output) is elided: the output
//!   is planned inside the input's buffer, at an offset that is a multiple of [`ALIGNMENT`],
//!   and that buffer lives as long as the slice is read. No elementwise kernel works in
//!   place in such a buffer (it could overwrite bytes a slice reads later).
//! - Buffers are placed greedily: by size descending, first fit among the already placed
//!   buffers whose live ranges overlap, offsets aligned to [`ALIGNMENT`] bytes.

use crate::fusion::{KernelKind, Partition};
use kiln_ir::{Graph, ValueId};
use serde::{Deserialize, Serialize};

/// Alignment of every buffer in the arena, in bytes.
pub const ALIGNMENT: usize = 64;

/// Where one value lives in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Byte offset in the arena.
    pub offset: usize,
    /// Size of the value in bytes.
    pub size: usize,
    /// Index of the buffer it shares (see [`MemoryPlan::buffers`]).
    pub buffer: usize,
}

/// One arena buffer: a byte range holding one or more values over a range of kernel steps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buffer {
    /// Byte offset in the arena (a multiple of [`ALIGNMENT`]).
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
    /// First kernel step at which it is live (written).
    pub first: usize,
    /// Last kernel step at which it is live (read).
    pub last: usize,
    /// The values stored in it: the producing value, its views and in-place successors.
    pub values: Vec<ValueId>,
}

/// The memory plan of a partitioned graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// Arena size in bytes.
    pub arena_bytes: usize,
    /// Buffer alignment in bytes.
    pub alignment: usize,
    /// For each value (indexed by `ValueId`), its place in the arena; `None` for graph inputs,
    /// outputs, constants, views of those, and values internal to a kernel.
    pub slots: Vec<Option<Slot>>,
    /// The arena buffers.
    pub buffers: Vec<Buffer>,
    /// For each output of an `Alias` kernel, the value whose storage it views (the root of
    /// the chain of views, which may be a graph input, output or constant).
    pub alias_of: Vec<Option<ValueId>>,
    /// In-place reuses: (input, output) of an elementwise kernel sharing one buffer.
    pub in_place: Vec<(ValueId, ValueId)>,
    /// Kernels (indices in the partition) that need no step: single `Concat`s whose parts
    /// were placed inside the output, and single `Slice`s whose output was placed inside
    /// the input.
    #[serde(default)]
    pub elided: Vec<usize>,
    /// Sum of the sizes of all materialized intermediate values (no reuse at all).
    pub naive_bytes: usize,
    /// Size of the largest intermediate value.
    pub largest_bytes: usize,
}

/// Byte size of a value with a fully known shape.
fn byte_size(g: &Graph, v: ValueId) -> Result<usize, String> {
    let f = &g.values[v].fact;
    let n = f.shape.numel().ok_or_else(|| {
        format!(
            "value '{}' has shape {}: specialise symbolic dims before planning memory",
            g.values[v].name, f.shape
        )
    })?;
    Ok(n * f.dtype.size_of())
}

/// Liveness facts shared by planning and verification.
struct Liveness {
    /// Kernel producing each value (for kernel outputs).
    def: Vec<Option<usize>>,
    /// Last kernel reading each value (`def` if none).
    last: Vec<usize>,
    /// Root of the view chain of each value (itself if not a view).
    root: Vec<ValueId>,
    /// Values living outside the arena: graph inputs, outputs, constants.
    external: Vec<bool>,
}

fn liveness(g: &Graph, p: &Partition) -> Liveness {
    let nv = g.values.len();
    let prod = g.producers();
    let mut def = vec![None; nv];
    let mut last = vec![0; nv];
    let mut root: Vec<ValueId> = (0..nv).collect();
    let mut external = vec![false; nv];
    for &i in g.inputs.iter().chain(&g.outputs) {
        external[i] = true;
    }
    for (v, e) in external.iter_mut().enumerate() {
        if prod[v].is_none() {
            *e = true;
        }
    }
    for (k, kernel) in p.kernels.iter().enumerate() {
        for &o in &kernel.outputs {
            def[o] = Some(k);
            last[o] = k;
        }
        for &i in &kernel.inputs {
            last[i] = last[i].max(k);
        }
        if kernel.kind == KernelKind::Alias {
            let n = &g.nodes[kernel.nodes[0]];
            if let Some(src) = n.inputs[0] {
                root[n.outputs[0]] = root[src];
            }
        }
    }
    Liveness {
        def,
        last,
        root,
        external,
    }
}

/// The parts of kernel `k` with their byte offsets inside its output, if it is a `Concat`
/// the plan can elide (see the module doc; `taken`: values already placed in another
/// concat).
fn elidable_concat(
    g: &Graph,
    p: &Partition,
    lv: &Liveness,
    k: usize,
    taken: &[bool],
) -> Option<(ValueId, Vec<(ValueId, usize)>)> {
    let kernel = &p.kernels[k];
    let [ni] = kernel.nodes[..] else { return None };
    let node = &g.nodes[ni];
    let kiln_ir::Op::Array(kiln_ir::ops::array::ArrayOp::Concat { axis }) = node.op else {
        return None;
    };
    let [out] = kernel.outputs[..] else {
        return None;
    };
    if node.outputs != [out] || lv.external[out] || lv.root[out] != out || taken[out] {
        return None;
    }
    let shape = g.values[out].fact.shape.as_known()?;
    let rank = shape.len() as i64;
    let ax = if axis < 0 { axis + rank } else { axis };
    if !(0..rank).contains(&ax) || shape[..ax as usize].iter().any(|&d| d != 1) {
        return None;
    }
    let mut parts = Vec::new();
    let mut at = 0usize;
    for v in &node.inputs {
        let v = (*v)?;
        let def = lv.def[v]?;
        let size = byte_size(g, v).ok()?;
        if lv.external[v]
            || lv.root[v] != v
            || def >= k
            || taken[v]
            || parts.iter().any(|&(q, _)| q == v)
            || p.kernels[def].kind == KernelKind::Alias
            || !at.is_multiple_of(ALIGNMENT)
        {
            return None;
        }
        parts.push((v, at));
        at += size;
    }
    (at == byte_size(g, out).ok()? && parts.len() > 1).then_some((out, parts))
}

/// The input of kernel `k` and the byte offset of its output inside it, if `k` is a
/// `Slice` the plan can elide: its output is one contiguous range of its input (every
/// sliced axis with step 1, the axes after the last cut whole, the axes before it of
/// extent 1 in the output), at an offset that is a multiple of [`ALIGNMENT`]; the input is
/// an arena value produced by an earlier kernel (not a view) and the output an arena value
/// not already placed elsewhere.
fn elidable_slice(
    g: &Graph,
    p: &Partition,
    lv: &Liveness,
    k: usize,
    taken: &[bool],
) -> Option<(ValueId, ValueId, usize)> {
    let kernel = &p.kernels[k];
    let [ni] = kernel.nodes[..] else { return None };
    let node = &g.nodes[ni];
    let kiln_ir::Op::Array(op) = &node.op else {
        return None;
    };
    let [out] = kernel.outputs[..] else {
        return None;
    };
    let x = node.inputs.first().copied().flatten()?;
    let def = lv.def[x]?;
    if node.outputs != [out]
        || lv.external[out]
        || lv.root[out] != out
        || taken[out]
        || lv.external[x]
        || lv.root[x] != x
        || def >= k
        || p.kernels[def].kind == KernelKind::Alias
    {
        return None;
    }
    let facts: Vec<Option<&kiln_ir::Fact>> = node
        .inputs
        .iter()
        .map(|i| i.map(|i| &g.values[i].fact))
        .collect();
    let (offset, len) = op.contiguous_slice(&facts)?;
    (len > 0 && offset.is_multiple_of(ALIGNMENT)).then_some((x, out, offset))
}

/// Moves every value of buffer `from` into buffer `to`, whose live range grows to cover
/// `from`'s; `from` is marked dead.
fn merge_buffer(
    buffers: &mut [Buffer],
    buf_of: &mut [Option<usize>],
    dead: &mut [bool],
    from: usize,
    to: usize,
) {
    let moved = std::mem::take(&mut buffers[from].values);
    for &m in &moved {
        buf_of[m] = Some(to);
    }
    buffers[to].first = buffers[to].first.min(buffers[from].first);
    buffers[to].last = buffers[to].last.max(buffers[from].last);
    buffers[to].values.extend(moved);
    dead[from] = true;
}

/// Plans the arena for a partitioned graph with static shapes (see the module doc).
pub fn plan_memory(g: &Graph, p: &Partition) -> Result<MemoryPlan, String> {
    let nv = g.values.len();
    let lv = liveness(g, p);
    let mut alias_of = vec![None; nv];
    for k in p.kernels.iter().filter(|k| k.kind == KernelKind::Alias) {
        let o = g.nodes[k.nodes[0]].outputs[0];
        alias_of[o] = Some(lv.root[o]);
    }
    // one buffer per arena root
    let mut buf_of: Vec<Option<usize>> = vec![None; nv];
    let mut buffers: Vec<Buffer> = Vec::new();
    let mut sizes = vec![0usize; nv];
    let (mut naive, mut largest) = (0, 0);
    for k in &p.kernels {
        for &o in &k.outputs {
            if lv.external[lv.root[o]] || lv.external[o] {
                continue;
            }
            sizes[o] = byte_size(g, o)?;
            if lv.root[o] != o {
                continue;
            }
            naive += sizes[o];
            largest = largest.max(sizes[o]);
            buf_of[o] = Some(buffers.len());
            buffers.push(Buffer {
                offset: 0,
                size: sizes[o],
                first: lv.def[o].expect("kernel output"),
                last: lv.last[o],
                values: vec![o],
            });
        }
    }
    // elided concats: the parts' buffers merge into the output's, each part at its offset
    let mut dead = vec![false; buffers.len()];
    let mut inner = vec![0usize; nv];
    let mut pinned = vec![false; nv];
    let mut elided = Vec::new();
    for k in 0..p.kernels.len() {
        let Some((out, parts)) = elidable_concat(g, p, &lv, k, &pinned) else {
            continue;
        };
        let Some(bo) = buf_of[out] else { continue };
        if parts.iter().any(|&(v, _)| buf_of[v].is_none()) {
            continue;
        }
        for &(v, off) in &parts {
            let bp = buf_of[v].expect("checked");
            merge_buffer(&mut buffers, &mut buf_of, &mut dead, bp, bo);
            inner[v] = off;
            pinned[v] = true;
        }
        pinned[out] = true;
        elided.push(k);
    }
    // elided slices: the output is placed inside its input's buffer (no in-place reuse of
    // that buffer afterwards: an elementwise kernel could overwrite what a slice still reads)
    for k in 0..p.kernels.len() {
        let Some((x, out, off)) = elidable_slice(g, p, &lv, k, &pinned) else {
            continue;
        };
        let (Some(bx), Some(bo)) = (buf_of[x], buf_of[out]) else {
            continue;
        };
        merge_buffer(&mut buffers, &mut buf_of, &mut dead, bo, bx);
        inner[out] = inner[x] + off;
        pinned[out] = true;
        pinned[x] = true;
        elided.push(k);
    }
    // views share their root's buffer (and place in it) and extend its liveness
    for v in 0..nv {
        let r = lv.root[v];
        if r != v {
            if let Some(b) = buf_of[r] {
                buf_of[v] = Some(b);
                inner[v] = inner[r];
                buffers[b].values.push(v);
                buffers[b].last = buffers[b].last.max(lv.last[v]);
            }
        }
    }
    // in-place reuse in elementwise kernels (not into or out of an elided concat)
    let mut in_place = Vec::new();
    for (k, kernel) in p.kernels.iter().enumerate() {
        if kernel.kind != KernelKind::Elementwise {
            continue;
        }
        let mut used: Vec<usize> = Vec::new();
        for &o in &kernel.outputs {
            let Some(bo) = buf_of[o].filter(|_| lv.root[o] == o && !pinned[o]) else {
                continue;
            };
            let cand = kernel.inputs.iter().copied().find(|&i| {
                !pinned[lv.root[i]]
                    && buf_of[i].is_some_and(|bi| {
                        bi != bo
                        && !used.contains(&bi)
                        && buffers[bi].last == k
                        && buffers[bi].first < k
                        && buffers[bi].size == buffers[bo].size
                        // element i of the input is element i of the output: same shape
                        // and element size (a broadcast input must not be overwritten)
                        && g.values[i].fact.shape == g.values[o].fact.shape
                        && g.values[i].fact.dtype.size_of() == g.values[o].fact.dtype.size_of()
                    })
            });
            if let Some(i) = cand {
                let bi = buf_of[i].expect("checked");
                used.push(bi);
                in_place.push((i, o));
                merge_buffer(&mut buffers, &mut buf_of, &mut dead, bo, bi);
            }
        }
    }
    // compact the buffer list
    let mut remap = vec![usize::MAX; buffers.len()];
    let mut kept = Vec::new();
    for (b, buf) in buffers.into_iter().enumerate() {
        if !dead[b] {
            remap[b] = kept.len();
            kept.push(buf);
        }
    }
    let mut buffers = kept;
    for b in buf_of.iter_mut().flatten() {
        *b = remap[*b];
    }
    // greedy placement: size descending, first fit over time-overlapping placed buffers
    let mut order: Vec<usize> = (0..buffers.len()).collect();
    order.sort_by(|&a, &b| {
        buffers[b]
            .size
            .cmp(&buffers[a].size)
            .then(buffers[a].first.cmp(&buffers[b].first))
            .then(a.cmp(&b))
    });
    let mut placed: Vec<usize> = Vec::new();
    let mut arena = 0;
    for &b in &order {
        let (first, last, size) = (buffers[b].first, buffers[b].last, buffers[b].size);
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&q| buffers[q].first <= last && first <= buffers[q].last)
            .map(|&q| (buffers[q].offset, buffers[q].offset + buffers[q].size))
            .collect();
        busy.sort_unstable();
        let mut off = 0;
        for (s, e) in busy {
            if off + size <= s {
                break;
            }
            off = off.max(align(e));
        }
        buffers[b].offset = off;
        arena = arena.max(off + size);
        placed.push(b);
    }
    let slots = (0..nv)
        .map(|v| {
            buf_of[v].map(|b| Slot {
                offset: buffers[b].offset + inner[v],
                size: sizes[v],
                buffer: b,
            })
        })
        .collect();
    Ok(MemoryPlan {
        arena_bytes: align(arena),
        alignment: ALIGNMENT,
        slots,
        buffers,
        alias_of,
        in_place,
        elided,
        naive_bytes: naive,
        largest_bytes: largest,
    })
}

/// Rounds up to [`ALIGNMENT`].
fn align(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

impl MemoryPlan {
    /// Checks the plan against the graph and partition: every intermediate value has a slot
    /// inside its buffer, buffers are aligned and inside the arena, each buffer is live while
    /// any of its values is, no two simultaneously live buffers overlap, and values sharing a
    /// buffer are views of one another or an in-place handover at an elementwise kernel.
    pub fn verify(&self, g: &Graph, p: &Partition) -> Result<(), String> {
        let nv = g.values.len();
        if self.slots.len() != nv {
            return Err(format!("{} slots for {nv} values", self.slots.len()));
        }
        let lv = liveness(g, p);
        let name = |v: ValueId| &g.values[v].name;
        for (b, buf) in self.buffers.iter().enumerate() {
            if buf.offset % self.alignment != 0 || buf.offset + buf.size > self.arena_bytes {
                return Err(format!("buffer {b} is misaligned or outside the arena"));
            }
            if buf.first > buf.last {
                return Err(format!("buffer {b} has an empty live range"));
            }
        }
        for (a, x) in self.buffers.iter().enumerate() {
            for (b, y) in self.buffers.iter().enumerate().skip(a + 1) {
                let time = x.first <= y.last && y.first <= x.last;
                let space = x.offset < y.offset + y.size && y.offset < x.offset + x.size;
                if time && space && x.size > 0 && y.size > 0 {
                    return Err(format!(
                        "buffers {a} ({}..{} bytes, steps {}..={}) and {b} ({}..{}, steps {}..={}) overlap",
                        x.offset, x.offset + x.size, x.first, x.last,
                        y.offset, y.offset + y.size, y.first, y.last
                    ));
                }
            }
        }
        // every materialized intermediate value has a slot, covered by its buffer
        for k in &p.kernels {
            for &o in &k.outputs {
                let needs = !lv.external[o] && !lv.external[lv.root[o]];
                match (needs, self.slots[o]) {
                    (true, None) => return Err(format!("value '{}' has no slot", name(o))),
                    (false, Some(_)) => {
                        return Err(format!("external value '{}' has a slot", name(o)))
                    }
                    _ => {}
                }
            }
        }
        // parts of an elided concat live in the output's chain (placed inside it), the
        // output of an elided slice in its input's chain
        let mut chain: Vec<ValueId> = lv.root.clone();
        let mut inside = vec![false; nv];
        for &k in &self.elided {
            let kernel = p
                .kernels
                .get(k)
                .ok_or_else(|| format!("elided kernel {k} out of range"))?;
            let node = &g.nodes[kernel.nodes[0]];
            let out = node.outputs[0];
            let join = |chain: &mut Vec<ValueId>, inside: &mut Vec<bool>, v: ValueId, to| {
                inside[v] = true;
                for (w, c) in chain.iter_mut().enumerate() {
                    if lv.root[w] == v {
                        *c = to;
                    }
                }
            };
            match node.op.op_type() {
                "Concat" if kernel.nodes.len() == 1 => {
                    for v in node.inputs.iter().flatten() {
                        join(&mut chain, &mut inside, *v, lv.root[out]);
                    }
                }
                "Slice" if kernel.nodes.len() == 1 => {
                    let x = node.inputs[0].ok_or_else(|| format!("elided slice {k}: no input"))?;
                    let to = chain[x];
                    join(&mut chain, &mut inside, out, to);
                }
                _ => return Err(format!("elided kernel {k} is not a single Concat or Slice")),
            }
        }
        let mut classes: Vec<Vec<(ValueId, usize, usize)>> = vec![vec![]; self.buffers.len()];
        for (v, s) in self.slots.iter().enumerate() {
            let Some(s) = s else { continue };
            let buf = self
                .buffers
                .get(s.buffer)
                .ok_or_else(|| format!("value '{}': buffer out of range", name(v)))?;
            if s.offset < buf.offset || s.offset + s.size > buf.offset + buf.size {
                return Err(format!("value '{}' does not fit its buffer", name(v)));
            }
            if s.offset != buf.offset && !inside[lv.root[v]] {
                return Err(format!(
                    "value '{}' is not at its buffer's start but not part of an elided concat or slice",
                    name(v)
                ));
            }
            let def = lv.def[v].ok_or_else(|| format!("value '{}' is not produced", name(v)))?;
            if def < buf.first || lv.last[v] > buf.last {
                return Err(format!(
                    "value '{}' is live at steps {def}..={} outside its buffer's {}..={}",
                    name(v),
                    lv.last[v],
                    buf.first,
                    buf.last
                ));
            }
            classes[s.buffer].push((chain[v], def, lv.last[v]));
        }
        // values of different view chains in one buffer: only an in-place handover
        for (b, vals) in classes.iter().enumerate() {
            let mut chains: Vec<(ValueId, usize, usize)> = Vec::new();
            for &(r, d, l) in vals {
                match chains.iter_mut().find(|c| c.0 == r) {
                    Some(c) => {
                        c.1 = c.1.min(d);
                        c.2 = c.2.max(l);
                    }
                    None => chains.push((r, d, l)),
                }
            }
            chains.sort_by_key(|c| c.1);
            for w in chains.windows(2) {
                let (a, c) = (w[0], w[1]);
                let handover = a.2 == c.1 && p.kernels[c.1].kind == KernelKind::Elementwise;
                if a.2 > c.1 || (a.2 == c.1 && !handover) {
                    return Err(format!(
                        "buffer {b}: '{}' (steps {}..={}) and '{}' (steps {}..={}) are live together",
                        name(a.0), a.1, a.2, name(c.0), c.1, c.2
                    ));
                }
            }
        }
        Ok(())
    }

    /// One line: `arena A bytes, naive N bytes (x%), largest activation L bytes, B buffers, I in
    /// place, E steps elided` (zero-copy concats and slices).
    pub fn summary(&self) -> String {
        let pct = if self.naive_bytes == 0 {
            0.0
        } else {
            100.0 * self.arena_bytes as f64 / self.naive_bytes as f64
        };
        format!(
            "arena {} bytes, naive {} bytes ({pct:.1}%), largest activation {} bytes, {} buffers, {} in place, {} steps elided",
            self.arena_bytes,
            self.naive_bytes,
            self.largest_bytes,
            self.buffers.len(),
            self.in_place.len(),
            self.elided.len()
        )
    }
}
