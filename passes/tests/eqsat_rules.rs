//! Property tests of the eqsat rules: for every rule, random instances of its left-hand side
//! (random dims, random values, broadcasting shapes where the rule allows them) are put in
//! an e-graph, the rule alone is run once, the rewritten term is extracted (preferring the
//! e-nodes the rule added), and both sides are run with the reference interpreter on the
//! same random inputs: dtype, shape and values must agree.

use egg::{CostFunction, Id, Language, RecExpr, Runner};
use kiln_ir::ops::array::{ArrayOp, IntsArg};
use kiln_ir::ops::linalg::{Gemm, LinalgOp};
use kiln_ir::ops::nn::{
    AutoPad, BatchNormAttrs, ConvAttrs, MaxPoolAttrs, NnOp, PoolAttrs, PoolKind, WindowAttrs,
};
use kiln_ir::{interp, DType, Fact, Graph, Op, Shape, Tensor};
use kiln_passes::eqsat::analysis::{KilnAnalysis, KilnEGraph};
use kiln_passes::eqsat::convert::to_graph;
use kiln_passes::eqsat::language::{Kiln, UNARY};
use kiln_passes::eqsat::rules;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// A test instance: rule, left-hand side with leaves `xN` (inputs) and `kN` (constants),
/// and the leaf specs `name[=kind]: dims` (dims: numbers, or letters drawn in 1..=4; kinds:
/// `+` positive, `0`/`1` filled, `i:v,...` an int64 vector whose entries may be dim letters).
struct Case {
    rule: String,
    lhs: String,
    leaves: Vec<String>,
    /// Whether the rule must apply (`false`: an instance where it would be unsound).
    applies: bool,
}

fn case(rule: &str, lhs: &str, leaves: &[&str]) -> Case {
    Case {
        rule: rule.into(),
        lhs: lhs.into(),
        leaves: leaves.iter().map(|s| s.to_string()).collect(),
        applies: true,
    }
}

/// An instance the rule must leave alone (its condition is what keeps it sound).
fn no_case(rule: &str, lhs: &str, leaves: &[&str]) -> Case {
    Case {
        applies: false,
        ..case(rule, lhs, leaves)
    }
}

