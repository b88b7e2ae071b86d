"""Fused lm_head + cross-entropy: loss = CE(hidden @ weight^T, targets), mean over targets != ignore_index.

`linear_cross_entropy_torch` is the math the model runs with model.kernels=torch (lm_head, then loss_fn:
full [tokens, vocab] logits, upcast to fp32). `fused_linear_cross_entropy` computes the same in chunks of
`chunk_size` tokens, so only one chunk's logits ever exist: per chunk the logits GEMM (in the input dtype, as
lm_head), then softmax / loss / gradient of the logits written in place over the logits buffer (a Triton
kernel with an online log-sum-exp over vocabulary blocks where Triton runs, else torch in the compute
dtype), then the gradient GEMMs for the hidden chunk and the weight (accumulated in fp32). All of it in the
forward pass: the backward only scales the stored gradients by grad_output. The loss is fp32 for bf16/fp32
inputs (the compute dtype, as loss_fn).

Rounding matches the unfused path: the logits are rounded to the input dtype before the fp32 softmax, and the
gradient of the logits is rounded to the input dtype before its GEMMs, exactly where autograd of
`linear_cross_entropy_torch` rounds them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from complexity_dist.kernels import compute_dtype, triton_runs_on

IGNORE_INDEX = -100
# 4096 tokens x 32000 vocab in bf16 is 262 MB of logits (plus the same again as fp32 temporaries in the
# torch chunk path): a GEMM still large enough to run at full rate
DEFAULT_CHUNK = 4096


def linear_cross_entropy_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    logits = logits.to(compute_dtype(logits.dtype))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_size: int | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """hidden [..., H], weight [V, H], targets [...] (same leading shape). `chunk_size` None: DEFAULT_CHUNK
    tokens; `use_triton` None: where Triton runs on these tensors."""
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if use_triton is None:
        use_triton = triton_runs_on(hidden)
    # evaluation (no_grad) skips the gradient GEMMs: inside forward, needs_input_grad cannot tell
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedLinearCE.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                chunk_size, use_triton, grads)


def chunk_loss_and_grad_torch(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Sum of the chunk's token losses (compute dtype); overwrites `logits` [c, V] with d(mean loss)/d(logits)
    = (softmax - onehot) * scale on rows with a target, 0 on ignored rows."""
    lf = logits.to(compute_dtype(logits.dtype))
    valid = targets != IGNORE_INDEX
    tgt = torch.where(valid, targets, 0).unsqueeze(1)
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)
    loss = torch.where(valid, (lse - lf.gather(1, tgt)).squeeze(1), 0.0).sum()
    grad = torch.exp(lf - lse)
    grad.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=grad.dtype))
    grad.mul_(torch.where(valid, scale, 0.0).unsqueeze(1))
    logits.copy_(grad)
    return loss


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, use_triton, grads):
        N, H = hidden.shape
        acc = compute_dtype(hidden.dtype)
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum().to(acc)
        scale = (1.0 / n_valid).reshape(1)  # a tensor: no host sync; 0 targets -> loss 0/0 = nan, as F.cross_entropy
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        if use_triton:
            from complexity_dist.kernels import _triton_ce
        for start in range(0, N, chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            logits = h @ weight.t()  # [c, V], overwritten by its gradient below
            if use_triton:
                loss_sum += _triton_ce.chunk_loss_and_grad(logits, t, scale, IGNORE_INDEX)
            else:
                loss_sum += chunk_loss_and_grad_torch(logits, t, scale)
            if need_h:
                torch.mm(logits, weight, out=grad_hidden[start:start + chunk_size])
            if need_w:
                if logits.dtype == acc:
                    grad_weight.addmm_(logits.t(), h)
                else:
                    grad_weight += (logits.t() @ h).to(acc)
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_out.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_out).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None
