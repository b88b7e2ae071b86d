"""Hugging Face directory -> training checkpoint that `complexity-dist train` resumes.

Weights are read from safetensors only (pickled .bin files are refused: loading them could run code). The
layer-0 `mu_to_{q,k,v}` weights and the derived buffers (`rotary_emb.inv_freq`, `mlp.token_to_expert`) are
ignored: layer 0 has no mu input, in the reference as here, so its mu weights never reach any output (published
checkpoints carry them, randomly initialised and untrained; a note says when they are not zero). The buffers
must hold the values this architecture derives (RoPE with the config's theta, token_id % E): other values
mean another model, and are refused.

The checkpoint is written through the trainer's own engine and Checkpointer, for the configured layout: run
it as one process, or under torchrun with the processes the training run will have (ZeRO shards are per
rank). Memory: what one training process of that layout holds at step 0 (weights, no optimizer moments yet).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from complexity_dist.config import Config, ConfigError, ModelConfig, load_config
from complexity_dist.convert.keys import MODEL_TYPE, SIZE_FIELDS, ConvertError, buffer_value, hf_keys
from complexity_dist.convert.to_hf import INDEX


def read_hf_config(hf_dir: Path) -> dict:
    f = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir} is not a folder")
    try:
        raw = json.loads(f.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{f} is missing: {hf_dir} is not a Hugging Face model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != MODEL_TYPE:
        got = raw.get("model_type") if isinstance(raw, dict) else None
        raise ConvertError(f"{f} has model_type {got!r}, not {MODEL_TYPE!r}: not a Complexity model")
    missing = [k for k in SIZE_FIELDS if k not in raw]
    if missing:
        raise ConvertError(f"{f} lacks {', '.join(missing)}")
    return raw


def model_fields(raw: dict) -> dict:
    names = {f for f in ModelConfig.__dataclass_fields__} - {"linear_backend", "kernels", "mu_router"}
    return {k: v for k, v in raw.items() if k in names and v is not None}


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """name -> safetensors file holding it."""
    index, single = hf_dir / INDEX, hf_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConvertError(f"{index} is not a safetensors index ({e})") from None
        files = {n: hf_dir / f for n, f in weight_map.items()}
        for f in set(files.values()):
            if f.parent != hf_dir or not f.is_file():
                raise ConvertError(f"{index} names {f}, which is missing or outside {hf_dir}")
        return files
    if single.is_file():
        return {n: single for n in _names(single)}
    pickled = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
    if pickled:
        raise ConvertError(f"{hf_dir} holds {', '.join(pickled)} (pickle) and no safetensors: convert reads "
                           f"safetensors only, since unpickling can run code. Save the model with "
                           f"save_pretrained(..., safe_serialization=True) first")
    raise ConvertError(f"{hf_dir} has neither model.safetensors nor {INDEX}")


def _names(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise ConvertError(f"{path} is not a readable safetensors file ({str(e)[:160]}); it may be truncated") from None


def load_hf_weights(hf_dir: Path, cfg: ModelConfig, model: torch.nn.Module) -> list[str]:
    """Copies every trained tensor into `model`, file by file, tensor by tensor; returns notes."""
    from safetensors import safe_open

    files = weight_files(hf_dir)
    keys = {k.name: k for k in hf_keys(cfg)}
    unknown = sorted(set(files) - set(keys))
    if unknown:
        raise ConvertError(f"{files[unknown[0]]} holds {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}, "
                           f"which this architecture does not have: another model")
    required = [k for k in keys.values() if k.trained and not (k.name == "lm_head.weight" and cfg.tie_word_embeddings)]
    missing = [k.name for k in required if k.name not in files]
    if missing:
        raise ConvertError(f"{hf_dir} lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    params = dict(model.state_dict(keep_vars=True))
    notes = []
    by_file: dict[Path, list[str]] = {}
    for n, f in files.items():
        by_file.setdefault(f, []).append(n)
    for path, names in by_file.items():
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:
            raise ConvertError(f"{path} is not a readable safetensors file ({str(e)[:160]}); it may be truncated") from None
        with handle as f:
            for n in names:
                k = keys[n]
                try:
                    t = f.get_tensor(n)
                except Exception as e:
                    raise ConvertError(f"{path}: {n} cannot be read ({str(e)[:160]}); the file may be truncated") from None
                if tuple(t.shape) != k.shape:
                    raise ConvertError(f"{path}: {n} has shape {tuple(t.shape)}, config.json says {k.shape}")
                if k.kind == "buffer":
                    if not torch.allclose(t.to(torch.float64), buffer_value(cfg, k).to(torch.float64), rtol=1e-3):
                        raise ConvertError(f"{path}: {n} does not hold this architecture's values (RoPE theta "
                                           f"{cfg.rope_theta}, token_id % {cfg.num_experts}): another model")
                elif k.kind == "dead":
                    if t.count_nonzero() and not notes:
                        notes.append(f"{path.name}: layer 0's mu_to_* weights are not zero; ignored (layer 0 has "
                                     f"no mu input, so they never reach an output)")
                elif n == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # tied: the embedding is the head
                else:
                    with torch.no_grad():
                        params[n].copy_(t)
    if cfg.tie_word_embeddings and "lm_head.weight" in files:
        with safe_open(str(files["lm_head.weight"]), framework="pt") as f:
            head = f.get_tensor("lm_head.weight")
        if not torch.equal(head.to(params["model.embed_tokens.weight"].dtype), params["model.embed_tokens.weight"].data):
            raise ConvertError(f"{files['lm_head.weight']}: lm_head.weight differs from model.embed_tokens.weight but "
                               f"config.json says tie_word_embeddings=true")
    return notes


def from_hf(hf_dir: str | Path, run_dir: str | Path, config: str | None = None,
            overrides: list[str] | None = None, step: int = 0) -> Path:
    from complexity_dist.model import ComplexityForCausalLM
    from complexity_dist.parallel.deepspeed_engine import build_engine
    from complexity_dist.parallel.distributed import init_distributed, world_from_env
    from complexity_dist.parallel.groups import deepspeed_mpu, destroy_groups
    from complexity_dist.train.checkpoint import Checkpointer
    import torch.distributed as dist

    hf_dir = Path(hf_dir)
    raw = read_hf_config(hf_dir)
    model_over = [f"model.{k}={json.dumps(v) if isinstance(v, (list, dict, bool)) else v}"
                  for k, v in model_fields(raw).items()]
    user_model = [o for o in overrides or [] if o.startswith("model.")]
    cfg: Config = load_config(config, [*model_over, *(overrides or []), f"train.run_dir={run_dir}"],
                              world_size=world_from_env()[1])
    for o in user_model:  # the weights fix the sizes: only options the weights do not depend on may change
        k = o.split("=", 1)[0].split(".", 1)[1]
        if k in SIZE_FIELDS and getattr(cfg.model, k) != raw[k]:
            raise ConfigError(f"{o} contradicts {hf_dir / 'config.json'} ({k}={raw[k]})")
    if step < 0 or step > cfg.train.steps:
        raise ConfigError(f"--step {step} must be in [0, train.steps={cfg.train.steps}]")
    checkpointer = Checkpointer(cfg.train.run_dir, cfg.checkpoint.keep_last)
    checkpointer.refuse_overwrite()
    torch.manual_seed(cfg.train.seed)
    model = ComplexityForCausalLM(cfg.model)
    notes = load_hf_weights(hf_dir, cfg.model, model)
    Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
    env = init_distributed(cfg)
    try:
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and env.device.type == "cuda")
        engine = build_engine(model.to(env.device), cfg, env.layout, bf16, mpu=deepspeed_mpu(env.groups))
        # no "loader" state: the trainer starts the data at step * global_batch
        path = checkpointer.save(engine, step, {"tokens_seen": step * cfg.train.global_batch * cfg.data.seq_len,
                                                "skipped_total": 0, "converted_from": str(hf_dir)}, {}, cfg)
    finally:
        if dist.is_initialized():
            destroy_groups()
            dist.destroy_process_group()
    if env.is_main:
        for n in notes:
            print(f"complexity-dist: {n}")
    return path