fn cases() -> Vec<Case> {
    let mn = ["x0: m n", "x1: n"];
    let three = ["x0: m n", "x1: n", "x2: m 1"];
    let kk = ["x0: m n", "k1: n", "k2: m 1"];
    let mut c = vec![
        case("add-comm", "(add x0 x1)", &mn),
        case("mul-comm", "(mul x0 x1)", &["x0: m 1", "x1: n"]),
        case("add-assoc", "(add (add x0 k1) k2)", &kk),
        case("add-assoc-rev", "(add k2 (add k1 x0))", &kk),
        case("mul-assoc", "(mul (mul x0 k1) k2)", &kk),
        case("mul-assoc-rev", "(mul k2 (mul k1 x0))", &kk),
        case("add-zero", "(add x0 k0)", &["x0: m n", "k0=0: n"]),
        case("sub-zero", "(sub x0 k0)", &["x0: m n", "k0=0: 1"]),
        case("mul-one", "(mul x0 k0)", &["x0: m n", "k0=1: 1 n"]),
        case("div-one", "(div x0 k0)", &["x0: m n", "k0=1:"]),
        case("neg-neg", "(neg (neg x0))", &["x0: m n"]),
        case("relu-relu", "(relu (relu x0))", &["x0: m n"]),
        case("abs-abs", "(abs (abs x0))", &["x0: m n"]),
        case("abs-neg", "(abs (neg x0))", &["x0: m n"]),
        case("relu-abs", "(relu (abs x0))", &["x0: m n"]),
        case("sub-to-add-neg", "(sub x0 x1)", &mn),
        case("add-neg-to-sub", "(add x0 (neg x1))", &mn),
        case("neg-sub", "(neg (sub x0 x1))", &mn),
        case("mul-distrib", "(mul x2 (add x1 x0))", &three),
        case("mul-factor", "(add (mul x2 x1) (mul x2 x0))", &three),
        case("neg-mul", "(neg (mul x0 x1))", &mn),
        case("mul-neg", "(mul (neg x0) x1)", &mn),
        case(
            "relu-pos-scale",
            "(relu (mul x0 k0))",
            &["x0: m n", "k0=+: n"],
        ),
        case(
            "add-same-scale",
            "(add (mul x0 x2) (mul x1 x2))",
            &["x0: m n", "x1: m n", "x2: n"],
        ),
        // MatMul
        case(
            "matmul-assoc",
            "(matmul (matmul x0 x1) x2)",
            &["x0: b m k", "x1: k n", "x2: n p"],
        ),
        case(
            "matmul-assoc-rev",
            "(matmul x0 (matmul x1 x2))",
            &["x0: m k", "x1: k n", "x2: n p"],
        ),
        case(
            "matmul-distrib-r",
            "(matmul x0 (add x1 x2))",
            &["x0: b m k", "x1: k n", "x2: k n"],
        ),
        case(
            "matmul-factor-r",
            "(add (matmul x0 x1) (matmul x0 x2))",
            &["x0: b m k", "x1: k n", "x2: k n"],
        ),
        case(
            "matmul-distrib-l",
            "(matmul (add x0 x1) x2)",
            &["x0: m k", "x1: m k", "x2: b k n"],
        ),
        case(
            "matmul-factor-l",
            "(add (matmul x0 x2) (matmul x1 x2))",
            &["x0: m k", "x1: m k", "x2: b k n"],
        ),
        case(
            "matmul-scale-l",
            "(matmul (mul x0 k0) x1)",
            &["x0: m k", "k0: 1", "x1: k n"],
        ),
        case(
            "matmul-scale-r",
            "(matmul x0 (mul x1 k0))",
            &["x0: b m k", "x1: k n", "k0:"],
        ),
        case(
            "scale-into-matmul-r",
            "(mul (matmul x0 x1) k0)",
            &["x0: b m k", "x1: k n", "k0: 1"],
        ),
        case(
            "scale-into-matmul-l",
            "(mul (matmul x0 x1) k0)",
            &["x0: m k", "x1: b k n", "k0:"],
        ),
        case(
            "matmul-neg",
            "(matmul (neg x0) x1)",
            &["x0: b m k", "x1: k n"],
        ),
        case(
            "transpose-matmul",
            "(transpose [0,2,1] (matmul x0 x1))",
            &["x0: b m k", "x1: b k n"],
        ),
        case(
            "matmul-transpose",
            "(matmul (transpose [1,0] x1) (transpose [1,0] x0))",
            &["x0: m k", "x1: k n"],
        ),
        case(
            "matmul-concat-split",
            "(matmul x0 (concat -1 x1 x2))",
            &["x0: b m k", "x1: k n", "x2: k p"],
        ),
        case(
            "matmul-concat-join",
            "(concat -1 (matmul x0 x1) (matmul x0 x2))",
            &["x0: b m k", "x1: k n", "x2: k p"],
        ),
        case(
            "matmul-rows-split",
            "(matmul (concat -2 x0 x2) x1)",
            &["x0: m k", "x2: p k", "x1: k n"],
        ),
        case(
            "matmul-rows-join",
            "(concat -2 (matmul x0 x1) (matmul x2 x1))",
            &["x0: m k", "x2: p k", "x1: k n"],
        ),
        case(
            "merge-parallel-matmul",
            "(add (matmul x0 k0) (matmul x0 k1))",
            &["x0: b m k", "k0: k n", "k1: k n"],
        ),
        case(
            "merge-stacked-matmul",
            "(add (add (matmul x0 k0) (matmul x0 k1)) (matmul x0 k2))",
            &["x0: m k", "k0: k n", "k1: k n", "k2: k n"],
        ),
        case(
            "merge-stacked-linear",
            "(mul (add (add (matmul x0 k0) k3) (add k4 (matmul x0 k1))) (add (matmul x0 k2) k5))",
            &[
                "x0: m k", "k0: k n", "k1: k n", "k2: k n", "k3: n", "k4: n", "k5: n",
            ],
        ),
        case(
            "merge-shared-weight",
            "(concat -2 (matmul x0 k0) (matmul x1 k0) (matmul x2 k0))",
            &["x0: m k", "x1: p k", "x2: 1 k", "k0: b k n"],
        ),
        case(
            "merge-shared-weight",
            "(add (matmul (slice x0 k1 k2 k3 none) k0) (matmul (slice x0 k2 k4 k3 none) k0))",
            &["x0: 7 k", "k1=i:1", "k2=i:3", "k4=i:5", "k3=i:0", "k0: k n"],
        ),
        case(
            "gemm-to-matmul",
            "(op @G x0 k0 x1)",
            &["x0: m k", "k0: n k", "x1: n"],
        ),
        // layout
        case("transpose-identity", "(transpose [0,1] x0)", &["x0: m n"]),
        case(
            "reshape-reshape",
            "(reshape (reshape x0 k0) k1)",
            &["x0: 2 3 4", "k0=i:6,4", "k1=i:4,-1"],
        ),
        case(
            "reshape-identity",
            "(reshape x0 k0)",
            &["x0: m n", "k0=i:m,-1"],
        ),
        case(
            "transpose-transpose",
            "(transpose [1,2,0] (transpose [0,2,1] x0))",
            &["x0: a b c"],
        ),
        // concat / slice
        case("concat-single", "(concat 0 x0)", &["x0: m n"]),
        case(
            "concat-flatten-l",
            "(concat 1 (concat 1 x0 x1) x2)",
            &["x0: m a", "x1: m b", "x2: m c"],
        ),
        case(
            "concat-flatten-r",
            "(concat 1 x0 (concat 1 x1 x2))",
            &["x0: m a", "x1: m b", "x2: m c"],
        ),
        case(
            "slice-concat-first",
            "(slice (concat 1 x0 x1) k0 k1 k2 none)",
            &["x0: m a", "x1: m b", "k0=i:0", "k1=i:a", "k2=i:-1"],
        ),
        case(
            "slice-concat-second",
            "(slice (concat 1 x0 x1) k0 k1 k2 none)",
            &["x0: m a", "x1: m b", "k0=i:a", "k1=i:99", "k2=i:1"],
        ),
        // conv
        case(
            "conv-scale",
            "(mul (conv @C x0 k0 k1) k2)",
            &["x0: 1 c 5 5", "k0: o c 3 3", "k1: o", "k2: 1"],
        ),
        case(
            "conv-scale-nobias",
            "(mul (conv @C x0 k0 none) k2)",
            &["x0: 1 c 5 5", "k0: o c 3 3", "k2:"],
        ),
        case(
            "merge-parallel-conv",
            "(add (conv @C x0 k0 k1) (conv @C x0 k2 k3))",
            &[
                "x0: 1 c 5 5",
                "k0: o c 3 3",
                "k1: o",
                "k2: o c 3 3",
                "k3: o",
            ],
        ),
        case(
            "conv-enlarge",
            "(add (conv @Q x0 k0 k1) (conv @P x0 k2 k3))",
            &[
                "x0: 1 c h w",
                "k0: o c 1 1",
                "k1: o",
                "k2: o c 3 3",
                "k3: o",
            ],
        ),
        case(
            "conv-enlarge",
            "(add (conv @H x0 k0 none) (conv @V x0 k2 none))",
            &["x0: 1 c h w", "k0: o c 1 3", "k2: o c 3 1"],
        ),
        case(
            "merge-parallel-conv",
            "(concat 1 (conv @Q x0 k0 k1) (conv @P x0 k2 k3))",
            &[
                "x0: 2 c h w",
                "k0: o c 1 1",
                "k1: o",
                "k2: p c 3 3",
                "k3: p",
            ],
        ),
        case(
            "merge-parallel-conv",
            "(concat 1 (conv @H x0 k0 none) (conv @V x0 k2 none))",
            &["x0: 1 c h w", "k0: o c 1 3", "k2: p c 3 1"],
        ),
        case(
            "conv-bn-fold",
            "(op @B (conv @C x0 k0 k1) k2 k3 k4 k5)",
            &[
                "x0: 1 c 5 5",
                "k0: o c 3 3",
                "k1: o",
                "k2: o",
                "k3: o",
                "k4: o",
                "k5=+: o",
            ],
        ),
    ];
    // split algebra
    c.extend([
        case(
            "split-to-slices",
            "(out 1 (op @S x0 k0))",
            &["x0: m 5", "k0=i:2,3"],
        ),
        case(
            "slices-to-split",
            "(add (slice x0 k0 k1 k2 none) (slice x0 k1 k3 k2 none))",
            &["x0: m 4", "k0=i:0", "k1=i:2", "k2=i:1", "k3=i:4"],
        ),
        case(
            "split-concat",
            "(out 1 (op @S (concat 1 x0 x1) k0))",
            &["x0: m 2", "x1: m 3", "k0=i:2,3"],
        ),
        case(
            "concat-slices",
            "(concat 1 (slice x0 k0 k1 k2 none) (slice x0 k1 k3 k2 none))",
            &["x0: m 6", "k0=i:1", "k1=i:3", "k2=i:1", "k3=i:5"],
        ),
        case(
            "slice-full",
            "(slice x0 k0 k1 k2 none)",
            &["x0: m n", "k0=i:0", "k1=i:99", "k2=i:-1"],
        ),
        case(
            "conv-group-split",
            "(conv @R x0 k0 k1)",
            &["x0: b 4 5 5", "k0: 6 2 3 3", "k1: 6"],
        ),
        case(
            "conv-group-split",
            "(conv @R x0 k0 none)",
            &["x0: b 2 4 5", "k0: 2 1 3 3"],
        ),
        case(
            "conv-group-join",
            "(concat 1 (conv @C x0 k0 k1) (conv @C x1 k2 k3))",
            &[
                "x0: 1 c 5 5",
                "x1: 1 c 5 5",
                "k0: o c 3 3",
                "k1: o",
                "k2: o c 3 3",
                "k3: o",
            ],
        ),
    ]);
    // the rest of tensat's list
    let cv = [
        "x0: 1 c 5 5",
        "x1: 1 c 5 5",
        "k0: o c 3 3",
        "k1: o",
        "k2: o c 3 3",
        "k3: o",
    ];
    let gm = ["x0: a p", "x1: a q", "x2: b p", "x3: b q"];
    let mm = ["x0: m a", "x1: a n", "x2: m b", "x3: b n"];
    let pl = ["x0: n a 4 4", "x1: n b 4 4"];
    c.extend([
        case(
            "conv-input-scale",
            "(conv @C (mul x0 k0) k1 k2)",
            &["x0: 1 c 5 5", "k0: 1", "k1: o c 3 3", "k2: o"],
        ),
        case(
            "conv-factor-w",
            "(add (conv @C x0 k0 k1) (conv @C x0 k2 k3))",
            &cv,
        ),
        case(
            "conv-factor-w-nobias",
            "(add (conv @C x0 k0 none) (conv @C x0 k2 none))",
            &cv,
        ),
        case(
            "conv-factor-x",
            "(add (conv @C x0 k0 k1) (conv @C x1 k0 k3))",
            &cv,
        ),
        case(
            "conv-factor-x-nobias",
            "(add (conv @C x0 k0 none) (conv @C x1 k0 none))",
            &cv,
        ),
        case(
            "conv-batch-join",
            "(concat 0 (conv @P x0 k0 k1) (conv @P x1 k0 k1))",
            &["x0: a c h w", "x1: b c h w", "k0: o c 3 3", "k1: o"],
        ),
        case(
            "conv-batch-split",
            "(conv @P (concat 0 x0 x1) k0 k1)",
            &["x0: a c h w", "x1: b c h w", "k0: o c 3 3", "k1: o"],
        ),
        case(
            "conv-add-join",
            "(add (conv @P x0 k0 none) (conv @P x1 k1 none))",
            &["x0: n a h w", "x1: n b h w", "k0: o a 3 3", "k1: o b 3 3"],
        ),
        case(
            "conv-channel-split",
            "(conv @P (concat 1 x0 x1) (concat 1 k0 k1) none)",
            &["x0: n a h w", "x1: n b h w", "k0: o a 3 3", "k1: o b 3 3"],
        ),
        case(
            "concat-geometry",
            "(concat 0 (concat 1 x0 x1) (concat 1 x2 x3))",
            &gm,
        ),
        case(
            "concat-geometry-rev",
            "(concat 1 (concat 0 x0 x2) (concat 0 x1 x3))",
            &gm,
        ),
        case(
            "concat-scale",
            "(concat 1 (mul x0 k0) (mul x1 k0))",
            &["x0: m a", "x1: m b", "k0: 1"],
        ),
        case(
            "concat-transpose-1",
            "(concat 1 (transpose [1,0] x0) (transpose [1,0] x1))",
            &["x0: a n", "x1: b n"],
        ),
        case(
            "concat-transpose-0",
            "(concat 0 (transpose [1,0] x0) (transpose [1,0] x1))",
            &["x0: n a", "x1: n b"],
        ),
        case(
            "concat-pool-0",
            "(concat 0 (op @M x0) (op @M x1))",
            &["x0: a c 4 4", "x1: b c 4 4"],
        ),
        case("concat-pool-1", "(concat 1 (op @M x0) (op @M x1))", &pl),
        case(
            "avgpool-conv1x1-swap",
            "(add (conv @Q (op @A x0) k0 k1) (conv @Q x0 k2 k3))",
            &[
                "x0: b c 5 4",
                "k0: o c 1 1",
                "k1: o",
                "k2: o c 1 1",
                "k3: o",
            ],
        ),
        case(
            "avgpool-conv1x1-swap",
            "(add (conv @Q (op @I x0) k0 none) (conv @Q x0 k2 k3))",
            &["x0: b c 5 4", "k0: o c 1 1", "k2: o c 1 1", "k3: o"],
        ),
        // padded taps counted as zeros: the bias does not commute
        no_case(
            "avgpool-conv1x1-swap",
            "(add (conv @Q (op @I x0) k0 k1) (conv @Q x0 k2 k3))",
            &[
                "x0: b c 5 4",
                "k0: o c 1 1",
                "k1: o",
                "k2: o c 1 1",
                "k3: o",
            ],
        ),
        // a 3×3 Conv does not commute with the pool
        no_case(
            "avgpool-conv1x1-swap",
            "(add (conv @P (op @A x0) k0 k1) (conv @Q x0 k2 k3))",
            &[
                "x0: b c 5 4",
                "k0: o c 3 3",
                "k1: o",
                "k2: o c 1 1",
                "k3: o",
            ],
        ),
        // no 1×1 Conv of the pool's input to merge with: left alone
        no_case(
            "avgpool-conv1x1-swap",
            "(conv @Q (op @A x0) k0 k1)",
            &["x0: b c 5 4", "k0: o c 1 1", "k1: o"],
        ),
        case(
            "conv1x1-avgpool-swap",
            "(op @A (conv @Q x0 k0 k1))",
            &["x0: b 2 5 4", "k0: 5 2 1 1", "k1: 5"],
        ),
        no_case(
            "conv1x1-avgpool-swap",
            "(op @I (conv @Q x0 k0 k1))",
            &["x0: b 2 5 4", "k0: 5 2 1 1", "k1: 5"],
        ),
        case(
            "matmul-concat-inner",
            "(matmul (concat -1 x0 x2) (concat -2 x1 x3))",
            &mm,
        ),
        case(
            "matmul-add-join",
            "(add (matmul x0 x1) (matmul x2 x3))",
            &mm,
        ),
    ]);
    let sl = |x: &str| format!("(slice {x} k0 k1 k2 none)");
    for b in ["add", "mul", "sub", "div"] {
        let l = ["x0: m 4", "x1=+: m 4", "k0=i:1", "k1=i:3", "k2=i:1"];
        c.push(case(
            &format!("slice-sink-{b}"),
            &sl(&format!("({b} x0 x1)")),
            &l,
        ));
        c.push(case(
            &format!("slice-lift-{b}"),
            &format!("({b} {} {})", sl("x0"), sl("x1")),
            &l,
        ));
    }
    for (u, _, _) in UNARY {
        let l = ["x0=+: 4 n", "k0=i:-3", "k1=i:-1", "k2=i:0"];
        c.push(case(
            &format!("slice-sink-{u}"),
            &sl(&format!("({u} x0)")),
            &l,
        ));
        c.push(case(
            &format!("slice-lift-{u}"),
            &format!("({u} {})", sl("x0")),
            &l,
        ));
    }
    for b in ["add", "mul"] {
        c.push(case(
            &format!("concat-{b}"),
            &format!("(concat 0 ({b} x0 x1) ({b} x2 x3))"),
            &["x0: a n", "x1: a n", "x2: b n", "x3: b n"],
        ));
    }
    for b in ["add", "mul", "sub", "div"] {
        let l = ["x0: m n", "x1=+: m n", "k0=i:-1"];
        c.push(case(
            &format!("transpose-sink-{b}"),
            &format!("(transpose [1,0] ({b} x0 x1))"),
            &l,
        ));
        c.push(case(
            &format!("transpose-lift-{b}"),
            &format!("({b} (transpose [1,0] x0) (transpose [1,0] x1))"),
            &l,
        ));
        c.push(case(
            &format!("reshape-lift-{b}"),
            &format!("({b} (reshape x0 k0) (reshape x1 k0))"),
            &l,
        ));
    }
    for (u, _, _) in UNARY {
        let l = ["x0=+: m n", "x1=+: m b", "k0=i:-1"];
        c.push(case(
            &format!("transpose-sink-{u}"),
            &format!("(transpose [1,0] ({u} x0))"),
            &l,
        ));
        c.push(case(
            &format!("transpose-lift-{u}"),
            &format!("({u} (transpose [1,0] x0))"),
            &l,
        ));
        c.push(case(
            &format!("reshape-sink-{u}"),
            &format!("(reshape ({u} x0) k0)"),
            &l,
        ));
        c.push(case(
            &format!("reshape-lift-{u}"),
            &format!("({u} (reshape x0 k0))"),
            &l,
        ));
        c.push(case(
            &format!("concat-{u}"),
            &format!("(concat 1 ({u} x0) ({u} x1))"),
            &l,
        ));
    }
    c
}

