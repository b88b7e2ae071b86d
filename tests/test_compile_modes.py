"""train.compile_mode: torch.compile's mode for the decoder layers (complexity_dist/model/model.py
compile_layers). On CPU every mode compiles the same math; their speed is measured on the GPU (README,
Performance; tests/gpu/test_gpu_compile_modes.py)."""
import pytest
import torch

from complexity_dist.config import COMPILE_MODES, ConfigError, load_config
from complexity_dist.model.model import ComplexityForCausalLM

SMALL = ["model.hidden_size=64", "model.intermediate_size=128",
         "model.num_hidden_layers=2", "model.vocab_size=256"]


@pytest.mark.parametrize("mode", COMPILE_MODES[1:])
def test_every_mode_compiles_the_layers_to_the_default_modes_result(root, mode, monkeypatch):
    cfg = load_config(root / "configs/tiny.yaml", SMALL)
    seen = []
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: (seen.append(kw.get("mode")),
                                                                        compile_(self, **kw)))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for m in ("default", mode):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = ComplexityForCausalLM(cfg.model)
        model.compile_layers(m)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert seen == [None, None, mode, mode]  # one torch.compile per layer, with the mode asked for
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("overrides,message", [
    (["train.compile_mode=fast"], "train.compile_mode='fast' is not one of 'default'"),
    (["train.compile=false", "train.compile_mode=max-autotune-no-cudagraphs"], "set train.compile=true"),
    (["train.compile=true", "train.compile_mode=reduce-overhead"],
     "train.compile_mode=reduce-overhead (CUDA graphs) is not offered"),
])
def test_refusals_name_the_setting_and_the_fix(root, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(root / "configs/tiny.yaml", overrides)
    assert message in str(e.value)
