//! Unit tests of the array ops against values computed with numpy / the ONNX reference.
