//! A small SIMT emulator for the MLIR subset the GPU kernel generators emit (`gpu.func` with
//! `arith`, `math`, `memref`, `vector`, `scf` and `gpu` thread ids, `gpu.barrier`,
//! `gpu.shuffle xor|idx`), so that the kernels' logic (indexing, masking, tiling, barriers,
//! warp reductions, online softmax) is tested on a machine without a GPU.
//!
//! Each block runs its threads as OS threads (`std::thread::scope`) meeting at a
//! `std::sync::Barrier` for `gpu.barrier`; a warp's shuffles exchange values through
//! per-warp slots between two warp barriers. Blocks run one after another. Memory is
//! `f32` bit patterns in atomics (f16 buffers hold f16-rounded values; `arith.truncf` to
//! f16 or bf16 rounds to nearest even). This checks what the kernel *says*, not MLIR's lowering to PTX (`ptxas`
//! and the CUDA test cover that).

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A barrier that gives up (panics) when another thread of the block panicked, so that a
/// failing kernel fails the test instead of hanging it.
struct Barrier<'a> {
    n: usize,
    state: Mutex<(usize, u64)>,
    cv: Condvar,
    poisoned: &'a AtomicBool,
}

impl<'a> Barrier<'a> {
    fn new(n: usize, poisoned: &'a AtomicBool) -> Self {
        Self {
            n,
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
            poisoned,
        }
    }

    fn wait(&self) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let gen = g.1;
        g.0 += 1;
        if g.0 == self.n {
            *g = (0, gen + 1);
            self.cv.notify_all();
            return;
        }
        while g.1 == gen {
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if self.poisoned.load(Relaxed) {
                panic!("another thread of the block panicked");
            }
        }
    }
}

/// Marks the block poisoned when its thread unwinds.
struct PoisonOnPanic<'a>(&'a AtomicBool);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Relaxed);
        }
    }
}

/// A kernel argument.
#[derive(Debug, Clone)]
pub enum EArg {
    /// A buffer (`memref<?xf32>` or `memref<?xf16>`; read back after the run).
    Buf(Vec<f32>),
    /// An `index` scalar.
    Index(i64),
    /// An `f32` scalar.
    F32(f32),
}

#[derive(Debug, Clone)]
enum V {
    I(i64),
    F(f32),
    B(bool),
    Vec(Vec<f32>),
}

impl V {
    fn i(&self) -> i64 {
        match self {
            V::I(v) => *v,
            V::B(b) => i64::from(*b),
            o => panic!("expected an integer, got {o:?}"),
        }
    }
    fn f(&self) -> f32 {
        match self {
            V::F(v) => *v,
            o => panic!("expected a float, got {o:?}"),
        }
    }
    fn b(&self) -> bool {
        match self {
            V::B(v) => *v,
            o => panic!("expected an i1, got {o:?}"),
        }
    }
    fn v(&self) -> &[f32] {
        match self {
            V::Vec(v) => v,
            o => panic!("expected a vector, got {o:?}"),
        }
    }
}

