//! The C API: the checked-in header matches cbindgen's output, and a C program compiled with
//! `cc` compiles, saves, loads and runs the zoo MLP, matching the reference output and,
//! bit for bit, the Rust API on the same artifact.

use std::path::{Path, PathBuf};
use std::process::Command;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `include/kiln.h` is what cbindgen generates from `src/lib.rs`; `KILN_UPDATE_HEADER=1`
/// rewrites it.
#[test]
fn header_is_up_to_date() {
    let config = cbindgen::Config::from_file(crate_dir().join("cbindgen.toml")).unwrap();
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir().join("src/lib.rs"))
        .generate()
        .expect("cbindgen")
        .write(&mut out);
    let path = crate_dir().join("include/kiln.h");
    if std::env::var_os("KILN_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &out).unwrap();
    }
    let have = std::fs::read(&path).unwrap_or_default();
    assert!(
        have == out,
        "{} is out of date; regenerate it with KILN_UPDATE_HEADER=1 cargo test --release -p kiln-capi --test c_api",
        path.display()
    );
}

/// The folder holding `libkiln_capi.so`: this test's `target/<profile>/deps/` (where
/// `cargo test` builds it), else `target/<profile>/`.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    if deps.join("libkiln_capi.so").exists() {
        deps.to_path_buf()
    } else {
        deps.parent().unwrap().to_path_buf()
    }
}

fn read_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let (_, t) = kiln::ir::onnx::load_tensor_pb(path).unwrap();
    let v: Vec<f32> = t.to_f64_vec().into_iter().map(|x| x as f32).collect();
    (t.shape().to_vec(), v)
}

#[test]
fn c_program_compiles_loads_and_runs_mlp() {
    let lib = lib_dir();
    assert!(
        lib.join("libkiln_capi.so").exists(),
        "no libkiln_capi.so in {}",
        lib.display()
    );
    let tmp = std::env::temp_dir().join(format!("kiln-capi-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let exe = tmp.join("smoke");
    let st = Command::new("cc")
        .arg(crate_dir().join("tests/c/smoke.c"))
        .arg("-std=c99")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg("-L")
        .arg(&lib)
        .arg("-lkiln_capi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("run cc");
    assert!(st.success(), "cc failed");

    let zoo = crate_dir().join("../tests/zoo/mlp");
    let (shape, x) = read_f32(&zoo.join("test_data_set_0/input_0.pb"));
    let (_, expected) = read_f32(&zoo.join("test_data_set_0/output_0.pb"));
    assert_eq!(shape.len(), 2);
    let xin = tmp.join("x.bin");
    std::fs::write(&xin, kiln::bytes_of(&x)).unwrap();
    let art = tmp.join("mlp.kiln");
    let yout = tmp.join("y.bin");
    let out = Command::new(&exe)
        .arg(zoo.join("model.onnx"))
        .arg(&art)
        .arg(&xin)
        .arg(shape[0].to_string())
        .arg(shape[1].to_string())
        .arg(&yout)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("ok:"), "{text}");
    let y = std::fs::read(&yout).unwrap();
    let yf: Vec<f32> = y
        .chunks_exact(4)
        .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(yf.len(), expected.len());
    for (a, b) in yf.iter().zip(&expected) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // The Rust API on the artifact the C program wrote: the same bits.
    let s = kiln::Session::load(&art).unwrap();
    let r = s.run(&[kiln::TensorView::from_f32(&shape, &x)]).unwrap();
    assert_eq!(r[0].data.as_slice(), &y[..], "C and Rust outputs differ");
    std::fs::remove_dir_all(&tmp).ok();
}
