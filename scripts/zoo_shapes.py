"""The `--shape NAME=DIMS` arguments that fix a zoo model's inputs to the shapes of its test
data (tests/zoo/MODEL/test_data_set_0), for the scripts that compile or tune the zoo."""
import onnx

ZOO = ['mlp', 'resnet', 'mobilenet', 'bert', 'gpt']


def shape_args(m):
    """`['--shape', 'x=1x3x64x64', ...]` for zoo model `m`."""
    model = onnx.load(f'tests/zoo/{m}/model.onnx')
    args = []
    for i, inp in enumerate(model.graph.input):
        t = onnx.load_tensor(f'tests/zoo/{m}/test_data_set_0/input_{i}.pb')
        args += ['--shape', inp.name + '=' + 'x'.join(str(d) for d in t.dims)]
    return args
