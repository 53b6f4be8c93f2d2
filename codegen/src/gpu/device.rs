//! The GPU device database: one [`Sku`] per supported NVIDIA product, loaded from the
//! version-controlled `codegen/data/gpus.toml` (embedded at build time), and the parser for
//! `cuda:...` target strings.
//!
//! ```
//! let sku = kiln_codegen::gpu::device::parse_target("cuda:h100").unwrap();
//! assert_eq!(sku.arch, "sm_90");
//! assert!(sku.has("wgmma"));
//! ```

use super::GpuError;
use serde::Deserialize;
use std::collections::HashSet;
use std::sync::OnceLock;

/// The text of the built-in database (`codegen/data/gpus.toml`).
pub const BUILTIN_TOML: &str = include_str!("../../data/gpus.toml");

/// Dense peak throughput per data type, in TFLOP/s (TOP/s for `int8`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeakTflops {
    /// FP32 on the CUDA cores (FMA counted as two operations).
    pub f32: f64,
    /// TF32 tensor cores.
    pub tf32: f64,
    /// FP16 tensor cores with f32 accumulation.
    pub f16: f64,
    /// BF16 tensor cores with f32 accumulation.
    pub bf16: f64,
    /// INT8 tensor cores (TOP/s).
    pub int8: f64,
}

