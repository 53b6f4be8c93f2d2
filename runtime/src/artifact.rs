//! The deployable artifact: one file (conventionally `MODEL.kiln`) holding the execution plan,
//! the weights and the kernel library of a compiled model.
//!
//! # Layout (format version 5)
//!
//! All integers are little-endian.
//!
//! | offset | size   | field                                                              |
//! |--------|--------|--------------------------------------------------------------------|
//! | 0      | 8      | `magic`: `KILNART\0`                                               |
//! | 8      | 4      | `format_version`: u32, [`FORMAT_VERSION`]                          |
//! | 12     | 4      | `checksum`: CRC-32 (IEEE, `crc32fast`) of bytes `16..file_len`     |
//! | 16     | 8      | `file_len`: u64, total size of the file                            |
//! | 24     | 2 + n  | `compiler_version`: u16 length, UTF-8 bytes                        |
//! |        | 2 + m  | `target`: u16 length, UTF-8 bytes (e.g. `cpu:x86-64-v3`)           |
//! |        | 4      | `section_count`: u32                                               |
//! |        | 24 × k | section table: `kind` u32, reserved u32 (0), `offset` u64, `len` u64 |
//! |        |        | zero padding, then the sections at 64-byte-aligned file offsets    |
//!
//! Sections (each exactly once, in any order; unknown kinds are refused):
//! - kind 1, `plan`: the [`ExecPlan`] as UTF-8 JSON (`serde_json`). JSON because the plan is
//!   small next to the weights, stays readable with standard tools, and tolerates added
//!   optional fields.
//! - kind 2, `weights`: the weights blob; each [`WeightSpec`](crate::plan::WeightSpec) offset
//!   is relative to the start of this section and a multiple of 64.
//! - kind 3, `kernels`: the bytes of the kernel shared library (CPU targets), or the PTX
//!   text of one `gpu.module` (`cuda:SKU` targets).
//!
//! The checksum covers everything after itself (the rest of the header, the section table
//! and every section), so any corrupted byte past offset 16 is detected; the magic and the
//! version are checked explicitly before. A reader accepts only its own format version:
//! the format changes together with the compiler, and an artifact is rebuilt, not migrated.

use crate::plan::{ExecPlan, ALIGNMENT};
use std::io::Write;
use std::path::Path;

/// The 8 bytes every artifact starts with.
pub const MAGIC: [u8; 8] = *b"KILNART\0";

/// The artifact format version written and read by this runtime. Version 3: kernels take a
/// third ABI argument, their scratch memory (`Step::scratch_bytes`); version-2 libraries
/// have the two-argument ABI and would allocate per call. Version 4: plans may hold a GPU
/// program ([`crate::plan::GpuPlan`]), whose kernel section is PTX text (target `cuda:SKU`).
/// Version 5: plans may hold per-rank programs ([`crate::cluster::ClusterPlan`]) whose
/// compute segments are nested artifacts in the weights section. Version 6: one dtype type
/// for graphs and plans, so the graphs inside (reference kernels, dynamic tails) name their
/// dtypes in lowercase as the plan does (`f32`, not `F32`).
pub const FORMAT_VERSION: u32 = 6;

/// Section kind of the JSON execution plan.
pub const SECTION_PLAN: u32 = 1;
/// Section kind of the weights blob.
pub const SECTION_WEIGHTS: u32 = 2;
/// Section kind of the kernel library.
pub const SECTION_KERNELS: u32 = 3;

/// Offset of the checksum and of the first checksummed byte.
const CHECKSUM_AT: usize = 12;
const CHECKED_FROM: usize = 16;
const SECTION_ENTRY: usize = 24;

/// Why an artifact could not be read or written. Every message names the file (or
/// `<memory>`) and, where it applies, the field.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not start with [`MAGIC`].
    #[error("{path}: field `magic`: not a Kiln artifact (starts with {found:?}, expected \"KILNART\\0\")")]
    BadMagic {
        /// The file.
        path: String,
        /// The first bytes, escaped.
        found: String,
    },
    /// The file has another format version.
    #[error(
        "{path}: field `format_version`: artifact format {found} is {}; this runtime reads \
         format {supported} only ({})",
        if *found > *supported { "newer" } else { "older" },
        if *found > *supported { "upgrade the Kiln runtime" } else { "recompile the model" }
    )]
    Version {
        /// The file.
        path: String,
        /// The version in the file.
        found: u32,
        /// [`FORMAT_VERSION`].
        supported: u32,
    },
    /// The file ends before a field or section does.
    #[error("{path}: truncated: field `{field}` needs bytes {offset}..{end}, but the file has {len} bytes")]
    Truncated {
        /// The file.
        path: String,
        /// The field or section cut off.
        field: String,
        /// Where it starts.
        offset: u64,
        /// Where it should end.
        end: u64,
        /// The actual file length.
        len: u64,
    },
    /// The checksum does not match: the file is corrupt.
    #[error("{path}: field `checksum`: stored crc32 {stored:#010x} but the contents hash to {computed:#010x}: the file is corrupt")]
    Checksum {
        /// The file.
        path: String,
        /// The stored checksum.
        stored: u32,
        /// The checksum of the contents.
        computed: u32,
    },
    /// A field has an invalid value.
    #[error("{path}: field `{field}`: {msg}")]
    Malformed {
        /// The file.
        path: String,
        /// The field or section.
        field: String,
        /// What is wrong.
        msg: String,
    },
}

