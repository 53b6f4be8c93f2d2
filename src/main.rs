//! The `kiln` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kiln::ir::{interp, Tensor};
use std::path::{Path, PathBuf};

/// Kiln: a deep learning compiler for ONNX models.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a model's opset, inputs/outputs, op histogram and parameter count.
    Inspect {
        /// The ONNX model.
        model: PathBuf,
        /// Also write the graph in Graphviz format to this file.
        #[arg(long)]
        dot: Option<PathBuf>,
        /// Also print the IR in Kiln's text form.
        #[arg(long)]
        ir: bool,
    },
    /// Run the graph-level compile pipeline (simplify, specialize, fold, fusion, memory plan)
    /// and print the kernels and the arena size. Code generation comes after these stages.
    Plan {
        /// The ONNX model.
        model: PathBuf,
        /// Fix an input's shape: NAME=1x3x224x224 (symbolic dims default to 1).
        #[arg(long = "shape", value_name = "NAME=DIMS")]
        shapes: Vec<String>,
        /// Print the IR after this stage (import, simplify, specialize, fold, fusion, memory,
        /// or all); may be repeated.
        #[arg(long = "print-after", value_name = "STAGE")]
        print_after: Vec<String>,
    },
    /// Run a model with the reference interpreter.
    Eval {
        /// The ONNX model.
        model: PathBuf,
        /// An input as NAME=FILE (.npy or .pb); inputs not given are random.
        #[arg(long = "input", value_name = "NAME=FILE")]
        inputs: Vec<String>,
        /// A test data folder (input_K.pb / output_K.pb): take inputs from it and check the
        /// outputs against its expected outputs.
        #[arg(long, value_name = "DIR")]
        check: Option<PathBuf>,
        /// Write the outputs here (.npz, or .npy for one output).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Seed for random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect { model, dot, ir } => {
            let g = kiln::load_model(&model)?;
            print!("{}", kiln::inspect::summary(&g));
            if ir {
                print!("{}", kiln::ir::printer::to_text(&g));
            }
            if let Some(dot) = dot {
                kiln::io::write_atomic(&dot, kiln::inspect::to_dot(&g).as_bytes())?;
                println!("wrote {}", dot.display());
            }
            Ok(())
        }
        Cmd::Plan {
            model,
            shapes,
            print_after,
        } => {
            let mut opts = kiln::pipeline::Options {
                print_after,
                ..Default::default()
            };
            for s in &shapes {
                let (name, dims) = kiln::pipeline::parse_shape(s)?;
                opts.shapes.insert(name, dims);
            }
            let t0 = std::time::Instant::now();
            let p = kiln::pipeline::plan(&model, &opts, |stage, text| {
                println!("// ----- IR after {stage} -----\n{text}");
            })?;
            println!("{}", p.partition.summary(&p.graph));
            println!("{}", p.memory.summary());
            println!("planned in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
            Ok(())
        }
        Cmd::Eval {
            model,
            inputs,
            check,
            output,
            seed,
        } => eval(&model, &inputs, check.as_deref(), output.as_deref(), seed),
    }
}

fn load_pbs(dir: &Path, prefix: &str) -> Result<Vec<Tensor>> {
    let mut v = Vec::new();
    for k in 0.. {
        let p = dir.join(format!("{prefix}_{k}.pb"));
        if !p.exists() {
            break;
        }
        v.push(kiln::io::read_tensor(&p)?);
    }
    Ok(v)
}

fn eval(
    model: &Path,
    given: &[String],
    check: Option<&Path>,
    output: Option<&Path>,
    seed: u64,
) -> Result<()> {
    let g = kiln::load_model(model)?;
    let mut inputs = kiln::random_inputs(&g, seed)?;
    let mut expected = None;
    if let Some(dir) = check {
        let ins = load_pbs(dir, "input")?;
        if ins.len() != g.inputs.len() {
            bail!(
                "{}: {} input files but the model has {} inputs",
                dir.display(),
                ins.len(),
                g.inputs.len()
            );
        }
        inputs = ins;
        expected = Some(load_pbs(dir, "output")?);
    }
    for spec in given {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--input '{spec}': expected NAME=FILE"))?;
        let pos = g
            .inputs
            .iter()
            .position(|&i| g.values[i].name == name)
            .with_context(|| format!("--input '{spec}': the model has no input named '{name}'"))?;
        inputs[pos] = kiln::io::read_tensor(Path::new(file))?;
    }
    let t0 = std::time::Instant::now();
    let outs = interp::run(&g, &inputs)?;
    let dt = t0.elapsed();
    let named: Vec<(String, Tensor)> = g
        .outputs
        .iter()
        .map(|&o| g.values[o].name.clone())
        .zip(outs)
        .collect();
    for (name, t) in &named {
        let v = t.to_f64_vec();
        let (mn, mx) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        println!(
            "{name}: {}{:?}  min {mn:.6} max {mx:.6}",
            t.dtype(),
            t.shape()
        );
    }
    println!("reference interpreter: {:.1} ms", dt.as_secs_f64() * 1e3);
    if let Some(exp) = expected {
        let mut worst = 0.0f64;
        for ((name, t), e) in named.iter().zip(&exp) {
            let scale = e.to_f64_vec().iter().fold(1.0f64, |m, x| m.max(x.abs()));
            let err = t
                .to_f64_vec()
                .iter()
                .zip(e.to_f64_vec())
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            let rel = err / scale;
            worst = worst.max(rel);
            println!(
                "check {name}: max abs error {err:.3e} (relative to scale {scale:.3}: {rel:.3e})"
            );
            if t.shape() != e.shape() {
                bail!(
                    "output '{name}': shape {:?} but reference has {:?}",
                    t.shape(),
                    e.shape()
                );
            }
        }
        if worst > 1e-4 {
            bail!("outputs differ from the reference (relative error {worst:.3e} > 1e-4)");
        }
        println!("OK: matches the reference");
    }
    if let Some(out) = output {
        kiln::io::write_tensors(out, &named)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
