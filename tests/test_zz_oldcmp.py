import dataclasses, importlib.util, sys
import pytest, torch
from harness.editors import common as new
spec = importlib.util.spec_from_file_location("harness.editors.old_common", "/tmp/old_common.py")
old = importlib.util.module_from_spec(spec); sys.modules[spec.name] = old; spec.loader.exec_module(old)

@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def lm_any(request, tiny_lm):
    if request.param == torch.float32:
        return tiny_lm
    import copy
    return dataclasses.replace(tiny_lm, model=copy.deepcopy(tiny_lm.model).to(request.param))

@pytest.mark.parametrize("objective", ["rewrite", "erase", "force", "amplify"])
@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("ci", [1, 5])
@pytest.mark.parametrize("mps", [False, True])
def test_same(lm_any, builtin_cases, objective, layer, ci, mps):
    case = dataclasses.replace(builtin_cases[ci], objective=objective)
    templates = ["{}", "The weather today. {}", "It was said that. {}"]
    opt = new.ValueOpt(steps=8, early_stop_loss=0.5, most_probable_stop=mps)
    name = lm_any.adapter.mlp_name(layer)
    a = new.optimize_value(lm_any, case, name, templates, opt)
    b = old.optimize_value(lm_any, case, name, templates, old.ValueOpt(**dataclasses.asdict(opt)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2] == b[2], (a[2], b[2])
