//! `cargo bench --bench eqsat`: equality saturation on tensat's evaluation graphs (and a
//! GPT-2-style decoder), built in `passes/examples/eqsat_bench.rs` with their weights made
//! constants.
//!
//! For each graph it prints the `-O2` search's e-graph size, saturation and extraction
//! seconds and estimated cost reduction (CPU cost model), beside tensat's published search
//! time and GPU speed-up; then criterion times the search itself (`eqsat_search/MODEL`)
//! and one run of the `-O0` (no eqsat) and `-O2` artifacts on one thread
//! (`eqsat_run/MODEL/O0`, `…/O2`), whose ratio is the measured CPU speed-up of the extracted
//! graph over the input graph. `KILN_EQSAT_MODELS=squeezenet,nasrnn` picks graphs (`all`:
//! every one; the default is the three that compile in seconds: squeezenet, nasrnn,
//! nasnet). The interleaved `-O0` / `-O2` table on 1 or N threads is
//! `examples/eqsat_speedup.rs`; the results are in `docs/eqsat.md`.

#[path = "../examples/support/tensat.rs"]
mod tensat;

use criterion::{criterion_group, criterion_main, Criterion};
use kiln::{Compiler, Session, TensorView};
use rand::SeedableRng;

/// tensat's search seconds (MLSys'21, Table 3 of its evaluation), by model.
fn tensat_search_s(name: &str) -> &'static str {
    match name {
        "bert" => "1.4",
        "resnext50" => "0.7",
        "nasnet" => "10.6",
        "nasrnn" => "0.5",
        "inception" => "5.1",
        "squeezenet" => "0.3",
        "vgg19" => "0.4",
        _ => "-",
    }
}

fn bench_eqsat(c: &mut Criterion) {
    let wanted =
        std::env::var("KILN_EQSAT_MODELS").unwrap_or_else(|_| "squeezenet,nasrnn,nasnet".into());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    println!(
        "| model | e-nodes | e-classes | saturate s | extract s | estimated reduction | kept | tensat search s / speed-up |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, tensat_gain, build) in tensat::models() {
        if wanted != "all" && !wanted.split(',').any(|w| w == name) {
            continue;
        }
        let (mut g, shape, x) = tensat::prepared(build, tensat::weights_to_constants, &mut rng);
        kiln::ir::simplify::simplify(&mut g);
        let opts = kiln::pipeline::eqsat_options(2).expect("-O2 runs eqsat");
        let (_, r) = kiln::passes::eqsat::optimize(&g, &opts).expect("eqsat");
        println!(
            "| {name} | {} | {} | {:.2} | {:.2} | {:.1}% | {} | {} / {tensat_gain} |",
            r.egraph_nodes,
            r.egraph_classes,
            r.saturate_s,
            r.extract_s,
            100.0 * (1.0 - r.cost_after / r.cost_before.max(1e-9)),
            r.chosen,
            tensat_search_s(name),
        );
        let mut search = c.benchmark_group("eqsat_search");
        search.sample_size(10);
        search.bench_function(name, |b| {
            b.iter(|| kiln::passes::eqsat::optimize(&g, &opts).expect("eqsat"))
        });
        search.finish();
        let mut run = c.benchmark_group(format!("eqsat_run/{name}"));
        run.sample_size(20);
        let input = [TensorView::from_f32(&shape, &x)];
        for level in [0u8, 2] {
            let art = Compiler::new()
                .opt_level(level)
                .compile(&g)
                .unwrap_or_else(|e| panic!("{name} -O{level}: {e}"));
            let session = Session::new(&art).expect("load");
            run.bench_function(format!("O{level}"), |b| {
                b.iter(|| session.run(&input).expect("run"))
            });
        }
        run.finish();
    }
}

criterion_group!(benches, bench_eqsat);
criterion_main!(benches);