#[derive(Debug, Clone)]
enum K {
    Const(V),
    IBin(String),
    Cmpi(String),
    AndI,
    FBin(String),
    Negf,
    Cmpf(String),
    Select,
    Extf,
    TruncF16,
    TruncBF16,
    Id,
    Uitofp,
    Math(String),
    Load(usize),
    Store(usize),
    /// `memref.atomic_rmw addf`: adds into memory, yields the old value.
    AtomicAdd(usize),
    VLoad(usize, usize),
    VStore(usize, usize),
    VExtract(usize),
    FromElements,
    VInsert(usize),
    Mma,
    /// `nvvm.mma.sync` m16n8k16 on packed 16-bit pairs (bf16): `A[4] B[2] C[4]` scalars,
    /// each packed `i32` held as the pair of values it packs.
    MmaPacked,
    VBroadcast(usize),
    VFma,
    Sreg(&'static str, usize),
    Shuffle(bool),
}

#[derive(Debug, Clone)]
enum S {
    Op {
        res: Vec<usize>,
        k: K,
        args: Vec<usize>,
    },
    For {
        res: Vec<usize>,
        iv: usize,
        bounds: [usize; 3],
        iters: Vec<(usize, usize)>,
        body: Vec<S>,
    },
    If {
        res: Vec<usize>,
        cond: usize,
        then: Vec<S>,
        els: Vec<S>,
    },
    Yield(Vec<usize>),
    Barrier,
}

/// A parsed kernel.
struct Prog {
    body: Vec<S>,
    slots: usize,
    /// Parameters: (slot, memory id) per parameter in order (memory id for buffers).
    params: Vec<(usize, Option<usize>)>,
    /// Shared memories: (memory id, length).
    shared: Vec<(usize, usize)>,
    mems: usize,
}

#[derive(Default)]
struct Names {
    slots: HashMap<String, usize>,
    mems: HashMap<String, usize>,
}

impl Names {
    fn slot(&mut self, n: &str) -> usize {
        let l = self.slots.len();
        *self.slots.entry(n.to_string()).or_insert(l)
    }
}

/// `%name` tokens (with `#i` suffixes) in order.
fn refs(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let st = i;
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'#') {
                i += 1;
            }
            out.push(s[st..i].to_string());
        } else {
            i += 1;
        }
    }
    out
}

/// Result names of `lhs` (`%a`, `%a:3` → `%a#0..2`, `%a, %b`).
fn results(lhs: &str) -> Vec<String> {
    let lhs = lhs.trim();
    if let Some((n, k)) = lhs.split_once(':') {
        let k: usize = k.trim().parse().expect("result count");
        return (0..k).map(|i| format!("{n}#{i}")).collect();
    }
    lhs.split(',').map(|s| s.trim().to_string()).collect()
}

/// The dimensions of the (last) `vector<AxBxT>` type in `ty`.
fn vec_dims(ty: &str) -> Vec<usize> {
    let i = ty.rfind("vector<").expect("vector type") + 7;
    let j = ty[i..].find('>').unwrap() + i;
    let parts: Vec<&str> = ty[i..j].split('x').collect();
    parts[..parts.len() - 1]
        .iter()
        .map(|d| d.parse().unwrap())
        .collect()
}

fn vec_len(ty: &str) -> usize {
    vec_dims(ty).iter().product()
}

