"""`complexity-dist convert`: training checkpoints (ZeRO-1 on 2 processes, ZeRO-3) -> Hugging Face -> back."""
import json

import pytest
import torch
from test_train import ROOT, dataset, launcher, metrics, run, train_cmd  # noqa: F401  (dataset is a fixture)

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

LAYOUTS = {"zero1x2": (["parallel.zero_stage=1", "train.micro_batch=1"], 2), "zero3": (["parallel.zero_stage=3"], 1)}
STEPS = 6


def convert_cmd(*args, nproc=1):
    return [*launcher(nproc), "-m", "complexity_dist", "convert", *map(str, args)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):  # noqa: F811
    """layout -> (run_dir, hf_dir): a run of STEPS steps and its fp32 export."""
    out = {}
    for name, (overrides, nproc) in LAYOUTS.items():
        base = tmp_path_factory.mktemp(name)
        run(train_cmd(base / "run", dataset, f"train.steps={STEPS}", f"checkpoint.every={STEPS}", *overrides,
                      nproc=nproc))
        run(convert_cmd("to-hf", base / "run", base / "hf", "--dtype", "fp32", "--shard-size", "200KB"))
        out[name] = (base / "run", base / "hf")
    return out


def ours_from_checkpoint(run_dir):
    from complexity_dist.convert.reader import CheckpointReader, find_checkpoint, model_config_of
    from complexity_dist.model import ComplexityForCausalLM

    saved = find_checkpoint(run_dir)
    model = ComplexityForCausalLM(model_config_of(saved))
    names = [k for k in model.state_dict() if k != "lm_head.weight"]
    model.load_state_dict(dict(CheckpointReader(saved).read(names)), strict=False)
    return model.eval()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_transformers_loads_the_export_and_computes_what_we_compute(trained, layout):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, hf_dir = trained[layout]
    files = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "modeling_complexity.py",
            "configuration_complexity.py", "model.safetensors.index.json"} <= files
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "complexity-deep"
    ours = ours_from_checkpoint(run_dir)
    hf, info = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32,
                                                    output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    ids = torch.tensor([tok.encode("the quick brown fox jumps over a lazy dog while seven")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    mine = ours.generate(ids[:, :6], 20)
    theirs = hf.generate(ids[:, :6], max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert theirs.tolist() == mine.tolist()


def test_hf_to_ours_to_hf_is_bit_identical_and_the_next_step_matches(trained, dataset, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    run_dir, hf_dir = trained["zero1x2"]
    overrides, nproc = LAYOUTS["zero1x2"]
    from test_train import SMALL
    conv = tmp_path / "conv"
    run(convert_cmd("from-hf", hf_dir, conv, "--config", ROOT / "configs/tiny.yaml", "--step", STEPS, *SMALL,
                    f"data.path={dataset}", f"train.steps={STEPS}", *overrides, nproc=nproc))
    run(convert_cmd("to-hf", conv, tmp_path / "hf2", "--dtype", "fp32", "--shard-size", "200KB"))
    names = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    assert names == sorted(p.name for p in (tmp_path / "hf2").glob("*.safetensors"))
    for n in names:
        assert (hf_dir / n).read_bytes() == (tmp_path / "hf2" / n).read_bytes(), n
        a, b = load_file(hf_dir / n), load_file(tmp_path / "hf2" / n)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # one more step: the original resumed from its checkpoint, and the converted run's first step
    run(train_cmd(run_dir, dataset, f"train.steps={STEPS + 1}", *overrides, nproc=nproc))
    run(train_cmd(conv, dataset, f"train.steps={STEPS + 1}", *overrides, nproc=nproc))
    assert metrics(conv)[-1]["step"] == STEPS + 1
    assert metrics(conv)[-1]["loss"] == metrics(run_dir)[-1]["loss"]


def _fails(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for n in needles:
        assert str(n) in proc.stderr, (n, proc.stderr[-3000:])


def test_wrong_truncated_and_foreign_files_exit_2_naming_them(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    run_dir, hf_dir = trained["zero3"]

    def copy(name):
        d = tmp_path / name
        shutil.copytree(hf_dir, d)
        return d

    def from_hf(d):
        return run(convert_cmd("from-hf", d, tmp_path / f"run-{d.name}"), check=False)

    shard = sorted(hf_dir.glob("model-*.safetensors"))[1]
    d = copy("truncated")
    (d / shard.name).write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
    _fails(from_hf(d), shard.name)
    d = copy("foreign")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    _fails(from_hf(d), "config.json", "llama")
    d = copy("shape")
    cfg["hidden_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    _fails(from_hf(d), "shape")
    d = copy("missing")
    tensors = load_file(d / shard.name)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, d / shard.name)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(from_hf(d), dropped)
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(hf_dir / "config.json", d)
    torch.save({}, d / "pytorch_model.bin")
    _fails(from_hf(d), "pytorch_model.bin", "safetensors")
    # a damaged training checkpoint
    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    broken = tmp_path / "broken_step" / step.name
    shutil.copytree(step, broken)
    f = broken / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    _fails(run(convert_cmd("to-hf", broken, tmp_path / "out"), check=False), f.name)
