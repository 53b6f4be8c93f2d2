//! `kiln inspect`: a model's opset, inputs/outputs, op histogram and parameter size, and a
//! Graphviz rendering of the graph.

use kiln_ir::Graph;
use std::fmt::Write;

/// A human-readable summary of a graph.
pub fn summary(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "graph '{}'  opset {}", g.name, g.opset);
    let _ = writeln!(s, "inputs:");
    for &i in &g.inputs {
        let f = &g.values[i].fact;
        let _ = writeln!(s, "  {}: {}{}", g.values[i].name, f.dtype, f.shape);
    }
    let _ = writeln!(s, "outputs:");
    for &o in &g.outputs {
        let f = &g.values[o].fact;
        let _ = writeln!(s, "  {}: {}{}", g.values[o].name, f.dtype, f.shape);
    }
    let (params, bytes) = g.param_stats();
    let _ = writeln!(s, "nodes: {}", g.nodes.len());
    let _ = writeln!(s, "parameters: {params} ({bytes} bytes)");
    let _ = writeln!(s, "ops:");
    for (op, n) in g.op_histogram() {
        let _ = writeln!(s, "  {op:<24} {n}");
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The graph in Graphviz `dot` syntax: inputs/outputs as ellipses, nodes as boxes labelled
/// with their op type, edges labelled with dtype and shape.
pub fn to_dot(g: &Graph) -> String {
    let mut s = String::from(
        "digraph kiln {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n",
    );
    let prod = g.producers();
    for &i in &g.inputs {
        let _ = writeln!(
            s,
            "  v{i} [shape=ellipse, label=\"{}\"];",
            esc(&g.values[i].name)
        );
    }
    for (ni, n) in g.nodes.iter().enumerate() {
        let _ = writeln!(
            s,
            "  n{ni} [label=\"{}\\n{}\"];",
            n.op.op_type(),
            esc(&n.name)
        );
        for v in n.inputs.iter().flatten() {
            let f = &g.values[*v].fact;
            let src = match prod[*v] {
                Some(p) => format!("n{p}"),
                None if g.inputs.contains(v) => format!("v{v}"),
                None => continue, // constants are not drawn
            };
            let _ = writeln!(
                s,
                "  {src} -> n{ni} [label=\"{}{}\"];",
                f.dtype,
                esc(&f.shape.to_string())
            );
        }
    }
    for &o in &g.outputs {
        let _ = writeln!(
            s,
            "  o{o} [shape=ellipse, label=\"{}\"];",
            esc(&g.values[o].name)
        );
        if let Some(p) = prod[o] {
            let _ = writeln!(s, "  n{p} -> o{o};");
        }
    }
    s.push_str("}\n");
    s
}