fn parse_body<'a>(lines: &mut impl Iterator<Item = &'a str>, n: &mut Names) -> (Vec<S>, bool) {
    let mut out = Vec::new();
    while let Some(raw) = lines.next() {
        let line = raw.trim();
        if line.is_empty() || line == "gpu.return" {
            continue;
        }
        if line == "}" {
            return (out, false);
        }
        if line == "} else {" {
            return (out, true);
        }
        let (lhs, rhs) = if line.starts_with('%') {
            let (a, b) = line.split_once(" = ").expect("assignment");
            (Some(a), b)
        } else {
            (None, line)
        };
        let res: Vec<usize> = lhs
            .map(|l| results(l).iter().map(|r| n.slot(r)).collect())
            .unwrap_or_default();
        let op = rhs.split_whitespace().next().unwrap();
        let op = op.split('(').next().unwrap();
        let operands = rhs.split(" : ").next().unwrap();
        let names: Vec<String> = refs(operands)
            .into_iter()
            .filter(|r| !n.mems.contains_key(r))
            .collect();
        let mut args: Vec<usize> = names.iter().map(|r| n.slot(r)).collect();
        let memid = refs(operands).iter().find_map(|x| n.mems.get(x).copied());
        let mem = || memid.expect("memref operand");
        let ty = rhs.rsplit(" : ").next().unwrap_or("");
        let k = match op {
            "scf.for" => {
                let head = rhs.split(" iter_args(").next().unwrap();
                let r = refs(head);
                let iv = n.slot(&r[0]);
                let bounds = [n.slot(&r[1]), n.slot(&r[2]), n.slot(&r[3])];
                let mut iters = Vec::new();
                if let Some(it) = rhs.split(" iter_args(").nth(1) {
                    let it = it.split(") ->").next().unwrap();
                    for pair in it.split(", ") {
                        let r = refs(pair);
                        iters.push((n.slot(&r[0]), n.slot(&r[1])));
                    }
                }
                let (body, _) = parse_body(lines, n);
                out.push(S::For {
                    res,
                    iv,
                    bounds,
                    iters,
                    body,
                });
                continue;
            }
            "scf.if" => {
                let cond = n.slot(&refs(rhs)[0]);
                let (then, has_else) = parse_body(lines, n);
                let els = if has_else {
                    parse_body(lines, n).0
                } else {
                    Vec::new()
                };
                out.push(S::If {
                    res,
                    cond,
                    then,
                    els,
                });
                continue;
            }
            "scf.yield" => {
                out.push(S::Yield(args));
                continue;
            }
            "gpu.barrier" => {
                out.push(S::Barrier);
                continue;
            }
            "arith.constant" => {
                let lit = rhs["arith.constant ".len()..]
                    .split(" : ")
                    .next()
                    .unwrap()
                    .trim();
                let v = if ty.starts_with("vector<") {
                    let x: f32 = lit
                        .trim_start_matches("dense<")
                        .trim_end_matches('>')
                        .parse()
                        .unwrap();
                    V::Vec(vec![x; vec_len(ty)])
                } else if ty == "f32" || ty == "f16" || ty == "bf16" {
                    if let Some(h) = lit.strip_prefix("0x") {
                        V::F(f32::from_bits(u32::from_str_radix(h, 16).unwrap()))
                    } else {
                        V::F(lit.parse().unwrap())
                    }
                } else {
                    V::I(lit.parse().unwrap())
                };
                K::Const(v)
            }
            "arith.addi" | "arith.subi" | "arith.muli" | "arith.divui" | "arith.remui"
            | "arith.minui" => K::IBin(op[6..].to_string()),
            "arith.cmpi" => K::Cmpi(
                rhs.split_whitespace()
                    .nth(1)
                    .unwrap()
                    .trim_end_matches(',')
                    .into(),
            ),
            "arith.cmpf" => K::Cmpf(
                rhs.split_whitespace()
                    .nth(1)
                    .unwrap()
                    .trim_end_matches(',')
                    .into(),
            ),
            "arith.andi" => K::AndI,
            "arith.addf" | "arith.subf" | "arith.mulf" | "arith.divf" | "arith.maximumf"
            | "arith.minimumf" => K::FBin(op[6..].to_string()),
            "arith.negf" => K::Negf,
            "arith.select" => K::Select,
            "arith.extf" => K::Extf,
            "arith.truncf" if rhs.trim_end().ends_with("to bf16") => K::TruncBF16,
            "arith.truncf" => K::TruncF16,
            "arith.index_cast" => K::Id,
            "arith.uitofp" => K::Uitofp,
            "math.exp" | "math.rsqrt" | "math.tanh" | "math.sqrt" | "math.absf" => {
                K::Math(op[5..].to_string())
            }
            "memref.load" => K::Load(mem()),
            "memref.store" => K::Store(mem()),
            "memref.atomic_rmw" => {
                assert!(rhs.starts_with("memref.atomic_rmw addf "), "{line}");
                K::AtomicAdd(mem())
            }
            "vector.load" => K::VLoad(mem(), vec_len(ty)),
            "vector.store" => K::VStore(mem(), vec_len(ty)),
            // A packed pair of 16-bit values as an `i32` (bf16 mma operands): kept as the pair.
            "vector.bitcast" => K::Id,
            "vector.extract" if ty.starts_with("i32 from vector<1xi32>") => K::Id,
            "llvm.extractvalue" => {
                let i = operands.rfind('[').unwrap();
                let j = operands.rfind(']').unwrap();
                K::VExtract(operands[i + 1..j].trim().parse().unwrap())
            }
            "nvvm.mma.sync" => {
                assert!(
                    rhs.contains("shape = #nvvm.shape<m = 16, n = 8, k = 16>"),
                    "{line}"
                );
                assert_eq!(args.len(), 10, "{line}");
                K::MmaPacked
            }
            "vector.extract" => {
                let i = operands.rfind('[').unwrap();
                let j = operands.rfind(']').unwrap();
                let pos: Vec<usize> = operands[i + 1..j]
                    .split(',')
                    .map(|p| p.trim().parse().unwrap())
                    .collect();
                let dims = vec_dims(ty);
                let flat = pos.iter().zip(&dims).fold(0, |a, (p, d)| a * d + p);
                K::VExtract(flat)
            }
            "vector.from_elements" => K::FromElements,
            "vector.insert" => {
                let i = operands.rfind('[').unwrap();
                let j = operands.rfind(']').unwrap();
                let pos: Vec<usize> = operands[i + 1..j]
                    .split(',')
                    .map(|p| p.trim().parse().unwrap())
                    .collect();
                let dims = vec_dims(ty);
                K::VInsert(pos.iter().zip(&dims).fold(0, |a, (p, d)| a * d + p))
            }
            "nvgpu.mma.sync" => {
                assert!(rhs.contains("mmaShape = [16, 8, 16]"), "{line}");
                K::Mma
            }
            "vector.broadcast" => K::VBroadcast(vec_len(ty)),
            "vector.fma" => K::VFma,
            "gpu.thread_id" | "gpu.block_id" | "gpu.block_dim" | "gpu.grid_dim" => {
                let d = match rhs.split_whitespace().nth(1).unwrap() {
                    "x" => 0,
                    "y" => 1,
                    _ => 2,
                };
                let which = match op {
                    "gpu.thread_id" => "tid",
                    "gpu.block_id" => "bid",
                    "gpu.block_dim" => "bdim",
                    _ => "gdim",
                };
                K::Sreg(which, d)
            }
            "gpu.shuffle" => {
                let xor = rhs.split_whitespace().nth(1) == Some("xor");
                args.truncate(2); // value, offset (the width is always 32)
                K::Shuffle(xor)
            }
            other => panic!("emulator: unsupported op '{other}' in: {line}"),
        };
        out.push(S::Op { res, k, args });
    }
    (out, false)
}

