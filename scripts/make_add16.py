"""Writes tests/data/add16.onnx: y = a + b over 16 floats (the per-call overhead benchmark model)."""
import os
import onnx
from onnx import TensorProto, helper

a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [16])
b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [16])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])
g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add16", [a, b], [y])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 8
onnx.checker.check_model(m)
out = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "add16.onnx")
onnx.save(m, out)
print("wrote", out)
