//! Runs all ranks' [`Programs`] in one process, exchanging tensors in memory: the test
//! harness of the lowering (no MPI). Each rank keeps its tensors by key; a round-robin
//! scheduler advances every rank whose next step can run (a receive waits for its message,
//! a collective for every rank of its group) and reports a deadlock instead of hanging.

use super::lower::{slice_tensor, Programs, Step};
use kiln_ir::{map_tensor, Elem, Graph, Tensor};
use std::collections::{HashMap, VecDeque};

/// Runs `progs` on `inputs` (the graph inputs, given to rank 0), computing each segment
/// with `compute(rank, step index, graph, inputs)`; returns rank 0's outputs. Micro-batches
/// run one after the other on slices of axis 0, the outputs concatenated.
pub fn run_in_process(
    progs: &Programs,
    inputs: &[Tensor],
    mut compute: impl FnMut(usize, usize, &Graph, &[Tensor]) -> Result<Vec<Tensor>, String>,
) -> Result<Vec<Tensor>, String> {
    let m = progs.micro_batches.max(1);
    if m == 1 {
        return run_once(progs, inputs, &mut compute);
    }
    let mut parts: Vec<Vec<Tensor>> = Vec::new();
    for k in 0..m {
        let ins = inputs
            .iter()
            .map(|t| {
                let b = t.shape().first().copied().unwrap_or(0);
                if b % m != 0 {
                    return Err(format!("batch {b} does not split into {m} micro-batches"));
                }
                slice_tensor(t, 0, k * b / m, b / m)
            })
            .collect::<Result<Vec<_>, _>>()?;
        parts.push(run_once(progs, &ins, &mut compute)?);
    }
    (0..parts[0].len())
        .map(|o| {
            let outs: Vec<Tensor> = parts.iter().map(|p| p[o].clone()).collect();
            concat(&outs, 0)
        })
        .collect()
}

