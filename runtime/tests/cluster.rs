//! Cluster programs without compute segments, run as threads: the byte-level collectives
//! (all-gather along an inner axis with unequal shards, all-reduce) and sliced sends, and
//! the plan checks.

use kiln_runtime::cluster::{
    run_threads, AxisSlice, ClusterPlan, ClusterStep, RankPlan, ThreadTransport, Transport,
};
use kiln_runtime::{Artifact, DType, DimSpec, ExecPlan, IoSpec, TensorView};
use std::time::Duration;

fn io(name: &str, shape: &[u64]) -> IoSpec {
    IoSpec {
        name: name.into(),
        dtype: DType::F32,
        shape: shape.iter().map(|&d| DimSpec::Fixed(d)).collect(),
    }
}

fn artifact(ranks: Vec<RankPlan>) -> Artifact {
    Artifact {
        compiler_version: "test".into(),
        target: "cpu:x86-64-v3".into(),
        plan: ExecPlan {
            inputs: vec![io("x", &[2, 5])],
            outputs: vec![io("y", &[2, 5]), io("s", &[2, 3])],
            cluster: Some(ClusterPlan {
                world: ranks.len(),
                ranks,
                micro_batches: 1,
            }),
            ..ExecPlan::default()
        },
        weights: Vec::new(),
        kernels: Vec::new(),
    }
}

fn send(key: &str, to: usize, start: usize, len: usize) -> ClusterStep {
    ClusterStep::Send {
        key: key.into(),
        to,
        slice: Some(AxisSlice {
            axis: 1,
            start,
            len,
        }),
    }
}

fn recv(key: &str, from: usize, shape: &[usize]) -> ClusterStep {
    ClusterStep::Recv {
        key: key.into(),
        from,
        dtype: DType::F32,
        shape: shape.to_vec(),
    }
}

/// Rank 0 sends columns 0..2 / 2..5 of x ([2, 5]) to ranks 1 and 2, which all-gather them
/// back along axis 1 (unequal shards 2 + 3; rank 1 returns the result), and columns 0..3 /
/// 2..5, which they all-reduce (rank 2 returns the sum).
fn scatter_gather_plan() -> Vec<RankPlan> {
    let gather = ClusterStep::AllGather {
        key: "p".into(),
        out: "g".into(),
        axis: 1,
        sizes: vec![2, 3],
        group: vec![1, 2],
    };
    let reduce = ClusterStep::AllReduce {
        key: "q".into(),
        out: "r".into(),
        group: vec![1, 2],
    };
    vec![
        RankPlan {
            inputs: vec!["in:x".into()],
            steps: vec![
                send("in:x", 1, 0, 2),
                send("in:x", 2, 2, 3),
                send("in:x", 1, 0, 3),
                send("in:x", 2, 2, 3),
                recv("out:y", 1, &[2, 5]),
                recv("out:s", 2, &[2, 3]),
            ],
            outputs: vec!["out:y".into(), "out:s".into()],
        },
        RankPlan {
            steps: vec![
                recv("p", 0, &[2, 2]),
                recv("q", 0, &[2, 3]),
                gather.clone(),
                reduce.clone(),
                ClusterStep::Send {
                    key: "g".into(),
                    to: 0,
                    slice: None,
                },
            ],
            ..Default::default()
        },
        RankPlan {
            steps: vec![
                recv("p", 0, &[2, 3]),
                recv("q", 0, &[2, 3]),
                gather,
                reduce,
                ClusterStep::Send {
                    key: "r".into(),
                    to: 0,
                    slice: None,
                },
            ],
            ..Default::default()
        },
    ]
}

#[test]
fn scatter_all_gather_on_an_inner_axis_and_all_reduce_round_trip() {
    let art = artifact(scatter_gather_plan());
    let x: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let view = TensorView::from_f32(&[2, 5], &x);
    let outs = run_threads(&art, "<test>", &[view]).unwrap();
    // the gather reassembles x exactly
    assert_eq!(outs[0].shape, vec![2, 5]);
    assert_eq!(outs[0].as_f32().unwrap(), &x[..]);
    // columns 0..3 (rank 1) + columns 2..5 (rank 2)
    let want: Vec<f32> = [0, 1, 2, 5, 6, 7]
        .iter()
        .zip([2, 3, 4, 7, 8, 9])
        .map(|(&a, b)| (a + b) as f32)
        .collect();
    assert_eq!(outs[1].as_f32().unwrap(), &want[..]);
}

#[test]
fn plans_with_bad_peers_or_groups_are_refused() {
    let mut ranks = scatter_gather_plan();
    ranks[1].steps.push(recv("z", 1, &[1]));
    let e = artifact(ranks).plan.validate(0).unwrap_err();
    assert!(e.contains("rank 1") && e.contains("peer rank 1"), "{e}");
    let mut ranks = scatter_gather_plan();
    ranks[0].steps.push(ClusterStep::AllReduce {
        key: "x".into(),
        out: "y".into(),
        group: vec![1, 2],
    });
    let e = artifact(ranks).plan.validate(0).unwrap_err();
    assert!(e.contains("group"), "{e}");
    let mut ranks = scatter_gather_plan();
    ranks[2]
        .steps
        .push(ClusterStep::Compute { offset: 0, len: 64 });
    let e = artifact(ranks).plan.validate(0).unwrap_err();
    assert!(e.contains("outside"), "{e}");
}

#[test]
fn a_rank_that_fails_does_not_leave_the_others_waiting() {
    // rank 1 expects a tensor nobody sends: its peers see it exit instead of hanging
    let mut ranks = scatter_gather_plan();
    ranks[1].steps.insert(
        0,
        ClusterStep::AllReduce {
            key: "missing".into(),
            out: "m".into(),
            group: vec![1, 2],
        },
    );
    let art = artifact(ranks);
    let x = vec![0f32; 10];
    let t = std::time::Instant::now();
    let e = run_threads(&art, "<test>", &[TensorView::from_f32(&[2, 5], &x)]).unwrap_err();
    assert!(e.contains("rank 1") && e.contains("missing"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn thread_transport_moves_bytes_and_times_out() {
    let mut w = ThreadTransport::world(2, Duration::from_millis(50));
    let mut b = w.pop().unwrap();
    let mut a = w.pop().unwrap();
    a.send(1, &[1, 2, 3]).unwrap();
    let mut buf = [0u8; 3];
    b.recv(0, &mut buf).unwrap();
    assert_eq!(buf, [1, 2, 3]);
    let e = b.recv(0, &mut buf).unwrap_err();
    assert!(e.contains("rank 0"), "{e}");
}