/// One GPU product (stock-keeping unit) and the figures the code generator and the
/// autotuner's cost model need.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sku {
    /// Canonical short name (`h100-sxm`), also accepted as `cuda:<name>`.
    pub name: String,
    /// The vendor's product name.
    pub display_name: String,
    /// Other names accepted in targets (`h100`, `3090`, ...).
    pub aliases: Vec<String>,
    /// Compute capability as a PTX target (`sm_90`).
    pub arch: String,
    /// Whether a bare `cuda:<arch>` target resolves to this SKU.
    pub default_for_arch: bool,
    /// Number of streaming multiprocessors.
    pub sm_count: u32,
    /// Boost clock in MHz.
    pub boost_clock_mhz: u32,
    /// Shared memory per SM in bytes.
    pub shared_mem_per_sm: u32,
    /// Static shared memory a block may use without opting in (bytes).
    pub shared_mem_per_block: u32,
    /// Shared memory a block may use after opting in with
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` (bytes).
    pub shared_mem_per_block_optin: u32,
    /// 32-bit registers per SM.
    pub registers_per_sm: u32,
    /// 32-bit registers one block may use.
    pub registers_per_block: u32,
    /// Registers one thread may use.
    pub max_registers_per_thread: u32,
    /// Threads per block.
    pub max_threads_per_block: u32,
    /// Resident threads per SM.
    pub max_threads_per_sm: u32,
    /// Threads per warp.
    pub warp_size: u32,
    /// L2 cache size in bytes.
    pub l2_bytes: u64,
    /// DRAM bandwidth in GB/s.
    pub mem_bandwidth_gbs: f64,
    /// Device memory in GB (10^9 bytes).
    pub memory_gb: f64,
    /// PTX tensor-core and async-copy features available (`mma.sync.f16`, `wgmma`, `tma`, ...).
    pub tensor_instructions: Vec<String>,
    /// Dense peak throughput per data type.
    pub peak_tflops: PeakTflops,
}

impl Sku {
    /// The compute capability as a number (`sm_90` → 90).
    pub fn sm_version(&self) -> u32 {
        parse_arch(&self.arch).unwrap_or(0)
    }

    /// Whether the SKU has the tensor/async feature `instr` (as listed in the database).
    pub fn has(&self, instr: &str) -> bool {
        self.tensor_instructions.iter().any(|i| i == instr)
    }

    /// Whether `name` (case-insensitive) is this SKU's name or one of its aliases.
    pub fn is_named(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }

    /// Machine balance: peak f32 FLOP per byte of DRAM traffic (roofline ridge point).
    pub fn f32_ridge_flop_per_byte(&self) -> f64 {
        self.peak_tflops.f32 * 1e12 / (self.mem_bandwidth_gbs * 1e9)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DbFile {
    sku: Vec<Sku>,
}

/// `sm_90` → 90.
fn parse_arch(arch: &str) -> Option<u32> {
    let digits = arch.strip_prefix("sm_")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A set of SKUs, checked for consistency (unique names, one default per architecture).
#[derive(Debug, Clone)]
pub struct DeviceDb {
    skus: Vec<Sku>,
}

impl DeviceDb {
    /// Parses and validates a database in the `gpus.toml` format.
    pub fn from_toml(text: &str) -> Result<Self, GpuError> {
        let file: DbFile = toml::from_str(text).map_err(|e| GpuError::Database(e.to_string()))?;
        let bad = |sku: &Sku, what: &str| GpuError::Database(format!("sku '{}': {what}", sku.name));
        let mut names = HashSet::new();
        for sku in &file.sku {
            if parse_arch(&sku.arch).is_none() {
                return Err(bad(
                    sku,
                    &format!("arch '{}' is not of the form sm_NN", sku.arch),
                ));
            }
            for n in std::iter::once(&sku.name).chain(&sku.aliases) {
                if !names.insert(n.to_ascii_lowercase()) || parse_arch(n).is_some() {
                    return Err(bad(
                        sku,
                        &format!("name or alias '{n}' is duplicated or an arch"),
                    ));
                }
            }
            let counts = [
                sku.sm_count,
                sku.boost_clock_mhz,
                sku.shared_mem_per_sm,
                sku.shared_mem_per_block,
                sku.registers_per_sm,
                sku.max_registers_per_thread,
                sku.max_threads_per_block,
                sku.warp_size,
            ];
            if counts.contains(&0)
                || sku.mem_bandwidth_gbs <= 0.0
                || sku.memory_gb <= 0.0
                || sku.peak_tflops.f32 <= 0.0
            {
                return Err(bad(
                    sku,
                    "sizes, clocks, bandwidth and peaks must be positive",
                ));
            }
            if sku.shared_mem_per_block > sku.shared_mem_per_block_optin
                || sku.shared_mem_per_block_optin > sku.shared_mem_per_sm
            {
                return Err(bad(
                    sku,
                    "need shared_mem_per_block <= _optin <= shared_mem_per_sm",
                ));
            }
        }
        let archs: HashSet<&str> = file.sku.iter().map(|s| s.arch.as_str()).collect();
        for arch in archs {
            let defaults = file
                .sku
                .iter()
                .filter(|s| s.arch == arch && s.default_for_arch)
                .count();
            if defaults != 1 {
                return Err(GpuError::Database(format!(
                    "arch {arch} needs exactly one SKU with default_for_arch = true, found {defaults}"
                )));
            }
        }
        Ok(Self { skus: file.sku })
    }

    /// The database compiled into this crate (`codegen/data/gpus.toml`).
    pub fn builtin() -> Result<&'static DeviceDb, GpuError> {
        static DB: OnceLock<Result<DeviceDb, String>> = OnceLock::new();
        DB.get_or_init(|| DeviceDb::from_toml(BUILTIN_TOML).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| GpuError::Database(e.clone()))
    }

    /// All SKUs, in file order.
    pub fn skus(&self) -> &[Sku] {
        &self.skus
    }

    /// The SKU called `name` (or with that alias), case-insensitive.
    pub fn get(&self, name: &str) -> Option<&Sku> {
        self.skus.iter().find(|s| s.is_named(name))
    }

    /// Resolves a target string: `cuda:<sku name or alias>` (`cuda:h100`, `cuda:rtx4090`) or
    /// `cuda:sm_XX` (the architecture's default SKU). Unknown targets are an error listing
    /// the known ones.
    pub fn parse_target(&self, target: &str) -> Result<&Sku, GpuError> {
        let unknown = || GpuError::UnknownTarget {
            target: target.to_string(),
            known: self.known_targets().join(", "),
        };
        let rest = target.trim().strip_prefix("cuda:").ok_or_else(unknown)?;
        if parse_arch(rest).is_some() {
            return self
                .skus
                .iter()
                .find(|s| s.arch.eq_ignore_ascii_case(rest) && s.default_for_arch)
                .ok_or_else(unknown);
        }
        self.get(rest).ok_or_else(unknown)
    }

    /// Every accepted target string (`cuda:sm_80`, ..., `cuda:a100`, ...).
    pub fn known_targets(&self) -> Vec<String> {
        let mut archs: Vec<&str> = self.skus.iter().map(|s| s.arch.as_str()).collect();
        archs.sort();
        archs.dedup();
        let mut out: Vec<String> = archs.iter().map(|a| format!("cuda:{a}")).collect();
        for s in &self.skus {
            out.push(format!("cuda:{}", s.name));
            out.extend(s.aliases.iter().map(|a| format!("cuda:{a}")));
        }
        out
    }
}

/// Resolves a `cuda:...` target against the built-in database (see
/// [`DeviceDb::parse_target`]).
pub fn parse_target(target: &str) -> Result<&'static Sku, GpuError> {
    DeviceDb::builtin()?.parse_target(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_database_has_every_required_sku() {
        let db = DeviceDb::builtin().unwrap();
        let expect = [
            ("a100", "sm_80"),
            ("a10", "sm_86"),
            ("rtx3090", "sm_86"),
            ("l4", "sm_89"),
            ("rtx4090", "sm_89"),
            ("h100-sxm", "sm_90"),
            ("h100-pcie", "sm_90"),
            ("h200", "sm_90"),
        ];
        assert_eq!(db.skus().len(), expect.len());
        for (name, arch) in expect {
            let s = db.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(s.arch, arch, "{name}");
            assert!(s.has("mma.sync.f16") && s.has("mma.sync.bf16") && s.has("mma.sync.tf32"));
            assert!(s.has("mma.sync.int8"), "{name}");
            assert_eq!(
                s.has("wgmma"),
                arch == "sm_90",
                "{name}: wgmma only on sm_90"
            );
            assert_eq!(s.has("tma"), arch == "sm_90", "{name}: TMA only on sm_90");
            // Tensor cores beat the CUDA cores; int8 beats f16.
            let p = s.peak_tflops;
            assert!(p.f16 > p.f32 && p.bf16 == p.f16 && p.int8 >= p.f16 && p.tf32 >= p.f32);
            assert!(s.f32_ridge_flop_per_byte() > 1.0);
        }
        let h100 = db.get("h100-sxm").unwrap();
        assert_eq!((h100.sm_count, h100.sm_version()), (132, 90));
        assert_eq!(h100.shared_mem_per_block_optin, 227 * 1024);
        assert_eq!(db.get("a100").unwrap().sm_count, 108);
        let mem = |n: &str| db.get(n).unwrap().memory_gb;
        assert_eq!(
            (mem("h100"), mem("a100"), mem("h200"), mem("l4")),
            (80.0, 80.0, 141.0, 24.0)
        );
    }

    #[test]
    fn targets_resolve_to_skus() {
        let t = |s: &str| parse_target(s).map(|k| k.name.clone());
        assert_eq!(t("cuda:sm_90").unwrap(), "h100-sxm");
        assert_eq!(t("cuda:sm_80").unwrap(), "a100");
        assert_eq!(t("cuda:sm_86").unwrap(), "a10");
        assert_eq!(t("cuda:sm_89").unwrap(), "l4");
        assert_eq!(t("cuda:h100").unwrap(), "h100-sxm");
        assert_eq!(t("cuda:H100-PCIe").unwrap(), "h100-pcie");
        assert_eq!(t("cuda:a100").unwrap(), "a100");
        assert_eq!(t("cuda:4090").unwrap(), "rtx4090");
        assert_eq!(t("cuda:h200").unwrap(), "h200");
        for bad in [
            "cuda:sm_75",
            "cuda:v100",
            "cpu",
            "h100",
            "cuda:",
            "cuda:sm_",
        ] {
            let e = parse_target(bad).unwrap_err().to_string();
            assert!(
                e.contains(bad) && e.contains("cuda:sm_90") && e.contains("cuda:a100"),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_databases_are_refused() {
        let one = |extra: &str| {
            BUILTIN_TOML
                .split("\n[[sku]]\n")
                .nth(1)
                .map(|s| format!("[[sku]]\n{s}{extra}"))
                .unwrap()
        };
        assert!(DeviceDb::from_toml(&one("")).is_ok());
        // Duplicate SKU (two defaults for sm_80, duplicated names).
        assert!(DeviceDb::from_toml(&format!("{}\n{}", one(""), one(""))).is_err());
        assert!(DeviceDb::from_toml(&one("").replace("\"sm_80\"", "\"ampere\"")).is_err());
        assert!(DeviceDb::from_toml(&one("").replace("sm_count = 108", "sm_count = 0")).is_err());
        assert!(DeviceDb::from_toml(&one("").replace("sm_count = 108", "sm_cnt = 108")).is_err());
        assert!(DeviceDb::from_toml("not toml [").is_err());
    }
}