fn parse(mlir: &str) -> Prog {
    let mut lines = mlir.lines().map(str::trim).filter(|l| !l.is_empty());
    let header = lines.next().expect("gpu.func line");
    assert!(header.starts_with("gpu.func @"), "{header}");
    let mut n = Names::default();
    let plist = &header[header.find('(').unwrap() + 1..header.find(')').unwrap()];
    let mut params = Vec::new();
    let mut mems = 0;
    for p in plist.split(", ") {
        let (name, ty) = p.split_once(':').unwrap();
        let (name, ty) = (name.trim(), ty.trim());
        let slot = n.slot(name);
        if ty.starts_with("memref") {
            n.mems.insert(name.to_string(), mems);
            params.push((slot, Some(mems)));
            mems += 1;
        } else {
            params.push((slot, None));
        }
    }
    let mut shared = Vec::new();
    if let Some(w) = header.split("workgroup(").nth(1) {
        let w = w.split(") kernel").next().unwrap();
        for p in w.split(", %") {
            let (name, ty) = p.split_once(" : ").unwrap();
            let name = format!("%{}", name.trim().trim_start_matches('%'));
            let len: usize = ty["memref<".len()..ty.find('x').unwrap()].parse().unwrap();
            n.mems.insert(name, mems);
            shared.push((mems, len));
            mems += 1;
        }
    }
    let (body, _) = parse_body(&mut lines, &mut n);
    Prog {
        body,
        slots: n.slots.len(),
        params,
        shared,
        mems,
    }
}

