//! Reading the plan off a joint extraction: the replicated graph to emit (each part
//! replaced by the replicated e-node it was made from) and the split contractions.

use super::parts::is_weight;
use crate::eqsat::analysis::KilnEGraph;
use crate::eqsat::dist::Dist;
use crate::eqsat::language::Kiln;
use crate::parallel::plan::SplitKind;
use egg::{Id, Language};
use std::collections::HashMap;

type EG = KilnEGraph;

/// Reads the replicated graph off a joint extraction: for every replicated class the e-node
/// to emit (a part's twin where the extraction computes it on parts) and the classes whose
/// MatMul has its weight sharded.
pub(super) struct Globalize<'a> {
    pub eg: &'a EG,
    pub choice: &'a HashMap<Id, Kiln>,
    pub twins: HashMap<Kiln, Kiln>,
    pub out: HashMap<Id, Kiln>,
    pub splits: Vec<(Id, SplitKind)>,
}

impl Globalize<'_> {
    fn canon(&self, n: &Kiln) -> Kiln {
        n.clone().map_children(|c| self.eg.find(c))
    }

    fn chosen(&self, c: Id) -> Result<&Kiln, String> {
        self.choice
            .get(&self.eg.find(c))
            .ok_or_else(|| format!("no e-node chosen for class {c}"))
    }

    pub fn walk(&mut self, c: Id) -> Result<(), String> {
        let c = self.eg.find(c);
        if self.out.contains_key(&c) {
            return Ok(());
        }
        let n = self.chosen(c)?.clone();
        match n {
            Kiln::Gather([_, _, p]) | Kiln::AllReduce([_, p]) => self.of_part(c, p),
            Kiln::Shard(_) => Err("a shard chosen for a replicated class".into()),
            n => {
                self.out.insert(c, n.clone());
                for &ch in n.children() {
                    self.walk(ch)?;
                }
                Ok(())
            }
        }
    }

    /// Class `c` (replicated) is computed as the parts of class `p`.
    fn of_part(&mut self, c: Id, p: Id) -> Result<(), String> {
        let c = self.eg.find(c);
        if self.out.contains_key(&c) {
            return Ok(());
        }
        let m = self.canon(self.chosen(p)?);
        if let Kiln::Shard([_, _, x]) = m {
            if self.eg.find(x) != c {
                return Err("gather of a shard of another class".into());
            }
            return self.walk(x);
        }
        let g = self
            .twins
            .get(&m)
            .cloned()
            .ok_or_else(|| format!("no replicated twin for the part e-node {m:?}"))?;
        let g = self.canon(&g);
        self.out.insert(c, g.clone());
        for (pos, (&mc, &gc)) in m.children().iter().zip(g.children()).enumerate() {
            if self.eg[mc].data.dist == Dist::Rep {
                self.walk(gc)?;
                continue;
            }
            match self.chosen(mc)?.clone() {
                Kiln::Shard([a, _, x]) => {
                    // the weight of a MatMul (position 1) or Conv (position 2): the axis
                    // its parts are cut along says Column or Row
                    let axis = self.eg[a].data.int;
                    let kind = match (&g, pos, axis) {
                        (Kiln::MatMul(_), 1, Some(1)) | (Kiln::Conv(_), 2, Some(0)) => {
                            Some(SplitKind::Column)
                        }
                        (Kiln::MatMul(_), 1, Some(0)) | (Kiln::Conv(_), 2, Some(1)) => {
                            Some(SplitKind::Row)
                        }
                        _ => None,
                    };
                    if let Some(kind) = kind.filter(|_| is_weight(self.eg, x)) {
                        self.splits.push((c, kind));
                    }
                    self.walk(x)?;
                }
                _ => self.of_part(gc, mc)?,
            }
        }
        Ok(())
    }
}
