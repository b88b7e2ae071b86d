import pytest
from conftest import tiny_overrides

from complexity_dist.cli import main
from complexity_dist.config import ConfigError, Config, load_config


def test_overrides_and_types(root):
    cfg = load_config(root / "configs/tiny.yaml", ["train.steps=7", "optim.lr=1e-3", "optim.betas=[0.8,0.9]",
                                                   "checkpoint.resume=false", "tracking.uri=file:/tmp/x"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.checkpoint.resume is False and cfg.tracking.uri == "file:/tmp/x"


@pytest.mark.parametrize("override, message", [
    (["model.bogus=1"], "unknown config key model.bogus"),
    (["nosection.x=1"], "unknown config section 'nosection'"),
    (["train.steps=many"], "train.steps='many' is not an integer"),
    (["train.steps=0"], "train.steps=0 must be >= 1"),
    (["parallel.zero_stage=4"], "parallel.zero_stage=4 is not one of 0, 1, 2, 3"),
    (["parallel.tp=3"], "parallel.tp=3 does not divide model.num_key_value_heads=2"),
    (["model.num_attention_heads=5"], "model.num_attention_heads=5 does not divide hidden_size=256"),
    (["model.mu_router=soft"], "model.mu_router='soft' is not one of 'hard', 'straight_through'"),
    (["data.seq_len=4096"], "exceeds model.max_position_embeddings=2048"),
    (["steps=3"], "is not of the form section.key=value"),
])
def test_bad_values_name_key_and_fix(root, override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(root / "configs/tiny.yaml", override)
    assert message in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key train.stepz in .*c.yaml"):
        load_config(p)


def test_layout_splits_global_batch():
    cfg = load_config(None, ["train.global_batch=16", "train.micro_batch=2"])
    lay = cfg.layout(4)
    assert (lay.dp, lay.micro_batch, lay.grad_accum) == (4, 2, 2)
    with pytest.raises(ConfigError, match="train.global_batch=16 is not divisible by the data-parallel size 3"):
        cfg.layout(3)


def test_cli_reports_config_errors_without_traceback(root, capsys):
    assert main(["info", str(root / "configs/tiny.yaml"), "model.hidden_size=7"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "Traceback" not in err


def test_flat_and_roundtrip():
    from complexity_dist.config import config_from_dict
    cfg = load_config(None, tiny_overrides())
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.flat()["model.hidden_size"] == 32
    assert isinstance(Config().validate(), Config)
