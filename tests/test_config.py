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
    (["parallel.zero3_persistence_threshold=-1"], "parallel.zero3_persistence_threshold=-1 must be >= 0"),
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


# --- range checks and bad inputs, each one clear line and exit 2 from every CLI path -------------

def _one_clear_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("complexity-dist: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("override, message", [
    ("model.rope_theta=0", "model.rope_theta=0.0 must be > 0"),
    ("model.rms_norm_eps=0", "model.rms_norm_eps=0.0 must be > 0"),
    ("model.rms_norm_eps=-1e-6", "model.rms_norm_eps=-1e-06 must be > 0"),
    ("model.initializer_range=-0.02", "model.initializer_range=-0.02 must be >= 0"),
    ("model.dynamics_dt=0", "model.dynamics_dt=0.0 must be in (0, 1]"),
    ("model.dynamics_dt=-0.1", "model.dynamics_dt=-0.1 must be in (0, 1]"),
    ("model.dynamics_dt=5", "model.dynamics_dt=5.0 must be in (0, 1]"),
    ("model.mu_highway_scale=3", "model.mu_highway_scale=3.0 must be in [0, 1]"),
    ("model.router_base_margin=-10", "model.router_base_margin=-10.0 must be >= 0"),
    ("train.run_dir=", "train.run_dir is empty"),
    ("train.run_dir=runs/a%20b", "contains %"),
    ("train.run_dir=runs/exp#3", "contains #"),
    ("train.run_dir=runs/x?y", "contains ?"),
])
def test_out_of_range_values_exit_2_with_one_line(root, capsys, override, message):
    assert main(["info", str(root / "configs/tiny.yaml"), override]) == 2
    _one_clear_line(capsys, "configuration error", message)


def test_special_characters_in_run_dir_are_fine_without_the_default_sqlite_store():
    for extra in (["tracking.enabled=false"], ["tracking.uri=http://127.0.0.1:5000"]):
        assert load_config(None, ["train.run_dir=runs/exp#3%", *extra]).train.run_dir == "runs/exp#3%"


@pytest.mark.parametrize("command", ["train", "info", "smoke"])
def test_every_command_reports_a_range_error_as_one_line(root, capsys, command):
    assert main([command, str(root / "configs/tiny.yaml"), "model.rope_theta=0"]) == 2
    _one_clear_line(capsys, "configuration error", "model.rope_theta=0.0 must be > 0")


@pytest.mark.parametrize("world", ["0", "-2"])
def test_info_world_size_must_be_positive(root, capsys, world):
    assert main(["info", str(root / "configs/tiny.yaml"), "--world-size", world]) == 2
    _one_clear_line(capsys, f"--world-size {world} must be >= 1")
    with pytest.raises(ConfigError, match="world size 0 must be >= 1"):
        load_config(None).layout(0)


@pytest.mark.parametrize("text, needles", [
    ("train:\n  steps: 3\n  seed: 1\n  steps: 4\n", ["duplicate key 'steps'", "first on line 2", "line 4"]),
    ("train:\n  steps: 3\nmodel:\n  hidden_size: 64\ntrain:\n  seed: 1\n",
     ["duplicate key 'train'", "first on line 1", "line 5"]),
    ("train: {steps: 3, steps: 4}\n", ["duplicate key 'steps'", "line 1"]),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, capsys, text, needles):
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    assert main(["info", str(p)]) == 2
    _one_clear_line(capsys, str(p), *needles)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("optim: &o {lr: 1.0e-3, min_lr: 1.0e-4}\ntrain:\n  steps: 3\n"
                 "checkpoint:\n  <<: {every: 5, keep_last: 2}\n  every: 7\n")
    cfg = load_config(p)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep_last, cfg.optim.lr) == (7, 2, 1e-3)


def test_non_utf8_config_file(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("train:\n  run_dir: runs/caf\u00e9\n".encode("latin-1"))
    assert main(["smoke", str(p)]) == 2
    _one_clear_line(capsys, str(p), "not UTF-8", "line 2")


def test_config_path_that_is_a_directory(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    _one_clear_line(capsys, str(tmp_path), "is a directory")


@pytest.mark.parametrize("command", [["info", "--preflight"], ["train"]])
def test_run_dir_that_is_a_file(root, tmp_path, capsys, command):
    f = tmp_path / "taken"
    f.write_text("not a folder")
    assert main([command[0], str(root / "configs/tiny.yaml"), *command[1:], f"train.run_dir={f}",
                 "tracking.enabled=false"]) == 2
    _one_clear_line(capsys, "run directory error", f"train.run_dir={f} exists and is not a directory")
    assert main(["info", str(root / "configs/tiny.yaml"), "--preflight", f"train.run_dir={f}/sub"]) == 2
    _one_clear_line(capsys, f"cannot be created: {f} is a file")


def test_read_only_run_dir(root, tmp_path):
    """A run_dir in a folder this user cannot write, through the real command as the SLURM launchers run it.
    Root ignores permission bits, so as root the command runs without the capabilities that let it."""
    import os
    import shutil
    import subprocess
    import sys

    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a read-only folder cannot be made")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "complexity_dist", "info",
                               str(root / "configs/tiny.yaml"), "--preflight", f"train.run_dir={ro}/run"],
                              capture_output=True, text=True, cwd=root, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        ro.chmod(0o755)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    for needle in ("run directory error", f"train.run_dir={ro}/run is not writable", "Permission denied"):
        assert needle in lines[0], lines[0]
