"""train.compile_mode: torch.compile's mode for the decoder layers (complexity_dist/model/model.py
compile_layers). Only the default is offered; the modes tried on the GPU and withdrawn are refused with the
reason (complexity_dist/config.py WITHDRAWN_COMPILE_MODES; README, Training)."""
import pytest

from complexity_dist.config import ConfigError, load_config


@pytest.mark.parametrize("overrides,message", [
    (["train.compile_mode=fast"], "train.compile_mode='fast' is not one of 'default'"),
    (["train.compile=true", "train.compile_mode=reduce-overhead"],
     "train.compile_mode=reduce-overhead is not offered: CUDA graphs"),
    (["train.compile=true", "train.compile_mode=max-autotune-no-cudagraphs"],
     "train.compile_mode=max-autotune-no-cudagraphs is not offered: its compile"),
])
def test_refusals_name_the_setting_and_the_fix(root, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(root / "configs/tiny.yaml", overrides)
    assert message in str(e.value)
    assert "fast" in overrides[0] or "use train.compile_mode=default" in str(e.value)