/// The ops `@C` (3x3 Conv), `@Q` (1x1 Conv), `@P` (3x3 Conv, pads 1), `@H` / `@V` (1x3 /
/// 3x1 Convs padded to keep the size), `@R` (3x3 Conv, 2 groups), `@S` (Split on axis 1,
/// sizes as input 1, 2 outputs), `@M` (2x2 MaxPool, stride 2), `@A` / `@I` (3x3
/// AveragePool, pads 1, padded taps not counted / counted), `@B` (inference BatchNormalization), `@G` (Gemm, transB).
fn setup_ops(an: &mut KilnAnalysis) -> HashMap<&'static str, String> {
    let conv = Op::Nn(NnOp::Conv(ConvAttrs {
        window: WindowAttrs {
            auto_pad: AutoPad::NotSet,
            kernel_shape: None,
            strides: None,
            dilations: None,
            pads: None,
        },
        group: 1,
    }));
    let bn = Op::Nn(NnOp::BatchNormalization(BatchNormAttrs {
        epsilon: 1e-5,
        momentum: 0.9,
        training: false,
        per_activation: false,
        num_outputs: 1,
    }));
    let gemm = Op::Linalg(LinalgOp::Gemm(Gemm {
        alpha: 1.0,
        beta: 1.0,
        trans_a: false,
        trans_b: true,
    }));
    let padded = |kernel: [usize; 2], pads: [usize; 4]| {
        Op::Nn(NnOp::Conv(ConvAttrs {
            window: WindowAttrs {
                auto_pad: AutoPad::NotSet,
                kernel_shape: Some(kernel.to_vec()),
                strides: None,
                dilations: None,
                pads: Some(pads.to_vec()),
            },
            group: 1,
        }))
    };
    let mut m = HashMap::new();
    m.insert("@C", an.intern_op(&conv, 1).to_string());
    m.insert("@Q", an.intern_op(&padded([1, 1], [0; 4]), 1).to_string());
    m.insert("@P", an.intern_op(&padded([3, 3], [1; 4]), 1).to_string());
    m.insert(
        "@H",
        an.intern_op(&padded([1, 3], [0, 1, 0, 1]), 1).to_string(),
    );
    m.insert(
        "@V",
        an.intern_op(&padded([3, 1], [1, 0, 1, 0]), 1).to_string(),
    );
    let grouped = Op::Nn(NnOp::Conv(ConvAttrs {
        window: WindowAttrs {
            auto_pad: AutoPad::NotSet,
            kernel_shape: None,
            strides: None,
            dilations: None,
            pads: None,
        },
        group: 2,
    }));
    m.insert("@R", an.intern_op(&grouped, 1).to_string());
    let split = Op::Array(ArrayOp::Split {
        axis: 1,
        split: IntsArg::Input(1),
        outputs: 2,
    });
    m.insert("@S", an.intern_op(&split, 2).to_string());
    let maxpool = Op::Nn(NnOp::MaxPool(MaxPoolAttrs {
        window: WindowAttrs {
            auto_pad: AutoPad::NotSet,
            kernel_shape: Some(vec![2, 2]),
            strides: Some(vec![2, 2]),
            dilations: None,
            pads: None,
        },
        ceil_mode: false,
        column_major_indices: false,
        with_indices: false,
    }));
    m.insert("@M", an.intern_op(&maxpool, 1).to_string());
    let avgpool = |count_include_pad: bool| {
        Op::Nn(NnOp::Pool(PoolAttrs {
            kind: PoolKind::Average { count_include_pad },
            window: WindowAttrs {
                auto_pad: AutoPad::NotSet,
                kernel_shape: Some(vec![3, 3]),
                strides: None,
                dilations: None,
                pads: Some(vec![1; 4]),
            },
            ceil_mode: false,
        }))
    };
    m.insert("@A", an.intern_op(&avgpool(false), 1).to_string());
    m.insert("@I", an.intern_op(&avgpool(true), 1).to_string());
    m.insert("@B", an.intern_op(&bn, 1).to_string());
    m.insert("@G", an.intern_op(&gemm, 1).to_string());
    m
}