/// A compiled model as stored on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    /// The version of the compiler that produced it (e.g. `kiln 0.1.0`).
    pub compiler_version: String,
    /// The target it was compiled for (e.g. `cpu:x86-64-v3`).
    pub target: String,
    /// The execution plan.
    pub plan: ExecPlan,
    /// The weights blob ([`crate::plan::WeightSpec`] offsets index into it).
    pub weights: Vec<u8>,
    /// The kernel shared library.
    pub kernels: Vec<u8>,
}

/// A little-endian reader over the whole file that reports truncation by field.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], ArtifactError> {
        let s = slice(self.bytes, self.pos as u64, n as u64, field, self.path)?;
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self, field: &str) -> Result<u16, ArtifactError> {
        Ok(u16::from_le_bytes(self.take(2, field)?.try_into().unwrap()))
    }
    fn u32(&mut self, field: &str) -> Result<u32, ArtifactError> {
        Ok(u32::from_le_bytes(self.take(4, field)?.try_into().unwrap()))
    }
    fn u64(&mut self, field: &str) -> Result<u64, ArtifactError> {
        Ok(u64::from_le_bytes(self.take(8, field)?.try_into().unwrap()))
    }
    fn string(&mut self, field: &str) -> Result<String, ArtifactError> {
        let n = self.u16(field)? as usize;
        let b = self.take(n, field)?;
        String::from_utf8(b.to_vec()).map_err(|e| ArtifactError::Malformed {
            path: self.path.to_string(),
            field: field.to_string(),
            msg: format!("not UTF-8: {e}"),
        })
    }
}

/// `bytes[offset..offset + len]`, or a truncation error naming `field`.
fn slice<'a>(
    bytes: &'a [u8],
    offset: u64,
    len: u64,
    field: &str,
    path: &str,
) -> Result<&'a [u8], ArtifactError> {
    let end = offset.saturating_add(len);
    if end > bytes.len() as u64 {
        return Err(ArtifactError::Truncated {
            path: path.to_string(),
            field: field.to_string(),
            offset,
            end,
            len: bytes.len() as u64,
        });
    }
    Ok(&bytes[offset as usize..end as usize])
}

fn section_name(kind: u32) -> &'static str {
    match kind {
        SECTION_PLAN => "plan",
        SECTION_WEIGHTS => "weights",
        SECTION_KERNELS => "kernels",
        _ => "unknown",
    }
}

