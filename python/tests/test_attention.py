"""ONNX `Attention` (opset 24) against onnxruntime: expanded into ordinary ops by the
`decompose` stage and compiled for the CPU. Multi-head, grouped- and multi-query heads, 3-D
and 4-D inputs, causal, bool and float masks (shorter than the keys too), a KV cache,
`scale`, `softcap`, the `qk_matmul_output` modes and an external cache (`nonpad_kv_seqlen`). (Masks shorter than the keys, which the
operator allows and onnxruntime refuses, are checked against the ONNX node tests.)"""

import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ort_check import assert_matches_onnxruntime

CASES = {
    "mha_4d": dict(hq=4, hkv=4, three=False),
    "gqa_3d_causal": dict(hq=8, hkv=2, three=True, causal=1),
    "mqa_4d_bool_mask": dict(hq=6, hkv=1, three=False, mask="bool"),
    "gqa_4d_past_causal": dict(hq=4, hkv=2, three=False, past=3, causal=1),
    "mha_3d_past_float_mask": dict(hq=2, hkv=2, three=True, past=2, mask="float"),
    "scale_softcap_mode1": dict(hq=4, hkv=4, three=False, scale=0.3, softcap=1.5, mode=1),
    "mode2_float_mask": dict(hq=4, hkv=2, three=False, mask="float", mode=2),
    "mode3_causal_past": dict(hq=4, hkv=1, three=True, past=4, causal=1, mode=3),
    "mode0_softcap": dict(hq=2, hkv=1, three=False, softcap=2.0, mode=0),
    "external_cache_causal": dict(hq=4, hkv=2, three=False, causal=1, nonpad=True),
    "external_cache_3d_float_mask": dict(hq=2, hkv=1, three=True, nonpad=True, mask="float"),
}


def attention_model(path, c, b, sq, kv, d):
    hq, hkv, three, past = c["hq"], c["hkv"], c["three"], c.get("past", 0)
    total = past + kv
    f = TensorProto.FLOAT
    if three:
        shapes = [[b, sq, hq * d], [b, kv, hkv * d], [b, kv, hkv * d]]
    else:
        shapes = [[b, hq, sq, d], [b, hkv, kv, d], [b, hkv, kv, d]]
    ins = [helper.make_tensor_value_info(n, f, s) for n, s in zip("QKV", shapes)]
    names = ["Q", "K", "V"]
    mask = c.get("mask")
    if mask:
        keys = total
        mt = TensorProto.BOOL if mask == "bool" else f
        ins.append(helper.make_tensor_value_info("M", mt, [b, 1, sq, keys]))
        names.append("M")
    elif past:
        names.append("")
    if past:
        ins += [helper.make_tensor_value_info(n, f, [b, hkv, past, d]) for n in ["PK", "PV"]]
        names += ["PK", "PV"]
    if c.get("nonpad"):
        names += [""] * (6 - len(names)) + ["N"]
        ins.append(helper.make_tensor_value_info("N", TensorProto.INT64, [b]))
    outs = ["Y"]
    if past or "mode" in c:
        outs += ["PRK", "PRV"] if past else ["", ""]
    if "mode" in c:
        outs.append("QK")
    attrs = {}
    if three:
        attrs.update(q_num_heads=hq, kv_num_heads=hkv)
    for k, a in [("causal", "is_causal"), ("scale", "scale"), ("softcap", "softcap"),
                 ("mode", "qk_matmul_output_mode")]:
        if k in c:
            attrs[a] = c[k]
    node = helper.make_node("Attention", names, outs, **attrs)
    graph = helper.make_graph(
        [node], "attention", ins,
        [helper.make_tensor_value_info(o, f, None) for o in outs if o])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    m.ir_version = 10
    onnx.save(m, path)
    return [i.name for i in ins], shapes


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_matches_onnxruntime(name, tmp_path):
    c = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    b, sq, kv, d = 2, 5, 5, 8
    path = str(tmp_path / "m.onnx")
    names, _ = attention_model(path, c, b, sq, kv, d)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = i.shape
        if i.type == "tensor(bool)":
            feeds[i.name] = rng.random(shape) < 0.75
        elif i.type == "tensor(int64)":
            # valid keys per batch entry: fewer than the queries, and all of them
            feeds[i.name] = np.array([kv - 2, kv][:shape[0]], dtype=np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    # (masked scores in mode 2 are -inf in both)
    assert_matches_onnxruntime(path, feeds)
