//! The cluster description: devices (with their SKU figures) and the links between them,
//! read from a small TOML file (format and example in `docs/parallel.md`).
//!
//! ```toml
//! [[group]]          # 4 H100 on node 0
//! sku = "h100"
//! count = 4
//! node = 0
//! [[group]]          # 4 A100 on node 1
//! sku = "a100"
//! count = 4
//! node = 1
//! [intra_node]       # links inside a node (defaults by kind)
//! kind = "nvlink"
//! [inter_node]       # links between nodes
//! kind = "infiniband"
//! bandwidth_gbs = 50
//! ```
//!
//! Rank `r` of a plan runs on device `r`: devices are numbered group by group, in file
//! order. SKU names are resolved by a function the caller passes (the `kiln` crate maps
//! them through codegen's GPU database; `cpu` is this machine's cores, see
//! [`DeviceSpec::cpu`]).

use serde::Deserialize;
use std::sync::Arc;

/// The figures of one device model that the simulator needs.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSpec {
    /// SKU name (for reports).
    pub name: String,
    /// Peak f32 arithmetic rate, GFLOP/s.
    pub peak_gflops_f32: f64,
    /// Peak f16/bf16 arithmetic rate (tensor cores where present), GFLOP/s.
    pub peak_gflops_f16: f64,
    /// Memory bandwidth, GB/s.
    pub bandwidth_gbs: f64,
    /// Fixed cost of one kernel launch, µs.
    pub launch_us: f64,
    /// Device memory, bytes.
    pub memory_bytes: f64,
    /// Whether the device is a CPU core (default links: shared memory in a node).
    pub is_cpu: bool,
    /// Units working on output tiles in parallel (GPU: SMs; 1 for a CPU core), see
    /// [`crate::eqsat::cost::Device::parallel_units`].
    pub parallel_units: f64,
    /// Output elements of one contraction tile (GPU: 64×64; 1 for a CPU core).
    pub tile_elems: f64,
}

impl DeviceSpec {
    /// One core of this machine as a rank: the analytical CPU model's figures
    /// ([`crate::eqsat::cost::Device::cpu`]: 100 GFLOP/s f32, 20 GB/s, 1 µs per kernel)
    /// and `memory_gb` of memory.
    pub fn cpu(memory_gb: f64) -> DeviceSpec {
        let d = crate::eqsat::cost::Device::cpu();
        DeviceSpec {
            name: "cpu".into(),
            peak_gflops_f32: d.peak_gflops,
            peak_gflops_f16: d.peak_gflops,
            bandwidth_gbs: d.bandwidth_gbs,
            launch_us: d.launch_us,
            memory_bytes: memory_gb * 1e9,
            is_cpu: true,
            parallel_units: d.parallel_units,
            tile_elems: d.tile_elems,
        }
    }
}

/// The kind of a link, which sets its default bandwidth and latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// NVLink / NVSwitch inside a node (450 GB/s per direction, 2 µs).
    Nvlink,
    /// PCIe 4.0 x16 (25 GB/s effective, 5 µs).
    Pcie,
    /// InfiniBand NDR, one 400 Gb/s NIC per device (50 GB/s, 5 µs).
    Infiniband,
    /// 100 Gb Ethernet (12.5 GB/s, 20 µs).
    Ethernet,
    /// Shared memory between processes on one machine (MPI shm: 8 GB/s, 1 µs).
    Shm,
}

impl LinkKind {
    /// Default (bandwidth GB/s per direction, latency µs) of the kind.
    pub fn defaults(self) -> (f64, f64) {
        match self {
            LinkKind::Nvlink => (450.0, 2.0),
            LinkKind::Pcie => (25.0, 5.0),
            LinkKind::Infiniband => (50.0, 5.0),
            LinkKind::Ethernet => (12.5, 20.0),
            LinkKind::Shm => (8.0, 1.0),
        }
    }
}

/// A class of point-to-point links.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// The kind.
    pub kind: LinkKind,
    /// Bandwidth per direction, GB/s.
    pub bandwidth_gbs: f64,
    /// Latency of one message, µs.
    pub latency_us: f64,
}

impl Link {
    /// A link of `kind` with its default figures.
    pub fn of(kind: LinkKind) -> Link {
        let (bandwidth_gbs, latency_us) = kind.defaults();
        Link {
            kind,
            bandwidth_gbs,
            latency_us,
        }
    }

    /// Time to move `bytes` over the link in one message, µs.
    pub fn transfer_us(&self, bytes: f64) -> f64 {
        self.latency_us + bytes / (self.bandwidth_gbs * 1e3)
    }
}