/// Prefers e-nodes that were not in the original term (each original e-node costs 1000).
struct PreferNew(HashSet<Kiln>);

impl CostFunction<Kiln> for PreferNew {
    type Cost = f64;
    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &Kiln, mut costs: C) -> f64 {
        let own = if !enode.is_leaf() && self.0.contains(enode) {
            1000.0
        } else {
            1.0
        };
        enode.fold(own, |s, id| s + costs(id))
    }
}

fn graph_of(eg_an: &KilnAnalysis, expr: &RecExpr<Kiln>, template: &Graph) -> Graph {
    let mut eg = KilnEGraph::new(eg_an.clone());
    let mut ids: Vec<Id> = Vec::new();
    for n in expr.as_ref() {
        let n = n.clone().map_children(|c| ids[usize::from(c)]);
        ids.push(eg.add(n));
    }
    eg.rebuild();
    let mut choice = HashMap::new();
    for (i, n) in expr.as_ref().iter().enumerate() {
        let n = n.clone().map_children(|c| eg.find(ids[usize::from(c)]));
        choice.insert(eg.find(ids[i]), n);
    }
    let root = eg.find(*ids.last().unwrap());
    to_graph(&eg, &[root], &choice, template).unwrap_or_else(|e| panic!("{expr}: {e}"))
}