struct Warp<'a> {
    slots: Vec<AtomicU32>,
    /// mma.sync fragments: 12 values (8 of A, 4 of B) per lane.
    mma: Vec<AtomicU32>,
    bar: Barrier<'a>,
}

struct Thread<'a> {
    r: Vec<V>,
    mem: &'a [&'a [AtomicU32]],
    bar: &'a Barrier<'a>,
    warp: &'a Warp<'a>,
    lane: usize,
    sreg: [[i64; 3]; 4],
}

fn round_f16(x: f32) -> f32 {
    crate::gpu_ref::f16_to_f32(crate::gpu_ref::f32_to_f16(x))
}

impl Thread<'_> {
    fn get(&self, s: usize) -> &V {
        &self.r[s]
    }

    fn run(&mut self, body: &[S]) -> Option<Vec<V>> {
        for s in body {
            match s {
                S::Op { res, k, args } => self.op(res, k, args),
                S::For {
                    res,
                    iv,
                    bounds,
                    iters,
                    body,
                } => {
                    let (lb, ub, st) = (
                        self.get(bounds[0]).i(),
                        self.get(bounds[1]).i(),
                        self.get(bounds[2]).i(),
                    );
                    let mut cur: Vec<V> = iters.iter().map(|(_, x)| self.get(*x).clone()).collect();
                    let mut i = lb;
                    while i < ub {
                        self.r[*iv] = V::I(i);
                        for ((a, _), v) in iters.iter().zip(&cur) {
                            self.r[*a] = v.clone();
                        }
                        if let Some(y) = self.run(body) {
                            cur = y;
                        }
                        i += st;
                    }
                    for (r, v) in res.iter().zip(cur) {
                        self.r[*r] = v;
                    }
                }
                S::If {
                    res,
                    cond,
                    then,
                    els,
                } => {
                    let y = if self.get(*cond).b() {
                        self.run(then)
                    } else {
                        self.run(els)
                    };
                    if let Some(y) = y {
                        for (r, v) in res.iter().zip(y) {
                            self.r[*r] = v;
                        }
                    }
                }
                S::Yield(a) => return Some(a.iter().map(|x| self.get(*x).clone()).collect()),
                S::Barrier => {
                    self.bar.wait();
                }
            }
        }
        None
    }

    fn op(&mut self, res: &[usize], k: &K, a: &[usize]) {
        let g = |i: usize| a[i];
        let v = match k {
            K::Const(v) => v.clone(),
            K::IBin(op) => {
                let (x, y) = (self.get(g(0)).i(), self.get(g(1)).i());
                V::I(match op.as_str() {
                    "addi" => x + y,
                    "subi" => x - y,
                    "muli" => x * y,
                    "divui" => ((x as u64) / (y as u64)) as i64,
                    "remui" => ((x as u64) % (y as u64)) as i64,
                    "minui" => (x as u64).min(y as u64) as i64,
                    _ => unreachable!(),
                })
            }
            K::Cmpi(p) => {
                let (x, y) = (self.get(g(0)).i(), self.get(g(1)).i());
                let (ux, uy) = (x as u64, y as u64);
                V::B(match p.as_str() {
                    "ult" => ux < uy,
                    "ule" => ux <= uy,
                    "uge" => ux >= uy,
                    "ugt" => ux > uy,
                    "eq" => x == y,
                    "ne" => x != y,
                    "slt" => x < y,
                    o => panic!("cmpi {o}"),
                })
            }
            K::AndI => V::B(self.get(g(0)).b() && self.get(g(1)).b()),
            K::FBin(op) => {
                let (x, y) = (self.get(g(0)).f(), self.get(g(1)).f());
                V::F(match op.as_str() {
                    "addf" => x + y,
                    "subf" => x - y,
                    "mulf" => x * y,
                    "divf" => x / y,
                    "maximumf" => {
                        if x.is_nan() || y.is_nan() {
                            f32::NAN
                        } else {
                            x.max(y)
                        }
                    }
                    "minimumf" => {
                        if x.is_nan() || y.is_nan() {
                            f32::NAN
                        } else {
                            x.min(y)
                        }
                    }
                    _ => unreachable!(),
                })
            }
            K::Negf => V::F(-self.get(g(0)).f()),
            K::Cmpf(p) => {
                let (x, y) = (self.get(g(0)).f(), self.get(g(1)).f());
                V::B(match p.as_str() {
                    "oeq" => x == y,
                    "ogt" => x > y,
                    "olt" => x < y,
                    o => panic!("cmpf {o}"),
                })
            }
            K::Select => {
                if self.get(g(0)).b() {
                    self.get(g(1)).clone()
                } else {
                    self.get(g(2)).clone()
                }
            }
            K::Extf | K::Id => self.get(g(0)).clone(),
            K::TruncF16 => V::F(round_f16(self.get(g(0)).f())),
            K::TruncBF16 => V::F(crate::gpu_ref::round_bf16(&[self.get(g(0)).f()])[0]),
            K::Uitofp => V::F(self.get(g(0)).i() as f32),
            K::Math(m) => {
                let x = self.get(g(0)).f();
                V::F(match m.as_str() {
                    "exp" => x.exp(),
                    "rsqrt" => 1.0 / x.sqrt(),
                    "tanh" => x.tanh(),
                    "sqrt" => x.sqrt(),
                    "absf" => x.abs(),
                    _ => unreachable!(),
                })
            }
            K::Load(m) => {
                let i = self.get(g(0)).i() as usize;
                let mem = self.mem[*m];
                assert!(i < mem.len(), "load out of bounds: {i} >= {}", mem.len());
                V::F(f32::from_bits(mem[i].load(Relaxed)))
            }
            K::Store(m) => {
                let (x, i) = (self.get(g(0)).f(), self.get(g(1)).i() as usize);
                let mem = self.mem[*m];
                assert!(i < mem.len(), "store out of bounds: {i} >= {}", mem.len());
                mem[i].store(x.to_bits(), Relaxed);
                return;
            }
            K::AtomicAdd(m) => {
                let (x, i) = (self.get(g(0)).f(), self.get(g(1)).i() as usize);
                let mem = self.mem[*m];
                assert!(
                    i < mem.len(),
                    "atomic add out of bounds: {i} >= {}",
                    mem.len()
                );
                let old = mem[i]
                    .fetch_update(Relaxed, Relaxed, |b| {
                        Some((f32::from_bits(b) + x).to_bits())
                    })
                    .expect("always Some");
                V::F(f32::from_bits(old))
            }
            K::VLoad(m, n) => {
                let i = self.get(g(0)).i() as usize;
                let mem = self.mem[*m];
                assert!(i + n <= mem.len(), "vector load out of bounds");
                V::Vec(
                    (0..*n)
                        .map(|j| f32::from_bits(mem[i + j].load(Relaxed)))
                        .collect(),
                )
            }
            K::VStore(m, n) => {
                let (x, i) = (self.get(g(0)).v(), self.get(g(1)).i() as usize);
                let mem = self.mem[*m];
                assert!(i + n <= mem.len(), "vector store out of bounds");
                assert_eq!(x.len(), *n, "vector store of {} lanes as {n}", x.len());
                for (j, v) in x.iter().enumerate() {
                    mem[i + j].store(v.to_bits(), Relaxed);
                }
                return;
            }
            K::VExtract(p) => V::F(self.get(g(0)).v()[*p]),
            K::VBroadcast(n) => V::Vec(vec![self.get(g(0)).f(); *n]),
            K::FromElements => V::Vec(a.iter().map(|&x| self.get(x).f()).collect()),
            K::VInsert(p) => {
                let mut v = self.get(g(1)).v().to_vec();
                v[*p] = self.get(g(0)).f();
                V::Vec(v)
            }
            K::Mma | K::MmaPacked => {
                // mma.sync.m16n8k16.row.col (PTX ISA fragment layouts), lane = 4·g + t:
                // A (vector<4x2>): [0] = (g; 2t, 2t+1), [1] = (g+8; ..), [2] = (g; 2t+8, 2t+9),
                // [3] = (g+8; 2t+8, ..); B (vector<2x2>): [0] = (k 2t, 2t+1; n g),
                // [1] = (k 2t+8, 2t+9; n g); C/D (vector<2x2>): [0] = (g; 2t, 2t+1), [1] = (g+8; ..).
                // Packed (nvvm): A = 4 registers of 2 values, B = 2, C = 4 scalars, in the same
                // order.
                let (fa, fb, fc): (Vec<f32>, Vec<f32>, Vec<f32>) = if matches!(k, K::Mma) {
                    (
                        self.get(g(0)).v().to_vec(),
                        self.get(g(1)).v().to_vec(),
                        self.get(g(2)).v().to_vec(),
                    )
                } else {
                    let pairs = |r: std::ops::Range<usize>| -> Vec<f32> {
                        r.flat_map(|i| {
                            let p = self.get(g(i)).v();
                            assert_eq!(p.len(), 2, "packed register");
                            p.to_vec()
                        })
                        .collect()
                    };
                    (
                        pairs(0..4),
                        pairs(4..6),
                        (6..10).map(|i| self.get(g(i)).f()).collect(),
                    )
                };
                let ex = &self.warp.mma;
                for (i, x) in fa.iter().chain(&fb).enumerate() {
                    ex[self.lane * 12 + i].store(x.to_bits(), Relaxed);
                }
                self.warp.bar.wait();
                let at = |l: usize, i: usize| f32::from_bits(ex[l * 12 + i].load(Relaxed));
                let a_el = |r: usize, k: usize| {
                    let reg = usize::from(r >= 8) + 2 * usize::from(k >= 8);
                    at((r % 8) * 4 + (k % 8) / 2, reg * 2 + k % 2)
                };
                let b_el = |k: usize, n: usize| {
                    let reg = usize::from(k >= 8);
                    at(n * 4 + (k % 8) / 2, 8 + reg * 2 + k % 2)
                };
                let (gq, tq) = (self.lane / 4, self.lane % 4);
                let mut d = fc.to_vec();
                for (i, r) in [gq, gq + 8].into_iter().enumerate() {
                    for c in 0..2 {
                        let n = 2 * tq + c;
                        let s: f32 = (0..16).map(|k| a_el(r, k) * b_el(k, n)).sum();
                        d[i * 2 + c] += s;
                    }
                }
                self.warp.bar.wait();
                V::Vec(d)
            }
            K::VFma => {
                let (x, y, z) = (self.get(g(0)).v(), self.get(g(1)).v(), self.get(g(2)).v());
                V::Vec((0..x.len()).map(|j| x[j].mul_add(y[j], z[j])).collect())
            }
            K::Sreg(w, d) => {
                let which = match *w {
                    "tid" => 0,
                    "bid" => 1,
                    "bdim" => 2,
                    _ => 3,
                };
                V::I(self.sreg[which][*d])
            }
            K::Shuffle(xor) => {
                let x = self.get(g(0)).f();
                let o = self.get(g(1)).i() as usize;
                self.warp.slots[self.lane].store(x.to_bits(), Relaxed);
                self.warp.bar.wait();
                let src = if *xor { self.lane ^ o } else { o } % 32;
                let y = f32::from_bits(self.warp.slots[src].load(Relaxed));
                self.warp.bar.wait();
                self.r[res[0]] = V::F(y);
                self.r[res[1]] = V::B(true);
                return;
            }
        };
        if let Some(&r) = res.first() {
            self.r[r] = v;
        }
    }
}

