//! Errors of the IR crate. Every error names the file, node and/or field it is about.

use thiserror::Error;

/// An error from importing, verifying, inferring or interpreting a graph.
#[derive(Debug, Error)]
pub enum IrError {
    /// The model file could not be read.
    #[error("{path}: cannot read file: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid ONNX protobuf.
    #[error("{path}: not a valid ONNX model (protobuf decode failed: {msg})")]
    Decode {
        /// The file.
        path: String,
        /// Decoder message.
        msg: String,
    },
    /// A field of the model is invalid or missing.
    #[error("{path}: {field}: {msg}")]
    Model {
        /// The file (or `<memory>`).
        path: String,
        /// The protobuf field or graph element, e.g. `graph.initializer[3] 'w'`.
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// An op that Kiln does not support.
    #[error("node '{node}': unsupported op '{domain}{op_type}' (opset {opset})")]
    Unsupported {
        /// Node name.
        node: String,
        /// ONNX op type.
        op_type: String,
        /// Domain prefix (empty or `domain::`).
        domain: String,
        /// Opset version of the domain.
        opset: i64,
    },
    /// A node is malformed (bad attribute, bad input count, shape mismatch...).
    #[error("node '{node}' ({op_type}): {msg}")]
    Node {
        /// Node name.
        node: String,
        /// ONNX op type.
        op_type: String,
        /// What is wrong, naming the attribute or input.
        msg: String,
    },
    /// A runtime input does not match the graph's declared input.
    #[error("input '{name}': {msg}")]
    Input {
        /// Graph input name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// The graph structure is invalid (found by the verifier).
    #[error("graph '{graph}': {msg}")]
    Graph {
        /// Graph name.
        graph: String,
        /// What is wrong.
        msg: String,
    },
}

/// Result alias for the IR crate.
pub type Result<T, E = IrError> = std::result::Result<T, E>;