impl Artifact {
    /// Serializes the artifact (see the module documentation for the layout). Fails if the
    /// plan is inconsistent with the weights blob or a string is too long.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ArtifactError> {
        self.to_bytes_named("<memory>")
    }

    fn to_bytes_named(&self, path: &str) -> Result<Vec<u8>, ArtifactError> {
        let malformed = |field: &str, msg: String| ArtifactError::Malformed {
            path: path.to_string(),
            field: field.to_string(),
            msg,
        };
        self.plan
            .validate(self.weights.len() as u64)
            .map_err(|m| malformed("plan", m))?;
        let plan = serde_json::to_vec(&self.plan).map_err(|e| malformed("plan", e.to_string()))?;
        let sections: [(u32, &[u8]); 3] = [
            (SECTION_PLAN, &plan),
            (SECTION_WEIGHTS, &self.weights),
            (SECTION_KERNELS, &self.kernels),
        ];

        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // checksum, filled in last
        out.extend_from_slice(&[0; 8]); // file_len, filled in last
        for (field, s) in [
            ("compiler_version", &self.compiler_version),
            ("target", &self.target),
        ] {
            let n = u16::try_from(s.len())
                .map_err(|_| malformed(field, format!("{} bytes long (max 65535)", s.len())))?;
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
        let table_at = out.len();
        out.resize(table_at + SECTION_ENTRY * sections.len(), 0);
        for (i, (kind, data)) in sections.iter().enumerate() {
            let offset = out.len().next_multiple_of(ALIGNMENT);
            out.resize(offset, 0);
            out.extend_from_slice(data);
            let e = table_at + SECTION_ENTRY * i;
            out[e..e + 4].copy_from_slice(&kind.to_le_bytes());
            out[e + 8..e + 16].copy_from_slice(&(offset as u64).to_le_bytes());
            out[e + 16..e + 24].copy_from_slice(&(data.len() as u64).to_le_bytes());
        }
        let len = out.len() as u64;
        out[16..24].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&out[CHECKED_FROM..]);
        out[CHECKSUM_AT..CHECKED_FROM].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Parses an artifact from bytes; `origin` names it in errors. Never panics: any
    /// malformed input is an error.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self, ArtifactError> {
        let path = origin;
        let malformed = |field: &str, msg: String| ArtifactError::Malformed {
            path: path.to_string(),
            field: field.to_string(),
            msg,
        };
        let mut r = Reader {
            bytes,
            pos: 0,
            path,
        };
        let magic = r.take(8, "magic")?;
        if magic != MAGIC {
            return Err(ArtifactError::BadMagic {
                path: path.to_string(),
                found: magic.escape_ascii().to_string(),
            });
        }
        let version = r.u32("format_version")?;
        if version != FORMAT_VERSION {
            return Err(ArtifactError::Version {
                path: path.to_string(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let stored = r.u32("checksum")?;
        let file_len = r.u64("file_len")?;
        if (bytes.len() as u64) < file_len {
            return Err(ArtifactError::Truncated {
                path: path.to_string(),
                field: "file_len".into(),
                offset: 0,
                end: file_len,
                len: bytes.len() as u64,
            });
        }
        if bytes.len() as u64 > file_len {
            return Err(malformed(
                "file_len",
                format!(
                    "header says {file_len} bytes but the file has {} (trailing data)",
                    bytes.len()
                ),
            ));
        }
        let computed = crc32fast::hash(&bytes[CHECKED_FROM..]);
        if computed != stored {
            return Err(ArtifactError::Checksum {
                path: path.to_string(),
                stored,
                computed,
            });
        }

        let compiler_version = r.string("compiler_version")?;
        let target = r.string("target")?;
        let count = r.u32("section_count")?;
        if count > 64 {
            return Err(malformed(
                "section_count",
                format!("{count} sections (expected 3)"),
            ));
        }
        let mut table = Vec::with_capacity(count as usize);
        for i in 0..count {
            let f = format!("section_table[{i}]");
            let kind = r.u32(&f)?;
            let _reserved = r.u32(&f)?;
            let offset = r.u64(&f)?;
            let len = r.u64(&f)?;
            table.push((kind, offset, len));
        }
        let table_end = r.pos as u64;
        let mut found: [Option<&[u8]>; 3] = [None; 3];
        for (i, &(kind, offset, len)) in table.iter().enumerate() {
            let f = format!("section_table[{i}]");
            let name = section_name(kind);
            if !(SECTION_PLAN..=SECTION_KERNELS).contains(&kind) {
                return Err(malformed(&f, format!("unknown section kind {kind}")));
            }
            if offset % ALIGNMENT as u64 != 0 || offset < table_end {
                return Err(malformed(
                    &f,
                    format!("{name} section offset {offset} is not 64-aligned after the header"),
                ));
            }
            let slot = &mut found[(kind - 1) as usize];
            if slot.is_some() {
                return Err(malformed(&f, format!("second {name} section")));
            }
            *slot = Some(slice(bytes, offset, len, name, path)?);
        }
        let [plan, weights, kernels] = found;
        let missing =
            |k: u32| malformed("section_table", format!("no {} section", section_name(k)));
        let plan = plan.ok_or_else(|| missing(SECTION_PLAN))?;
        let weights = weights.ok_or_else(|| missing(SECTION_WEIGHTS))?;
        let kernels = kernels.ok_or_else(|| missing(SECTION_KERNELS))?;
        let plan: ExecPlan =
            serde_json::from_slice(plan).map_err(|e| malformed("plan", e.to_string()))?;
        plan.validate(weights.len() as u64)
            .map_err(|m| malformed("plan", m))?;
        Ok(Self {
            compiler_version,
            target,
            plan,
            weights: weights.to_vec(),
            kernels: kernels.to_vec(),
        })
    }

    /// Writes the artifact to `path` atomically: to a temporary file in the same directory,
    /// synced, then renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<(), ArtifactError> {
        let name = path.display().to_string();
        let bytes = self.to_bytes_named(&name)?;
        let io = |source| ArtifactError::Io {
            path: name.clone(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".kiln-artifact-")
            .tempfile_in(dir)
            .map_err(io)?;
        tmp.write_all(&bytes).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }

    /// Reads and checks the artifact at `path` (see [`Artifact::from_bytes`]).
    pub fn load(path: &Path) -> Result<Self, ArtifactError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ArtifactError::Io {
            path: name.clone(),
            source,
        })?;
        Self::from_bytes(&bytes, &name)
    }
}