fn check_case(c: &Case, seed: u64) {
    let rule = rules::all()
        .into_iter()
        .find(|r| r.name.as_str() == c.rule)
        .unwrap_or_else(|| panic!("no rule {}", c.rule));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut dims: BTreeMap<String, usize> = BTreeMap::new();
    let mut dim = |t: &str, rng: &mut rand::rngs::StdRng| -> i64 {
        if let Ok(v) = t.parse::<i64>() {
            return v;
        }
        *dims
            .entry(t.to_string())
            .or_insert_with(|| rng.random_range(1..=4)) as i64
    };
    let mut an = KilnAnalysis::with_fold_limit(1 << 16);
    let mut subst: HashMap<String, String> = setup_ops(&mut an)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut template = Graph {
        name: c.rule.clone(),
        opset: 17,
        ..Default::default()
    };
    let mut inputs = Vec::new();
    for l in &c.leaves {
        let (head, ds) = l.split_once(':').expect("leaf spec");
        let (name, kind) = head.split_once('=').unwrap_or((head, ""));
        let name = name.trim();
        let kind = kind.trim();
        if kind == "i" {
            let v: Vec<i64> = ds.split(',').map(|t| dim(t.trim(), &mut rng)).collect();
            let k = an.add_const(Arc::new(Tensor::vec_i64(&v)), None);
            subst.insert(name.into(), k.to_string());
            continue;
        }
        let shape: Vec<usize> = ds
            .split_whitespace()
            .map(|t| dim(t, &mut rng) as usize)
            .collect();
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| match kind {
                "+" => rng.random_range(0.1f32..1.0),
                "0" => 0.0,
                "1" => 1.0,
                _ => rng.random_range(-1.0f32..1.0),
            })
            .collect();
        let t = Tensor::from_vec(&shape, v);
        if name.starts_with('x') {
            let f = Fact::new(DType::F32, Shape::known(&shape));
            an.inputs.insert(name.into(), f.clone());
            let id = template.add_value(name, f);
            template.inputs.push(id);
            inputs.push(t);
        } else {
            let k = an.add_const(Arc::new(t), None);
            subst.insert(name.into(), k.to_string());
        }
    }
    let text: String = c
        .lhs
        .replace('(', " ( ")
        .replace(')', " ) ")
        .split_whitespace()
        .map(|t| subst.get(t).cloned().unwrap_or_else(|| t.to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    let expr: RecExpr<Kiln> = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
    let y = template.add_value("y", Fact::new(DType::F32, Shape::unknown(0)));
    template.outputs.push(y);

    let mut eg = KilnEGraph::new(an.clone());
    let root = eg.add_expr(&expr);
    eg.rebuild();
    let original: HashSet<Kiln> = eg.classes().flat_map(|c| c.nodes.clone()).collect();
    let runner: Runner<Kiln, KilnAnalysis, ()> = Runner::default()
        .with_egraph(eg)
        .with_iter_limit(1)
        .run(std::slice::from_ref(&rule));
    let applied: usize = runner
        .iterations
        .iter()
        .filter_map(|it| it.applied.get(&rule.name).copied())
        .sum();
    if !c.applies {
        assert_eq!(
            applied, 0,
            "{}: applied to {text}, where it is unsound",
            c.rule
        );
        return;
    }
    assert!(
        applied > 0,
        "{}: rule did not apply to {text} ({dims:?})",
        c.rule
    );
    let eg = runner.egraph;
    let root = eg.find(root);
    let (_, alt) = egg::Extractor::new(&eg, PreferNew(original)).find_best(root);
    assert_ne!(alt, expr, "{}: nothing new extracted", c.rule);

    // the template output fact: the lhs's type
    let mut template = template;
    template.values[y].fact = eg[root].data.facts[0].clone();
    template.values[y].fact.value = None;
    let lhs_g = graph_of(&eg.analysis, &expr, &template);
    let rhs_g = graph_of(&eg.analysis, &alt, &template);
    let want = interp::run(&lhs_g, &inputs).unwrap_or_else(|e| panic!("{}: lhs: {e}", c.rule));
    let got = interp::run(&rhs_g, &inputs).unwrap_or_else(|e| panic!("{}: rhs {alt}: {e}", c.rule));
    for (a, e) in got.iter().zip(&want) {
        assert_eq!(a.dtype(), e.dtype(), "{}: dtype", c.rule);
        assert_eq!(a.shape(), e.shape(), "{}: shape ({alt})", c.rule);
        let (av, ev) = (a.to_f64_vec(), e.to_f64_vec());
        let scale = ev.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let err = av
            .iter()
            .zip(&ev)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f64, f64::max);
        assert!(
            err <= 1e-4 * scale,
            "{}: {text} vs {alt}: max error {err} ({dims:?})",
            c.rule
        );
    }
}

#[test]
fn every_rule_has_a_case() {
    let tested: HashSet<String> = cases().into_iter().map(|c| c.rule).collect();
    let missing: Vec<String> = rules::names()
        .into_iter()
        .filter(|n| !tested.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "rules without a property test: {missing:?}"
    );
    assert!(rules::names().len() >= 60, "{} rules", rules::names().len());
}

#[test]
fn rules_are_sound_on_random_instances() {
    let cs = cases();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = vec![];
    for c in &cs {
        for seed in 0..6 {
            let r = std::panic::catch_unwind(|| check_case(c, seed));
            if let Err(e) = r {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{} (seed {seed}): {msg}", c.rule));
                break;
            }
        }
    }
    let _ = std::panic::take_hook();
    println!("{} rule cases x 6 seeds", cs.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
