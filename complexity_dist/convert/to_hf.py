"""Training checkpoint -> Hugging Face directory, tensor by tensor.

The shards are planned from the config before any tensor is read (every shape is known), so each
safetensors file is written header first and then tensor by tensor in file order: memory stays at the
reader's batch (1 GiB of fp32 by default) plus one tensor, whatever --shard-size and the model size.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from complexity_dist.config import ModelConfig
from complexity_dist.convert.keys import MODEL_TYPE, ConvertError, Key, buffer_value, hf_keys, source_name
from complexity_dist.convert.reader import CheckpointReader, find_checkpoint, model_config_of

HF_FILES = Path(__file__).parent / "hf_files"
DTYPES = {"fp32": (torch.float32, "F32", "float32"), "bf16": (torch.bfloat16, "BF16", "bfloat16")}
ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
INDEX = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.I)
    if not m:
        raise ConvertError(f"--shard-size {text!r} is not a size (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def key_dtype(key: Key, dtype: torch.dtype) -> torch.dtype:
    if key.name.endswith("token_to_expert"):
        return torch.int64
    if key.name.endswith("inv_freq"):
        return torch.float32
    return dtype


def plan_shards(keys: list[Key], dtype: torch.dtype, shard_bytes: int) -> list[list[Key]]:
    shards: list[list[Key]] = [[]]
    size = 0
    for k in keys:
        n = torch.Size(k.shape).numel() * key_dtype(k, dtype).itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def hf_config(cfg: ModelConfig, dtype_name: str) -> dict:
    m = dataclasses.asdict(cfg)
    for drop in ("linear_backend", "kernels", "mu_router"):
        m.pop(drop)
    return {"architectures": ["ComplexityForCausalLM"], "model_type": MODEL_TYPE,
            "auto_map": {"AutoConfig": "configuration_complexity.ComplexityConfig",
                         "AutoModelForCausalLM": "modeling_complexity.ComplexityForCausalLM"},
            "torch_dtype": dtype_name, **m, "use_cache": True}


def _write_shard(path: Path, keys: list[Key], tensors, dtype: torch.dtype) -> None:
    header, offset = {}, 0
    for k in keys:
        dt = key_dtype(k, dtype)
        n = torch.Size(k.shape).numel() * dt.itemsize
        header[k.name] = {"dtype": ST_DTYPE[dt], "shape": list(k.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in keys:
            name, t = next(tensors)
            assert name == k.name, (name, k.name)
            if tuple(t.shape) != k.shape:
                raise ConvertError(f"{name} has shape {tuple(t.shape)} in the checkpoint; the config says {k.shape}")
            f.write(t.to(key_dtype(k, dtype)).contiguous().view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_hf(cfg: ModelConfig, tensors_for, out_dir: Path, dtype_name: str, shard_bytes: int,
             tokenizer: Path | None) -> None:
    """`tensors_for(keys)` yields (name, tensor) for the trained keys in order. Written to a temporary folder
    and renamed at the end."""
    dtype = DTYPES[dtype_name][0]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConvertError(f"{out_dir} exists and is not empty; name a new folder")
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keys = hf_keys(cfg)
    shards = plan_shards(keys, dtype, shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    def stream():
        trained = [k for k in keys if k.trained]
        it = tensors_for(trained)
        for k in keys:
            yield (k.name, next(it)[1]) if k.trained else (k.name, buffer_value(cfg, k))
    tensors = stream()
    try:
        for name, shard in zip(names, shards):
            _write_shard(tmp / name, shard, tensors, dtype)
        if len(shards) > 1:
            total = sum(torch.Size(k.shape).numel() * key_dtype(k, dtype).itemsize for k in keys)
            index = {"metadata": {"total_size": total},
                     "weight_map": {k.name: n for n, s in zip(names, shards) for k in s}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, DTYPES[dtype_name][2]), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
             "do_sample": False, "max_length": cfg.max_position_embeddings}, indent=2))
        for f in ("configuration_complexity.py", "modeling_complexity.py"):
            shutil.copyfile(HF_FILES / f, tmp / f)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>",
                 "bos_token": "<s>", "model_max_length": cfg.max_position_embeddings}, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_tokenizer(saved_config: dict) -> Path | None:
    """The tokenizer.json of the run's data (data.path, or the embedded corpus it was prepared into)."""
    from complexity_dist.config import config_from_dict
    from complexity_dist.data.shards import ShardIndex

    path = saved_config.get("data", {}).get("path", "")
    try:
        if not path:
            from complexity_dist.data.embedded import embedded_corpus_dir
            from complexity_dist.train.trainer import data_cache_root, embedded_vocab_size
            cfg = config_from_dict(saved_config)
            path = embedded_corpus_dir(data_cache_root(), cfg.data.seq_len, embedded_vocab_size(cfg))
        return ShardIndex.load(path).tokenizer_path
    except Exception as e:  # the data moved: the weights are still worth exporting
        print(f"complexity-dist: no tokenizer written (the run's data {path or 'embedded corpus'} is not "
              f"readable: {e})")
        return None


def to_hf(source: str | Path, out_dir: str | Path, dtype: str = "fp32", shard_size: str = "5GB",
          budget: int | None = None) -> Path:
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose bf16 or fp32")
    shard_bytes = parse_size(shard_size)
    saved = find_checkpoint(source)
    cfg = model_config_of(saved)
    reader = CheckpointReader(saved, **({"budget": budget} if budget else {}))
    for k in hf_keys(cfg):  # a checkpoint of another model fails here, before anything is written
        if k.trained and tuple(reader.shape(source_name(cfg, k.name))) != k.shape:
            raise ConvertError(f"{saved.path}: {source_name(cfg, k.name)} has shape "
                               f"{tuple(reader.shape(source_name(cfg, k.name)))}, its config.json says {k.shape}")
    tokenizer = run_tokenizer(saved.config)
    write_hf(cfg, lambda keys: reader.read(source_name(cfg, k.name) for k in keys), Path(out_dir), dtype,
             shard_bytes, tokenizer)
    return Path(out_dir)