/// One device of the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterDevice {
    /// Its figures (shared by the devices of a group).
    pub spec: Arc<DeviceSpec>,
    /// The node (machine) it sits in.
    pub node: usize,
    /// Index of the `[[group]]` it was declared in.
    pub group: usize,
}

/// A set of devices and the links between them.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// Devices; rank `r` runs on `devices[r]`.
    pub devices: Vec<ClusterDevice>,
    /// Links between devices of one node.
    pub intra_node: Link,
    /// Links between devices of different nodes.
    pub inter_node: Link,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    group: Vec<toml::Spanned<GroupFile>>,
    intra_node: Option<LinkFile>,
    inter_node: Option<LinkFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    sku: toml::Spanned<String>,
    count: usize,
    #[serde(default)]
    node: usize,
    memory_gb: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkFile {
    kind: LinkKind,
    bandwidth_gbs: Option<f64>,
    latency_us: Option<f64>,
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

impl Cluster {
    /// Parses a cluster file. `resolve` maps a SKU name to its figures (an error message
    /// for unknown names). Errors name the line and field.
    pub fn from_toml(
        text: &str,
        resolve: &dyn Fn(&str) -> Result<DeviceSpec, String>,
    ) -> Result<Cluster, String> {
        let file: File = toml::from_str(text).map_err(|e| format!("cluster file: {e}"))?;
        if file.group.is_empty() {
            return Err("cluster file: no [[group]] of devices".into());
        }
        let mut devices = Vec::new();
        let mut all_cpu = true;
        for (gi, g) in file.group.iter().enumerate() {
            let line = line_of(text, g.span().start);
            let g = g.get_ref();
            let at =
                |field: &str| format!("cluster file, line {line}: group {gi}, field '{field}'");
            let mut spec = resolve(g.sku.get_ref()).map_err(|e| {
                format!(
                    "cluster file, line {}: group {gi}, field 'sku': {e}",
                    line_of(text, g.sku.span().start)
                )
            })?;
            if g.count == 0 {
                return Err(format!("{}: must be at least 1", at("count")));
            }
            if let Some(m) = g.memory_gb {
                if !(m > 0.0 && m.is_finite()) {
                    return Err(format!("{}: must be a positive number", at("memory_gb")));
                }
                spec.memory_bytes = m * 1e9;
            }
            all_cpu &= spec.is_cpu;
            let spec = Arc::new(spec);
            for _ in 0..g.count {
                devices.push(ClusterDevice {
                    spec: spec.clone(),
                    node: g.node,
                    group: gi,
                });
            }
        }
        let link = |l: &Option<LinkFile>, default: LinkKind, what: &str| -> Result<Link, String> {
            let Some(l) = l else {
                return Ok(Link::of(default));
            };
            let mut out = Link::of(l.kind);
            if let Some(b) = l.bandwidth_gbs {
                if !(b > 0.0 && b.is_finite()) {
                    return Err(format!(
                        "cluster file: [{what}] bandwidth_gbs must be positive"
                    ));
                }
                out.bandwidth_gbs = b;
            }
            if let Some(t) = l.latency_us {
                if !(t >= 0.0 && t.is_finite()) {
                    return Err(format!(
                        "cluster file: [{what}] latency_us must be non-negative"
                    ));
                }
                out.latency_us = t;
            }
            Ok(out)
        };
        let (d_intra, d_inter) = if all_cpu {
            (LinkKind::Shm, LinkKind::Ethernet)
        } else {
            (LinkKind::Nvlink, LinkKind::Infiniband)
        };
        Ok(Cluster {
            devices,
            intra_node: link(&file.intra_node, d_intra, "intra_node")?,
            inter_node: link(&file.inter_node, d_inter, "inter_node")?,
        })
    }

    /// `n` ranks on this machine's cores (shared-memory links), each with `memory_gb`.
    pub fn cpus(n: usize, memory_gb: f64) -> Cluster {
        let spec = Arc::new(DeviceSpec::cpu(memory_gb));
        Cluster {
            devices: (0..n)
                .map(|_| ClusterDevice {
                    spec: spec.clone(),
                    node: 0,
                    group: 0,
                })
                .collect(),
            intra_node: Link::of(LinkKind::Shm),
            inter_node: Link::of(LinkKind::Ethernet),
        }
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether the cluster has no device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The link between devices `a` and `b`.
    pub fn link(&self, a: usize, b: usize) -> Link {
        if self.devices[a].node == self.devices[b].node {
            self.intra_node
        } else {
            self.inter_node
        }
    }

    /// The slowest link joining the devices `ranks` (a collective over them runs at its
    /// pace); the intra-node link for a single device.
    pub fn group_link(&self, ranks: &[usize]) -> Link {
        let first = ranks.first().map(|&r| self.devices[r].node);
        if ranks.iter().all(|&r| Some(self.devices[r].node) == first) {
            self.intra_node
        } else {
            self.inter_node
        }
    }

    /// One line per group: `4× h100-sxm (node 0)`, and the links.
    pub fn summary(&self) -> String {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.devices.len() {
            let d = &self.devices[i];
            let n = self.devices[i..]
                .iter()
                .take_while(|e| e.group == d.group)
                .count();
            out.push(format!(
                "{n}× {} (node {}, ranks {}..{})",
                d.spec.name,
                d.node,
                i,
                i + n
            ));
            i += n;
        }
        let l = |l: &Link| format!("{:?} {} GB/s {} µs", l.kind, l.bandwidth_gbs, l.latency_us);
        format!(
            "{}; intra-node {}; inter-node {}",
            out.join(" + "),
            l(&self.intra_node),
            l(&self.inter_node)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver knowing `cpu` and a fake `fast` GPU.
    pub(crate) fn resolve(name: &str) -> Result<DeviceSpec, String> {
        match name {
            "cpu" => Ok(DeviceSpec::cpu(4.0)),
            "fast" => Ok(DeviceSpec {
                name: "fast".into(),
                peak_gflops_f32: 1000.0,
                peak_gflops_f16: 4000.0,
                bandwidth_gbs: 1000.0,
                launch_us: 3.0,
                memory_bytes: 16e9,
                is_cpu: false,
                parallel_units: 1.0,
                tile_elems: 1.0,
            }),
            _ => Err(format!("unknown SKU '{name}'")),
        }
    }

    #[test]
    fn parses_groups_links_and_defaults() {
        let c = Cluster::from_toml(
            "[[group]]\nsku = \"fast\"\ncount = 2\nnode = 0\n\n[[group]]\nsku = \"fast\"\ncount = 2\nnode = 1\nmemory_gb = 8\n\n[inter_node]\nkind = \"ethernet\"\nlatency_us = 30\n",
            &resolve,
        )
        .unwrap();
        assert_eq!(c.len(), 4);
        assert_eq!(c.devices[3].spec.memory_bytes, 8e9);
        assert_eq!(c.devices[0].spec.memory_bytes, 16e9);
        assert_eq!(c.intra_node, Link::of(LinkKind::Nvlink));
        assert_eq!(c.inter_node.kind, LinkKind::Ethernet);
        assert_eq!(c.inter_node.bandwidth_gbs, 12.5);
        assert_eq!(c.inter_node.latency_us, 30.0);
        assert_eq!(c.group_link(&[0, 1]).kind, LinkKind::Nvlink);
        assert_eq!(c.group_link(&[1, 2]).kind, LinkKind::Ethernet);
        assert!(c.summary().contains("2× fast (node 1, ranks 2..4)"));
        let cpu = Cluster::from_toml("[[group]]\nsku = \"cpu\"\ncount = 2\n", &resolve).unwrap();
        assert_eq!(cpu.intra_node.kind, LinkKind::Shm);
        assert_eq!(cpu, Cluster::cpus(2, 4.0));
    }

    #[test]
    fn bad_files_name_the_line_and_field() {
        let e = |t: &str| Cluster::from_toml(t, &resolve).unwrap_err();
        let unknown =
            e("[[group]]\nsku = \"fast\"\ncount = 1\n[[group]]\n\nsku = \"v100\"\ncount = 1\n");
        assert!(
            unknown.contains("line 6") && unknown.contains("'sku'") && unknown.contains("v100"),
            "{unknown}"
        );
        let zero = e("[[group]]\nsku = \"fast\"\ncount = 0\n");
        assert!(
            zero.contains("'count'") && zero.contains("line 1"),
            "{zero}"
        );
        let typo = e("[[group]]\nsku = \"fast\"\ncuont = 1\n");
        assert!(typo.contains("cuont") && typo.contains("line 3"), "{typo}");
        let kind =
            e("[[group]]\nsku = \"fast\"\ncount = 1\n[intra_node]\nkind = \"carrier-pigeon\"\n");
        assert!(kind.contains("carrier-pigeon"), "{kind}");
        let bw = e("[[group]]\nsku = \"fast\"\ncount = 1\n[intra_node]\nkind = \"pcie\"\nbandwidth_gbs = 0\n");
        assert!(
            bw.contains("intra_node") && bw.contains("bandwidth_gbs"),
            "{bw}"
        );
        assert!(e("").contains("group"), "{}", e(""));
        assert!(e("[[group]]\nsku = \"fast\"\n").contains("count"));
    }
}