fn run_once(
    progs: &Programs,
    inputs: &[Tensor],
    compute: &mut impl FnMut(usize, usize, &Graph, &[Tensor]) -> Result<Vec<Tensor>, String>,
) -> Result<Vec<Tensor>, String> {
    let world = progs.world;
    let mut env: Vec<HashMap<String, Tensor>> = vec![HashMap::new(); world];
    let p0 = &progs.ranks[0];
    if p0.inputs.len() != inputs.len() {
        return Err(format!(
            "{} inputs given, the program takes {}",
            inputs.len(),
            p0.inputs.len()
        ));
    }
    for (k, t) in p0.inputs.iter().zip(inputs) {
        env[0].insert(k.clone(), t.clone());
    }
    let mut pc = vec![0usize; world];
    let mut mail: HashMap<(usize, usize), VecDeque<Tensor>> = HashMap::new();
    // collective rendezvous: (group, per-group sequence) -> contributions / results
    let mut seq: Vec<HashMap<Vec<usize>, usize>> = vec![HashMap::new(); world];
    let mut pending: HashMap<(Vec<usize>, usize), Vec<Option<Tensor>>> = HashMap::new();
    let mut results: HashMap<(Vec<usize>, usize), (Tensor, usize)> = HashMap::new();
    let mut deposited = vec![false; world];
    loop {
        let mut progress = false;
        let mut done = true;
        for r in 0..world {
            let steps = &progs.ranks[r].steps;
            let Some(step) = steps.get(pc[r]) else {
                continue;
            };
            done = false;
            let get = |env: &HashMap<String, Tensor>, k: &str| {
                env.get(k)
                    .cloned()
                    .ok_or_else(|| format!("rank {r}: step {}: no tensor '{k}'", pc[r]))
            };
            let advanced = match step {
                Step::Compute(g) => {
                    let ins = g
                        .inputs
                        .iter()
                        .map(|&v| get(&env[r], &g.values[v].name))
                        .collect::<Result<Vec<_>, _>>()?;
                    let outs = compute(r, pc[r], g, &ins)?;
                    for (&o, t) in g.outputs.iter().zip(outs) {
                        env[r].insert(g.values[o].name.clone(), t);
                    }
                    true
                }
                Step::Send { key, to, slice } => {
                    let mut t = get(&env[r], key)?;
                    if let Some(s) = slice {
                        t = slice_tensor(&t, s.axis, s.start, s.len)?;
                    }
                    mail.entry((r, *to)).or_default().push_back(t);
                    true
                }
                Step::Recv {
                    key,
                    from,
                    dtype,
                    shape,
                } => match mail.get_mut(&(*from, r)).and_then(|q| q.pop_front()) {
                    Some(t) => {
                        if t.dtype() != *dtype || t.shape() != &shape[..] {
                            return Err(format!(
                                "rank {r}: recv {key}: got {:?}{:?}, expected {dtype:?}{shape:?}",
                                t.dtype(),
                                t.shape()
                            ));
                        }
                        env[r].insert(key.clone(), t);
                        true
                    }
                    None => false,
                },
                Step::AllReduce { key, out, group }
                | Step::AllGather {
                    key, out, group, ..
                } => {
                    let n = *seq[r].get(group).unwrap_or(&0);
                    let id = (group.clone(), n);
                    let me = group
                        .iter()
                        .position(|&x| x == r)
                        .ok_or_else(|| format!("rank {r}: collective over {group:?} without it"))?;
                    if !deposited[r] {
                        let t = get(&env[r], key)?;
                        pending
                            .entry(id.clone())
                            .or_insert_with(|| vec![None; group.len()])[me] = Some(t);
                        deposited[r] = true;
                        progress = true;
                    }
                    if !results.contains_key(&id) && pending[&id].iter().all(|t| t.is_some()) {
                        let parts: Vec<Tensor> =
                            pending.remove(&id).unwrap().into_iter().flatten().collect();
                        let res = match step {
                            Step::AllGather { axis, sizes, .. } => {
                                for (p, &s) in parts.iter().zip(sizes) {
                                    if p.shape().get(*axis) != Some(&s) {
                                        return Err(format!(
                                            "all-gather {key}: shard {:?} has not {s} entries on axis {axis}",
                                            p.shape()
                                        ));
                                    }
                                }
                                concat(&parts, *axis)?
                            }
                            _ => sum(&parts)?,
                        };
                        results.insert(id.clone(), (res, group.len()));
                    }
                    match results.get_mut(&id) {
                        Some((t, left)) => {
                            env[r].insert(out.clone(), t.clone());
                            *left -= 1;
                            if *left == 0 {
                                results.remove(&id);
                            }
                            seq[r].insert(group.clone(), n + 1);
                            deposited[r] = false;
                            true
                        }
                        None => false,
                    }
                }
            };
            if advanced {
                pc[r] += 1;
                progress = true;
            }
        }
        if done {
            break;
        }
        if !progress {
            let blocked: Vec<String> = (0..world)
                .filter_map(|r| {
                    progs.ranks[r]
                        .steps
                        .get(pc[r])
                        .map(|s| format!("rank {r} at step {}: {}", pc[r], s.describe()))
                })
                .collect();
            return Err(format!("deadlock: {}", blocked.join("; ")));
        }
    }
    p0.outputs
        .iter()
        .map(|k| {
            env[0]
                .get(k)
                .cloned()
                .ok_or_else(|| format!("rank 0: output '{k}' was never produced"))
        })
        .collect()
}

/// Elementwise sum of same-shape tensors.
pub fn sum(parts: &[Tensor]) -> Result<Tensor, String> {
    let first = &parts[0];
    let mut acc = first.to_f64_array();
    for p in &parts[1..] {
        if p.shape() != first.shape() || p.dtype() != first.dtype() {
            return Err(format!(
                "all-reduce of {:?} and {:?}",
                first.shape(),
                p.shape()
            ));
        }
        acc += &p.to_f64_array();
    }
    Ok(Tensor::from_f64_array(first.dtype(), acc))
}

/// Concatenation along `axis`.
pub fn concat(parts: &[Tensor], axis: usize) -> Result<Tensor, String> {
    fn cat<T: Elem>(
        _: &ndarray::ArrayD<T>,
        parts: &[Tensor],
        axis: usize,
    ) -> Result<ndarray::ArrayD<T>, String> {
        let views = parts
            .iter()
            .map(|p| {
                T::view(p)
                    .map(|a| a.view())
                    .ok_or("all-gather of mixed dtypes")
            })
            .collect::<Result<Vec<_>, _>>()?;
        ndarray::concatenate(ndarray::Axis(axis), &views).map_err(|e| e.to_string())
    }
    Ok(map_tensor!(&parts[0], a => cat(a, parts, axis)?))
}