/// Runs the kernel `mlir` (one `gpu.func`, as a `GpuKernel::mlir`) on `grid × block` with
/// `args` (one per parameter, in order); buffers are updated in place.
pub fn run(mlir: &str, grid: [u32; 3], block: [u32; 3], args: &mut [EArg]) {
    let p = parse(mlir);
    assert_eq!(p.params.len(), args.len(), "argument count");
    let threads = (block[0] * block[1] * block[2]) as usize;
    assert!(threads.is_multiple_of(32), "blocks of whole warps only");
    let globals: Vec<Vec<AtomicU32>> = args
        .iter()
        .filter_map(|a| match a {
            EArg::Buf(v) => Some(v.iter().map(|x| AtomicU32::new(x.to_bits())).collect()),
            _ => None,
        })
        .collect();
    let mut init = vec![V::I(0); p.slots];
    for ((slot, _), a) in p.params.iter().zip(args.iter()) {
        match a {
            EArg::Index(i) => init[*slot] = V::I(*i),
            EArg::F32(f) => init[*slot] = V::F(*f),
            EArg::Buf(_) => {}
        }
    }
    for bz in 0..grid[2] {
        for by in 0..grid[1] {
            for bx in 0..grid[0] {
                let shared: Vec<Vec<AtomicU32>> = p
                    .shared
                    .iter()
                    .map(|&(_, n)| (0..n).map(|_| AtomicU32::new(f32::NAN.to_bits())).collect())
                    .collect();
                let mut mem: Vec<&[AtomicU32]> = vec![&[]; p.mems];
                let mut gi = 0;
                for (_, m) in &p.params {
                    if let Some(m) = m {
                        mem[*m] = &globals[gi];
                        gi += 1;
                    }
                }
                for ((m, _), s) in p.shared.iter().zip(&shared) {
                    mem[*m] = s;
                }
                let poisoned = AtomicBool::new(false);
                let bar = Barrier::new(threads, &poisoned);
                let warps: Vec<Warp> = (0..threads / 32)
                    .map(|_| Warp {
                        slots: (0..32).map(|_| AtomicU32::new(0)).collect(),
                        mma: (0..32 * 12).map(|_| AtomicU32::new(0)).collect(),
                        bar: Barrier::new(32, &poisoned),
                    })
                    .collect();
                std::thread::scope(|sc| {
                    for t in 0..threads {
                        let (mem, bar, warps, init, p) = (&mem, &bar, &warps, &init, &p);
                        let poisoned = &poisoned;
                        let b = block.map(|x| x as usize);
                        let tid = [t % b[0], (t / b[0]) % b[1], t / (b[0] * b[1])];
                        std::thread::Builder::new()
                            .stack_size(256 << 10)
                            .spawn_scoped(sc, move || {
                                let _guard = PoisonOnPanic(poisoned);
                                let mut th = Thread {
                                    r: init.clone(),
                                    mem,
                                    bar,
                                    warp: &warps[t / 32],
                                    lane: t % 32,
                                    sreg: [
                                        tid.map(|x| x as i64),
                                        [bx, by, bz].map(i64::from),
                                        block.map(i64::from),
                                        grid.map(i64::from),
                                    ],
                                };
                                th.run(&p.body);
                            })
                            .expect("spawn");
                    }
                });
            }
        }
    }
    let mut gi = 0;
    for a in args.iter_mut() {
        if let EArg::Buf(v) = a {
            for (x, m) in v.iter_mut().zip(&globals[gi]) {
                *x = f32::from_bits(m.load(Relaxed));
            }
            gi += 1;
        }
    }
}
