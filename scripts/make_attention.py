#!/usr/bin/env python3
"""Writes an ONNX model of one `Attention` node (opset 23) for benchmarks.

usage: make_attention.py OUT prefill|decode

prefill: BERT-base-sized causal self-attention, Q/K/V [1, 128, 768], 12 heads of 64.
decode:  one generated token with grouped-query heads (32 query heads over 8 key/value heads
         of 128) and a KV cache of 511 tokens (past_key/past_value in, present out).
"""
import sys

import onnx
from onnx import TensorProto, helper


def main():
    out, kind = sys.argv[1], sys.argv[2]
    f = TensorProto.FLOAT
    if kind == "prefill":
        b, s, hq, hkv, d, past = 1, 128, 12, 12, 64, 0
    elif kind == "decode":
        b, s, hq, hkv, d, past = 1, 1, 32, 8, 128, 511
    else:
        sys.exit(f"unknown kind {kind!r}: prefill or decode")
    ins = [helper.make_tensor_value_info("Q", f, [b, s, hq * d]),
           helper.make_tensor_value_info("K", f, [b, s, hkv * d]),
           helper.make_tensor_value_info("V", f, [b, s, hkv * d])]
    names, outs = ["Q", "K", "V"], ["Y"]
    attrs = dict(q_num_heads=hq, kv_num_heads=hkv, is_causal=1)
    if past:
        ins += [helper.make_tensor_value_info(n, f, [b, hkv, past, d]) for n in ["PK", "PV"]]
        names += ["", "PK", "PV"]
        outs += ["PRK", "PRV"]
    node = helper.make_node("Attention", names, outs, **attrs)
    graph = helper.make_graph([node], f"attention_{kind}", ins,
                              [helper.make_tensor_value_info(o, f, None) for o in outs])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 10
    onnx.save(m, out)


if __name__ == "__main__":
    main()
