//! NCCL transport on the GPUs present (one rank per GPU, ranks as threads, bootstrapped
//! over channels): all-reduce, all-gather with unequal shards, point-to-point messages and
//! a group in reverse rank order give what the host transport gives; a rank that never
//! joins an operation makes its peers fail within the timeout. Skips (passing) where there
//! is no GPU or no `libnccl.so.2`.

use kiln_runtime::cluster::{ThreadTransport, Transport};
use kiln_runtime::nccl_transport::{available, NcclTransport};
use kiln_runtime::DType;
use std::time::Duration;

fn ranks() -> Option<usize> {
    if let Err(e) = available() {
        eprintln!("skipped: {e}");
        return None;
    }
    Some(kiln_runtime::cuda::device_count().min(4))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

/// Runs `f(rank, transport)` on every rank, each with an NCCL transport over `groups`.
fn on_ranks<T: Send>(
    n: usize,
    groups: &[Vec<usize>],
    timeout: Duration,
    f: impl Fn(usize, &mut NcclTransport) -> Result<T, String> + Sync,
) -> Vec<Result<T, String>> {
    let boots = ThreadTransport::world(n, Duration::from_secs(30));
    std::thread::scope(|s| {
        let hs: Vec<_> = boots
            .into_iter()
            .map(|mut b| {
                let f = &f;
                s.spawn(move || {
                    let r = b.rank();
                    let mut t = NcclTransport::new(&mut b, groups, r, timeout)?;
                    f(r, &mut t)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    })
}

#[test]
fn collectives_and_messages_match_the_host_transport() {
    let Some(n) = ranks() else { return };
    let all: Vec<usize> = (0..n).collect();
    let rev: Vec<usize> = (0..n).rev().collect();
    let groups = vec![all.clone(), rev.clone()];
    let len = 1000;
    let res = on_ranks(n, &groups, Duration::from_secs(60), |r, t| {
        // all-reduce over the world (group 0) and over the reversed group (1)
        let mine: Vec<f32> = (0..len).map(|i| (r + 1) as f32 + i as f32 * 0.5).collect();
        let mut a = f32_bytes(&mine);
        t.all_reduce_sum(&all, 0, DType::F32, &mut a)?;
        let mut b: Vec<u8> = (0..len as i64)
            .flat_map(|i| (i * (r as i64 + 1)).to_ne_bytes())
            .collect();
        t.all_reduce_sum(&rev, 1, DType::I64, &mut b)?;
        // all-gather with unequal shards: group position p holds p + 1 floats of value 10r
        let pos = rev.iter().position(|&g| g == r).unwrap();
        let counts: Vec<usize> = (0..n).map(|p| (p + 1) * 4).collect();
        let shard = f32_bytes(&vec![10.0 * r as f32; pos + 1]);
        let mut gathered = vec![0u8; counts.iter().sum()];
        t.all_gather(&rev, 1, &shard, &mut gathered, &counts)?;
        // a ring of messages
        let mut got = vec![0u8; 16];
        if n > 1 {
            let to = (r + 1) % n;
            let from = (r + n - 1) % n;
            let msg = f32_bytes(&[r as f32; 4]);
            if r % 2 == 0 {
                t.send(to, &msg)?;
                t.recv(from, &mut got)?;
            } else {
                t.recv(from, &mut got)?;
                t.send(to, &msg)?;
            }
        }
        Ok((f32s(&a), b, f32s(&gathered), f32s(&got)))
    });
    let tri = (n * (n + 1) / 2) as f32;
    for (r, out) in res.into_iter().enumerate() {
        let (a, b, g, m) = out.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        for (i, v) in a.iter().enumerate() {
            assert_eq!(
                *v,
                tri + (n as f32) * i as f32 * 0.5,
                "rank {r} all-reduce [{i}]"
            );
        }
        for (i, c) in b.chunks_exact(8).enumerate() {
            let v = i64::from_ne_bytes(c.try_into().unwrap());
            assert_eq!(v, i as i64 * tri as i64, "rank {r} i64 all-reduce [{i}]");
        }
        // group order is reversed: position p is rank n-1-p with p+1 entries
        let want: Vec<f32> = (0..n)
            .flat_map(|p| vec![10.0 * (n - 1 - p) as f32; p + 1])
            .collect();
        assert_eq!(g, want, "rank {r} all-gather");
        if n > 1 {
            assert_eq!(m, vec![((r + n - 1) % n) as f32; 4], "rank {r} ring");
        }
    }
    eprintln!("NCCL collectives and messages correct on {n} GPU rank(s)");
}

#[test]
fn a_rank_that_never_joins_makes_the_others_fail_not_hang() {
    let Some(n) = ranks() else { return };
    if n < 2 {
        eprintln!("skipped: needs 2 GPUs");
        return;
    }
    let all: Vec<usize> = (0..n).collect();
    let t0 = std::time::Instant::now();
    let res = on_ranks(
        n,
        std::slice::from_ref(&all),
        Duration::from_secs(3),
        |r, t| {
            if r == n - 1 {
                return Ok(()); // never takes part
            }
            let mut a = f32_bytes(&[1.0; 64]);
            t.all_reduce_sum(&all, 0, DType::F32, &mut a)
        },
    );
    let e = res[0].as_ref().unwrap_err();
    assert!(e.contains("did not complete"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(60));
}
