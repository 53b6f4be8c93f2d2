//! Tensor shapes with symbolic dimensions, and ONNX broadcasting.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The largest rank Kiln accepts for a tensor (a guard against absurd shapes in bad input).
pub const MAX_RANK: usize = 64;

/// One dimension of a shape: a known size, or a symbol (`batch`, `seq`, or `?` for an
/// anonymous unknown size; two `?` are never assumed equal).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// A size known at compile time.
    Known(usize),
    /// A named symbolic size; `"?"` means unknown and anonymous.
    Sym(String),
}

impl Dim {
    /// An anonymous unknown dimension.
    pub fn unknown() -> Dim {
        Dim::Sym("?".into())
    }

    /// The size when known.
    pub fn known(&self) -> Option<usize> {
        match self {
            Dim::Known(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }

    /// True when this is the anonymous unknown `?`.
    pub fn is_anonymous(&self) -> bool {
        matches!(self, Dim::Sym(s) if s == "?")
    }

    /// True when the two dims may denote the same size (known and equal, same symbol, or an
    /// anonymous unknown / a symbol against anything).
    pub fn compatible(&self, other: &Dim) -> bool {
        match (self, other) {
            (Dim::Known(a), Dim::Known(b)) => a == b,
            _ => true,
        }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::Known(n)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// A shape: a list of dimensions (rank 0 is a scalar).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// A fully known shape.
    pub fn known(dims: &[usize]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::Known(d)).collect())
    }

    /// A shape of `rank` anonymous unknown dims.
    pub fn unknown(rank: usize) -> Shape {
        Shape(vec![Dim::unknown(); rank])
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// The dims.
    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    /// All sizes, if every dim is known.
    pub fn as_known(&self) -> Option<Vec<usize>> {
        self.0.iter().map(Dim::known).collect()
    }

    /// True if every dim is known.
    pub fn is_known(&self) -> bool {
        self.0.iter().all(|d| d.known().is_some())
    }

    /// Number of elements, if known.
    pub fn numel(&self) -> Option<usize> {
        self.as_known().map(|v| v.iter().product())
    }

    /// Dimension `i`.
    pub fn dim(&self, i: usize) -> &Dim {
        &self.0[i]
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Shape {
        Shape::known(&v)
    }
}

impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Shape {
        Shape::known(v)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Normalises a possibly negative ONNX axis against `rank`. Errors when out of range.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) && !(r == 0 && a == 0) {
        return Err(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// Multidirectional (numpy-style) broadcast of concrete shapes, as ONNX defines it.
pub fn broadcast_shapes(shapes: &[&[usize]]) -> Result<Vec<usize>, String> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let off = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[off + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(format!("shapes {shapes:?} cannot be broadcast together"));
            }
        }
    }
    Ok(out)
}

/// Multidirectional broadcast of symbolic shapes. A symbol against 1 gives the symbol; two
/// different symbols give the anonymous `?`.
pub fn broadcast_dims(shapes: &[&Shape]) -> Result<Shape, String> {
    let rank = shapes.iter().map(|s| s.rank()).max().unwrap_or(0);
    let mut out = vec![Dim::Known(1); rank];
    for s in shapes {
        let off = rank - s.rank();
        for (i, d) in s.0.iter().enumerate() {
            let o = &mut out[off + i];
            *o = match (&*o, d) {
                (Dim::Known(1), d) => d.clone(),
                (o, Dim::Known(1)) => o.clone(),
                (Dim::Known(a), Dim::Known(b)) if a == b => Dim::Known(*a),
                (Dim::Known(a), Dim::Known(b)) => {
                    return Err(format!(
                        "shapes {} cannot be broadcast together (dim {a} vs {b})",
                        shapes
                            .iter()
                            .map(|s| s.to_string())
                            .collect::<Vec<_>>()
                            .join(" and ")
                    ))
                }
                (Dim::Known(a), Dim::Sym(_)) | (Dim::Sym(_), Dim::Known(a)) => Dim::Known(*a),
                (Dim::Sym(a), Dim::Sym(b)) if a == b => Dim::Sym(a.clone()),
                _ => Dim::unknown(),
            };
        }
    }
    Ok(Shape(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_concrete() {
        assert_eq!(
            broadcast_shapes(&[&[2, 1, 4], &[3, 1]]).unwrap(),
            vec![2, 3, 4]
        );
        assert!(broadcast_shapes(&[&[2], &[3]]).is_err());
        assert_eq!(broadcast_shapes(&[&[], &[5]]).unwrap(), vec![5]);
    }

    #[test]
    fn broadcast_symbolic() {
        let a = Shape(vec![Dim::Sym("N".into()), Dim::Known(1)]);
        let b = Shape::known(&[4]);
        assert_eq!(broadcast_dims(&[&a, &b]).unwrap().to_string(), "[N,4]");
    }

    #[test]
    fn axes() {
        assert_eq!(norm_axis(-1, 3).unwrap(), 2);
        assert!(norm_axis(3, 3).is_err());
        assert_eq!(norm_axis(0, 0).unwrap(), 0);
    }
}
