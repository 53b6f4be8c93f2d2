//! Fused GEMM epilogues: what a GEMM kernel applies to each f32 accumulator before the
//! store, in this fixed order (the CPU reference [`Epilogue::apply`] is the definition):
//!
//! ```text
//! y = alpha · acc
//! y = y + bias[col]                        if bias
//! y = y + beta · R[row, col]               if residual == BeforeActivation
//! y = act(y)                               relu | gelu-tanh | sigmoid | silu | tanh
//! y = y + beta · R[row, col]               if residual == AfterActivation
//! ```
//!
//! `alpha` and `beta` are runtime `f32` kernel parameters; `bias` is an `f32` buffer of `N`
//! values (per output column); the residual `R` has the output's shape, element type and
//! batch stride. The activations use `math.exp` (and `math.tanh` for tanh) only (sigmoid = 1 / (1 + e^-x),
//! gelu-tanh(x) = x · sigmoid(2·√(2/π)·(x + 0.044715·x³)), which equals
//! `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`).

use std::fmt::Write as _;

/// The activation applied by an [`Epilogue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// GELU, tanh approximation.
    GeluTanh,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `x · sigmoid(x)` (swish).
    Silu,
    /// Hyperbolic tangent (`math.tanh`, libdevice).
    Tanh,
}

impl Activation {
    /// Every activation (for tests and tuning spaces).
    pub const ALL: [Activation; 6] = [
        Activation::None,
        Activation::Relu,
        Activation::GeluTanh,
        Activation::Sigmoid,
        Activation::Silu,
        Activation::Tanh,
    ];

    /// The activation on the CPU (the reference the kernels are tested against).
    pub fn apply(self, x: f32) -> f32 {
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        match self {
            Activation::None => x,
            Activation::Relu => x.max(0.0),
            Activation::GeluTanh => x * sig(2.0 * GELU_C * (x + 0.044715 * x * x * x)),
            Activation::Sigmoid => sig(x),
            Activation::Silu => x * sig(x),
            Activation::Tanh => x.tanh(),
        }
    }
}

/// √(2/π), the GELU tanh-approximation constant.
const GELU_C: f32 = 0.797_884_6;

/// Where the residual `beta · R` is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Residual {
    /// No residual input.
    #[default]
    None,
    /// Added before the activation (`act(acc + R)`, e.g. ResNet blocks).
    BeforeActivation,
    /// Added after the activation (`act(acc) + R`, e.g. transformer residuals).
    AfterActivation,
}

/// A fused GEMM epilogue (see the module docs for the order of operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Epilogue {
    /// Add `bias[col]` (an `f32` buffer of `N` values).
    pub bias: bool,
    /// The activation.
    pub activation: Activation,
    /// The residual input and where it is added.
    pub residual: Residual,
}

impl Epilogue {
    /// `y = alpha · acc` only.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether the kernel takes a residual buffer and a `beta` parameter.
    pub fn has_residual(&self) -> bool {
        self.residual != Residual::None
    }

    /// A short name for kernel names and tables (`bias_relu_res`).
    pub fn tag(&self) -> String {
        let mut parts = Vec::new();
        if self.bias {
            parts.push("bias");
        }
        let act = match self.activation {
            Activation::None => "",
            Activation::Relu => "relu",
            Activation::GeluTanh => "gelu",
            Activation::Sigmoid => "sigmoid",
            Activation::Silu => "silu",
            Activation::Tanh => "tanh",
        };
        match self.residual {
            Residual::None => parts.push(act),
            Residual::BeforeActivation => parts.extend(["res", act]),
            Residual::AfterActivation => parts.extend([act, "res"]),
        }
        let t: Vec<&str> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        if t.is_empty() {
            "plain".into()
        } else {
            t.join("_")
        }
    }

    /// The epilogue of a [`Epilogue::tag`] (its inverse); `None` for anything else.
    pub fn from_tag(tag: &str) -> Option<Self> {
        let mut e = Self::none();
        if tag == "plain" {
            return Some(e);
        }
        let mut seen_act = false;
        for part in tag.split('_') {
            match part {
                "bias" if !e.bias && !seen_act && !e.has_residual() => e.bias = true,
                "res" if !e.has_residual() => {
                    e.residual = if seen_act {
                        Residual::AfterActivation
                    } else {
                        Residual::BeforeActivation
                    }
                }
                act if !seen_act => {
                    e.activation = match act {
                        "relu" => Activation::Relu,
                        "gelu" => Activation::GeluTanh,
                        "sigmoid" => Activation::Sigmoid,
                        "silu" => Activation::Silu,
                        "tanh" => Activation::Tanh,
                        _ => return None,
                    };
                    seen_act = true;
                }
                _ => return None,
            }
        }
        // A residual with no activation is written `res` (before = after).
        (e.tag() == tag).then_some(e)
    }

    /// The epilogue on the CPU: `acc` is the f32 dot product, `bias` the column's bias (when
    /// [`Epilogue::bias`]), `residual` the `R[row, col]` value (when it has one).
    pub fn apply(&self, acc: f32, alpha: f32, beta: f32, bias: f32, residual: f32) -> f32 {
        let mut y = alpha * acc;
        if self.bias {
            y += bias;
        }
        if self.residual == Residual::BeforeActivation {
            y += beta * residual;
        }
        y = self.activation.apply(y);
        if self.residual == Residual::AfterActivation {
            y += beta * residual;
        }
        y
    }
}

