"""model.linear_backend=te: the model's dense projections run through Transformer Engine's Linear, and
train.fp8 runs them in FP8 under TE's autocast.

Applied from outside like every layout (complexity_dist/parallel/parallelize.py), after tensor/expert parallel:

    attention q/k/v, mu_to_q/k/v   one te.Linear each, holding the same Parameter (checkpoint names unchanged);
                                   the attention's `project_qkv` seam sums the x and mu halves:
                                   q = q_proj(n) + mu_to_q(mu_prev), and likewise k and v. In bf16 that is two
                                   GEMMs of K=H where the torch backend runs one of K=2H on [n, mu_prev]: the
                                   same FLOPs; TE's Linear holds one weight per module, and one FP8-scaled
                                   module per weight keeps the names and the scaling of each weight its own.
    attention o_proj               te.Linear
    dynamics controller_in/out,    te.Linear (with their biases)
    mu_proj
Under tensor parallel the TE linears are local GEMMs on this rank's shards: the communication stays in the
plan's hooks (complexity_dist/parallel/tensor_parallel.py), which are moved onto the new modules, so sequence
parallel works as with the torch backend. Not swapped: the embedding and the tied lm_head (vocabulary-parallel
code, and FP8 logits cost accuracy for little time), the experts (batched/grouped GEMMs over [E, H, I]
parameters; complexity_dist/model/experts.py), the norms.

TE's Linear saves FP8 scaling state as a pickled `_extra_state` entry; it is left out of the state_dict here,
so checkpoints keep today's names and load without unpickling anything. Consequence: with train.fp8=delayed the
amax history restarts after a resume (a few steps of fresh scaling factors); train.fp8=current has no such
state and resumes exactly.

train.fp8: `none` (bf16 GEMMs through TE), `delayed` (DelayedScaling: scales from an amax history,
reduced over the data-parallel ranks at the end of each forward), `current` (Float8CurrentScaling: scales from
each tensor's own amax). Both use the HYBRID format (E4M3 forward, E5M2 gradients). FP8 GEMMs need every
dimension divisible by 16 (tokens per micro-batch, features).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

FP8_MODES = ("none", "delayed", "current")


def te_problem() -> str | None:
    """Why Transformer Engine cannot run here, or None."""
    if not torch.cuda.is_available():
        return ("Transformer Engine's linears run on CUDA GPUs only and this machine has none "
                "(torch.cuda.is_available() is False); use model.linear_backend=torch")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA/cuDNN library mismatch raised while importing
        return (f"transformer_engine does not import ({type(e).__name__}: {e}); install Transformer Engine "
                f"built for this CUDA and torch, or use model.linear_backend=torch")
    return None


def fp8_problem() -> str | None:
    """Why FP8 GEMMs cannot run on this GPU, or None (called only when TE imports)."""
    import transformer_engine.pytorch as te

    ok, why = te.is_fp8_available(return_reason=True)
    return None if ok else f"this GPU cannot run FP8 GEMMs ({why}); set train.fp8=none"


@functools.cache
def _te_linear_class():
    import transformer_engine.pytorch as te

    class TELinear(te.Linear):
        """te.Linear without its pickled `_extra_state` entry (see the module doc)."""
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

    return TELinear


def te_linear_like(linear: nn.Linear) -> nn.Module:
    """A te.Linear holding `linear`'s own Parameters (same names, same tensors), with its hooks."""
    cls = _te_linear_class()
    weight = linear.weight
    mod = cls(weight.shape[1], weight.shape[0], bias=linear.bias is not None, params_dtype=weight.dtype,
              device=weight.device)
    mod.weight = weight
    if linear.bias is not None:
        mod.bias = linear.bias
    # forward hooks of a layout (tensor-parallel reduce on o_proj) belong to the projection, not its class
    mod._forward_pre_hooks.update(linear._forward_pre_hooks)
    mod._forward_hooks.update(linear._forward_hooks)
    mod._forward_hooks_with_kwargs.update(linear._forward_hooks_with_kwargs)
    mod._forward_pre_hooks_with_kwargs.update(linear._forward_pre_hooks_with_kwargs)
    mod.tp_parallel = getattr(linear, "tp_parallel", "replicated")
    return mod


def _summed_qkv(attn: nn.Module):
    def project_qkv(n: torch.Tensor, mu_prev: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        # under TP, n and mu_prev arrive as the two halves of one gathered [n, mu_prev] tensor
        # (complexity_dist/parallel/tensor_parallel.py): strided views, which TE's GEMMs do not take
        n = n.contiguous()
        mu_prev = None if mu_prev is None else mu_prev.contiguous()
        q, k, v = attn.q_proj(n), attn.k_proj(n), attn.v_proj(n)
        if mu_prev is None:
            return q, k, v
        return q + attn.mu_to_q(mu_prev), k + attn.mu_to_k(mu_prev), v + attn.mu_to_v(mu_prev)
    return project_qkv


def apply_te_linears(model: nn.Module) -> nn.Module:
    """Swap the dense projections of a ComplexityForCausalLM (already laid out) for TE linears, in place."""
    for layer in model.model.layers:
        attn = layer.self_attn
        names = ["q_proj", "k_proj", "v_proj", "o_proj"]
        if attn.has_mu:
            names += ["mu_to_q", "mu_to_k", "mu_to_v"]
        for name in names:
            setattr(attn, name, te_linear_like(getattr(attn, name)))
        attn.project_qkv = _summed_qkv(attn)
        dyn = layer.dynamics
        for name in ("controller_in", "controller_out", "mu_proj"):
            setattr(dyn, name, te_linear_like(getattr(dyn, name)))
    model.linear_backend = "te"
    return model


def fp8_recipe(mode: str):
    from transformer_engine.common import recipe

    if mode == "delayed":
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=1024,
                                     amax_compute_algo="max")
    if mode == "current":
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
    raise ValueError(f"train.fp8={mode!r}, expected one of {FP8_MODES}")


def enable_fp8(model: nn.Module, mode: str, amax_group=None) -> None:
    """Run the decoder stack (every TE linear) under TE's FP8 autocast. The lm_head and the loss stay outside,
    in bf16/fp32. `amax_group`: the ranks whose amaxes a delayed-scaling recipe reduces (data parallel and
    tensor parallel: every rank that holds the same weights sees part of the activations)."""
    import transformer_engine.pytorch as te

    recipe = fp8_recipe(mode)
    decoder = model.model
    inner = decoder.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with te.autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_group):
            return inner(*args, **kwargs)
    decoder.forward = forward
    model.fp8 = mode
