//! The stable text form of a graph (used by `--print-after`, snapshots and debugging).
//!
//! ```text
//! graph "g" opset 17
//!   input %x: f32[N,4]
//!   const %w: f32[4,4]
//!   %y: f32[N,4] = MatMul(%x, %w)  # mm
//!   output %y
//! ```

use crate::graph::Graph;
use crate::tensor::Tensor;
use std::fmt::Write;

/// Constants with at most this many elements are printed with their values.
const SHOW_VALUES: usize = 8;

fn const_text(t: &Tensor) -> String {
    if t.len() <= SHOW_VALUES {
        let vals = t.to_f64_vec();
        let v: Vec<String> = vals.iter().map(|x| format!("{x}")).collect();
        format!(" = [{}]", v.join(", "))
    } else {
        String::new()
    }
}

/// Renders the graph as text. Only constants that nodes or outputs use are listed.
pub fn to_text(g: &Graph) -> String {
    let mut s = String::new();
    let name = |i: usize| format!("%{}", g.values[i].name);
    let ty = |i: usize| {
        let f = &g.values[i].fact;
        format!("{}{}", f.dtype, f.shape)
    };
    let _ = writeln!(s, "graph \"{}\" opset {}", g.name, g.opset);
    for &i in &g.inputs {
        let _ = writeln!(s, "  input {}: {}", name(i), ty(i));
    }
    let prod = g.producers();
    let uses = g.use_counts();
    for (i, v) in g.values.iter().enumerate() {
        if prod[i].is_none() && uses[i] > 0 {
            if let Some(t) = v.fact.value() {
                let _ = writeln!(s, "  const {}: {}{}", name(i), ty(i), const_text(t));
            }
        }
    }
    for n in &g.nodes {
        let outs: Vec<String> = n
            .outputs
            .iter()
            .map(|&o| format!("{}: {}", name(o), ty(o)))
            .collect();
        let ins: Vec<String> = n
            .inputs
            .iter()
            .map(|i| i.map(name).unwrap_or_else(|| "_".into()))
            .collect();
        let _ = writeln!(
            s,
            "  {} = {}({})  # {}",
            outs.join(", "),
            n.op.attrs_text(),
            ins.join(", "),
            n.name
        );
    }
    for &o in &g.outputs {
        let _ = writeln!(s, "  output {}", name(o));
    }
    s
}