/// Emits MLIR (one op per line, fresh `%{p}_*` names) for `act(%x)` and returns the result
/// name. `x` is an `f32` value.
pub fn emit_activation(w: &mut String, act: Activation, x: &str, p: &str) -> String {
    let mut line = |s: String| {
        let _ = writeln!(w, "      {s}");
    };
    // %{p}_sg = 1 / (1 + exp(-v))
    let sigmoid = |v: &str, line: &mut dyn FnMut(String)| {
        line(format!("%{p}_sn = arith.negf {v} : f32"));
        line(format!("%{p}_se = math.exp %{p}_sn : f32"));
        line(format!("%{p}_one = arith.constant 1.0 : f32"));
        line(format!("%{p}_sd = arith.addf %{p}_se, %{p}_one : f32"));
        line(format!("%{p}_sg = arith.divf %{p}_one, %{p}_sd : f32"));
        format!("%{p}_sg")
    };
    match act {
        Activation::None => x.to_string(),
        Activation::Relu => {
            line(format!("%{p}_z = arith.constant 0.0 : f32"));
            line(format!("%{p}_r = arith.maximumf {x}, %{p}_z : f32"));
            format!("%{p}_r")
        }
        Activation::Sigmoid => sigmoid(x, &mut line),
        Activation::Tanh => {
            line(format!("%{p}_r = math.tanh {x} : f32"));
            format!("%{p}_r")
        }
        Activation::Silu => {
            let s = sigmoid(x, &mut line);
            line(format!("%{p}_r = arith.mulf {x}, {s} : f32"));
            format!("%{p}_r")
        }
        Activation::GeluTanh => {
            line(format!("%{p}_k = arith.constant 0.044715 : f32"));
            line(format!(
                "%{p}_c2 = arith.constant {:.9e} : f32",
                2.0 * GELU_C
            ));
            line(format!("%{p}_x2 = arith.mulf {x}, {x} : f32"));
            line(format!("%{p}_x3 = arith.mulf %{p}_x2, {x} : f32"));
            line(format!("%{p}_kx3 = arith.mulf %{p}_k, %{p}_x3 : f32"));
            line(format!("%{p}_in = arith.addf {x}, %{p}_kx3 : f32"));
            line(format!("%{p}_u = arith.mulf %{p}_c2, %{p}_in : f32"));
            let s = sigmoid(&format!("%{p}_u"), &mut line);
            line(format!("%{p}_r = arith.mulf {x}, {s} : f32"));
            format!("%{p}_r")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for bias in [false, true] {
            for activation in Activation::ALL {
                for residual in [
                    Residual::None,
                    Residual::BeforeActivation,
                    Residual::AfterActivation,
                ] {
                    let e = Epilogue {
                        bias,
                        activation,
                        residual,
                    };
                    let back = Epilogue::from_tag(&e.tag()).unwrap();
                    assert_eq!(back.tag(), e.tag());
                    let same = if activation == Activation::None && e.has_residual() {
                        back.residual == Residual::BeforeActivation
                    } else {
                        back == e
                    };
                    assert!(same, "{e:?} -> {back:?}");
                    for (x, r) in [(-1.5f32, 0.25f32), (2.0, -3.0)] {
                        assert_eq!(
                            e.apply(x, 1.0, 1.0, 0.5, r),
                            back.apply(x, 1.0, 1.0, 0.5, r)
                        );
                    }
                }
            }
        }
        for bad in [
            "",
            "bias_bias",
            "relu_relu",
            "res_res",
            "foo",
            "relu_bias",
            "plain_relu",
        ] {
            assert_eq!(Epilogue::from_tag(bad), None, "{bad}");
        }
    }

    #[test]
    fn order_of_operations() {
        let e = Epilogue {
            bias: true,
            activation: Activation::Relu,
            residual: Residual::AfterActivation,
        };
        // relu(2·-3 + 1) + 0.5·4 = 0 + 2
        assert_eq!(e.apply(-3.0, 2.0, 0.5, 1.0, 4.0), 2.0);
        let e = Epilogue {
            residual: Residual::BeforeActivation,
            ..e
        };
        // relu(-6 + 1 + 2) = 0
        assert_eq!(e.apply(-3.0, 2.0, 0.5, 1.0, 4.0), 0.0);
        assert_eq!(e.tag(), "bias_res_relu");
        assert_eq!(Epilogue::none().tag(), "plain");
    }

    #[test]
    fn activations_match_their_definitions() {
        for x in [-3.0f32, -0.5, 0.0, 0.7, 2.5] {
            let t = (GELU_C * (x + 0.044715 * x * x * x)).tanh();
            assert!((Activation::GeluTanh.apply(x) - 0.5 * x * (1.0 + t)).abs() < 1e-6);
            assert!((Activation::Sigmoid.apply(x) - 1.0 / (1.0 + (-x).exp())).abs() < 1e-7);
            assert_eq!(Activation::Relu.apply(x), x.max(0.0));
            assert_eq!(Activation::Tanh.apply(x), x.tanh());
        }
    }

    #[test]
    fn emitted_activation_names_are_fresh() {
        for act in Activation::ALL {
            let mut w = String::new();
            let r = emit_activation(&mut w, act, "%v", "e0");
            assert!(
                act == Activation::None || w.contains(&format!("{r} = ")),
                "{w}"
            );
        }
    }
}
