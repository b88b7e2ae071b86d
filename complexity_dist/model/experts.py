"""Token-routed mixture of SwiGLU experts (docs/architecture.md, "One layer", step 5).

Routing is deterministic: expert = token_id % E, unless mu_router's logit for another expert beats the
base expert's bonus of `router_base_margin` (10). Tokens are grouped by expert and each expert runs one
GEMM over its group, so no per-token weight is ever gathered and every expert weight gets its gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from complexity_dist.config import ModelConfig
from complexity_dist.model.layers import make_linear, zero_grad_to


def route(token_ids: torch.Tensor, router_logits: torch.Tensor, num_experts: int, margin: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (expert index per token, full routing logits). Shapes: ids [...], logits [..., E]."""
    base = torch.remainder(token_ids, num_experts)
    logits = margin * F.one_hot(base, num_experts).to(router_logits.dtype) + router_logits
    return logits.argmax(dim=-1), logits


# The grouped kernel's needs (torch._grouped_mm, aten GroupedBlas / GroupMMCommon): bf16 operands on sm90 or
# sm100 (elsewhere torch runs a per-group loop that copies the offsets to the host), rows of every operand
# 16-byte aligned (H and I multiples of 8 bf16 values) and fewer than 1024 groups.
_GROUPED_ALIGN = 8


@torch.compiler.assume_constant_result
def _has_grouped_kernel(device_index: int) -> bool:
    """Whether torch's CUTLASS grouped GEMM serves this GPU (sm90/sm100). Read once per compile, not per step."""
    return torch.cuda.get_device_capability(device_index)[0] in (9, 10)


def _row_aligned(w: torch.Tensor) -> bool:
    rows_ok = w.stride(-1) == 1 and w.stride(-2) % _GROUPED_ALIGN == 0
    if torch.compiler.is_compiling():
        # dynamo cannot trace storage_offset(); inductor copies misaligned graph inputs itself
        return rows_ok
    return rows_ok and w.storage_offset() % _GROUPED_ALIGN == 0


def use_grouped_kernel(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Chosen from device, dtypes and static shapes only, so the choice needs no host sync and guards nothing
    that changes from step to step."""
    E, H, two_i = gate_up.shape
    return (x.is_cuda and x.dim() == 2 and x.shape[0] > 0
            and x.dtype == gate_up.dtype == down.dtype == torch.bfloat16
            and H % _GROUPED_ALIGN == 0 and (two_i // 2) % _GROUPED_ALIGN == 0 and E < 1024
            and _has_grouped_kernel(x.device.index or 0))


class _GatherRows(torch.autograd.Function):
    """out[i] = rows[index[i]], or 0 where `keep` (if given) is False. `index` maps the kept rows of the output
    one to one onto rows of the input, and (adjoint, adjoint_keep) is the same map the other way round, so the
    backward is a gather too: no index_copy/index_add (scatter) kernel in either direction."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, keep: torch.Tensor | None,
                adjoint: torch.Tensor, adjoint_keep: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(adjoint, adjoint_keep)
        return _gather_rows(rows, index, keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        adjoint, adjoint_keep = ctx.saved_tensors
        return _gather_rows(grad, adjoint, adjoint_keep), None, None, None, None


def _gather_rows(rows: torch.Tensor, index: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    out = rows.index_select(0, index)
    return out if keep is None else torch.where(keep.unsqueeze(1), out, 0)


def padded_rows(tokens: int, num_experts: int, row_align: int) -> int:
    """Rows of the grouped layout when every expert's group starts on a multiple of `row_align`: a bound
    known from shapes alone (each group wastes fewer than row_align rows)."""
    if row_align == 1:
        return tokens
    return -(-(tokens + (row_align - 1) * num_experts) // row_align) * row_align


def row_plan(expert: torch.Tensor, num_experts: int, row_align: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Where each token goes for the grouped GEMMs: sorted by expert, expert e's group in rows
    offs[e-1]..offs[e] (empty groups repeat an offset), each group starting on a multiple of `row_align`
    (the rows in between are zero; the last group also takes the spare rows at the end, so every row belongs
    to a group). Device tensors only, no host sync. Returns (token of each row [R], whether a row holds a
    token [R] or None when row_align is 1, row of each token [T], int32 group ends [E])."""
    T, device = expert.shape[0], expert.device
    sorted_expert, order = torch.sort(expert, stable=True)
    # end of each expert's group = number of tokens routed to an expert <= e
    ends = torch.searchsorted(sorted_expert, torch.arange(num_experts, device=device, dtype=sorted_expert.dtype),
                              right=True)
    positions = torch.arange(T, device=device)
    if row_align == 1:
        return order, None, torch.empty_like(order).scatter_(0, order, positions), ends.to(torch.int32)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + row_align - 1) // row_align * row_align
    padded_ends = padded.cumsum(0)
    padded_starts, starts = padded_ends - padded, ends - counts
    R = padded_rows(T, num_experts, row_align)
    # sorted token i (expert e) moves from its unpadded place to the same place in e's padded group
    token_row = torch.empty_like(order).scatter_(0, order, positions + (padded_starts - starts)[sorted_expert])
    # and back by gathers only (no scatter into a zeroed buffer that the same graph reads back): row r of group e
    # holds sorted token starts[e] + (r - padded_starts[e]) while that place is within e's count; the spare rows
    # past the last group count as the last expert's, and are empty.
    rows = torch.arange(R, device=device)
    row_group = torch.searchsorted(padded_ends, rows, right=True).clamp_(max=num_experts - 1)
    place = rows - padded_starts[row_group]
    row_keep = place < counts[row_group]
    sorted_index = torch.where(row_keep, starts[row_group] + place, T)  # T: the appended 0, a row not kept
    row_token = torch.cat([order, order.new_zeros(1)]).index_select(0, sorted_index)
    offs = torch.cat([padded_ends[:-1], padded_ends.new_full((1,), R)]).to(torch.int32)
    return row_token, row_keep, token_row, offs


@torch.library.custom_op("complexity_dist::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward(rows: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of out = _grouped_mm(rows [T, K], weight [E, K, N], offs): (d rows [T, K], d weight [E, K, N]).
    An opaque op on purpose: compiled, torch's own backward let inductor lay out a recomputed `rows`
    (train.activation_checkpointing=selective) already transposed, as [K, T] with T contiguous; the kernel then
    needs every group's token count to be a multiple of 8 and asserts on the device. Here the token dimension
    is never the contiguous one, whatever layout the caller hands in (contiguous() is free when it is)."""
    rows, grad = rows.contiguous(), grad.contiguous()
    return (torch._grouped_mm(grad, weight.transpose(-2, -1), offs=offs),
            torch._grouped_mm(rows.t(), grad, offs=offs))


@_grouped_mm_backward.register_fake
def _(rows, weight, grad, offs):
    return rows.new_empty(rows.shape), weight.new_empty(weight.shape)


class _GroupedGemm(torch.autograd.Function):
    """torch._grouped_mm(rows, weight, offs) with the backward above. The forward stays the aten op, so the
    selective checkpointing policy (complexity_dist/model/checkpointing.py) keeps its output."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows, weight, offs)
        return torch._grouped_mm(rows, weight, offs=offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, weight, offs = ctx.saved_tensors
        return *_grouped_mm_backward(rows, weight, grad, offs), None


def grouped_gemm_experts(x: torch.Tensor, expert: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                         gemm=_GroupedGemm.apply, row_align: int = 1) -> torch.Tensor:
    """One sort, then one grouped GEMM per projection; group ends stay on the device (int32 offsets).
    `gemm(rows [R, K], weight [E, K, N], offs) -> [R, N]` and the groups' row alignment are what the FP8 path
    (complexity_dist/parallel/fp8.py) changes."""
    # a view with a misaligned start (e.g. inside a flat ZeRO buffer) would break the kernel's TMA loads
    gate_up = gate_up if _row_aligned(gate_up) else gate_up.clone(memory_format=torch.contiguous_format)
    down = down if _row_aligned(down) else down.clone(memory_format=torch.contiguous_format)
    row_token, row_keep, token_row, offs = row_plan(expert, gate_up.shape[0], row_align)
    rows = _GatherRows.apply(x, row_token, row_keep, token_row, None)
    gate, up = gemm(rows, gate_up, offs).chunk(2, dim=-1)
    out_rows = gemm(F.silu(gate) * up, down, offs)
    return _GatherRows.apply(out_rows, token_row, None, row_token, row_keep)


def _padded_block_experts(x: torch.Tensor, expert: torch.Tensor, gate_up: torch.Tensor,
                          down: torch.Tensor) -> torch.Tensor:
    """Pure torch, any device and dtype, no host sync: each expert's tokens fill whole blocks of B = ceil(T/E)
    rows (the last one zero-padded), at most ceil(T/B) + E blocks in all (a bound known from shapes), and
    one bmm per projection multiplies every block by its expert's weights. Costs at most ~2x the exact
    FLOPs; padding rows are zero, so they add nothing to any output or gradient."""
    T, H = x.shape
    E = gate_up.shape[0]
    B = max(1, -(-T // E))
    n_blocks = -(-T // B) + E
    one_hot = (expert.unsqueeze(1) == torch.arange(E, device=x.device)).long()       # [T, E]
    counts = one_hot.sum(0)
    rank = (one_hot.cumsum(0) - 1).gather(1, expert.unsqueeze(1)).squeeze(1)         # place within its expert
    expert_blocks = (counts + B - 1) // B
    block_end = expert_blocks.cumsum(0)
    row = ((block_end - expert_blocks) * B)[expert] + rank                           # padded row of each token
    source = torch.full((n_blocks * B,), T, dtype=row.dtype, device=x.device)
    source = source.scatter(0, row, torch.arange(T, dtype=row.dtype, device=x.device))  # T: the zero row
    blocks = torch.cat([x, x.new_zeros(1, H)]).index_select(0, source).view(n_blocks, B, H)
    block_expert = torch.searchsorted(block_end, torch.arange(n_blocks, device=x.device, dtype=block_end.dtype),
                                      right=True).clamp_(max=E - 1)                  # spare blocks: any expert
    gate, up = torch.bmm(blocks, gate_up.index_select(0, block_expert)).chunk(2, dim=-1)
    out = torch.bmm(F.silu(gate) * up, down.index_select(0, block_expert))
    return out.view(n_blocks * B, H).index_select(0, row)


def grouped_expert_forward(x: torch.Tensor, expert: torch.Tensor, gate_up: torch.Tensor,
                           down: torch.Tensor) -> torch.Tensor:
    """x: [T, H], expert: [T] -> [T, H]. gate_up: [E, H, 2I] (gate half first), down: [E, I, H].
    No host sync and no data-dependent Python control flow on either path, so torch.compile traces it once
    (fullgraph) whatever the routing. bf16 on sm90/sm100 with aligned H and I: torch's grouped GEMM;
    otherwise (CPU, fp32, other GPUs, odd sizes) padded per-expert blocks through bmm."""
    if use_grouped_kernel(x, gate_up, down):
        return grouped_gemm_experts(x, expert, gate_up, down)
    return _padded_block_experts(x, expert, gate_up, down)


class TokenRoutedMLP(nn.Module):
    # the grouped expert computation (x [T, H], expert [T], gate_up, down) -> [T, H]; FP8 replaces it on the
    # instance (complexity_dist/parallel/fp8.py), under every layout
    expert_forward = staticmethod(grouped_expert_forward)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        self.num_experts = E
        self.margin = cfg.router_base_margin
        self.straight_through = cfg.mu_router == "straight_through"
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))
        self.mu_router = make_linear(H, E)
        # hard routing: argmax gives mu_router an exact zero gradient (forward below); without decay it stays
        # as initialised (read by complexity_dist/parallel/deepspeed_engine.py)
        self.mu_router.weight.no_weight_decay = not self.straight_through
        # share of tokens the mu override sent away from token_id % E in the last forward (a metric,
        # read by complexity_dist.parallel.expert_parallel.routed_override_fraction); a tensor, no host sync
        self.routed_override_frac: torch.Tensor | None = None

    def compute_experts(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """x: [T, H] tokens, expert: [T] their routed expert -> [T, H]. The seam where a parallel layout
        plugs in (complexity_dist.parallel wraps or replaces it on the instance: tensor parallel reduces the
        partial sums of sharded experts, expert parallel sends tokens to the rank that holds their expert)."""
        return self.expert_forward(x, expert, self.gate_up_proj, self.down_proj)

    def forward(self, m: torch.Tensor, token_ids: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        shape = m.shape
        expert, logits = route(token_ids, self.mu_router(mu), self.num_experts, self.margin)
        self.routed_override_frac = (expert != torch.remainder(token_ids, self.num_experts)).float().mean().detach()
        out = self.compute_experts(m.reshape(-1, shape[-1]), expert.reshape(-1)).view(shape)
        if self.straight_through:
            # forward unchanged (factor is exactly 1); backward carries d p_e / d logits to mu_router
            p = torch.softmax(logits.float(), dim=-1).gather(-1, expert.unsqueeze(-1))
            out = out * (p / p.detach()).to(out.dtype)
        else:
            # argmax's derivative is zero, so mu_router's true gradient is zero: stated explicitly rather than
            # left undefined, because a compiled layer's backward runs the gradient hooks of a parameter that
            # got none with None, which DeepSpeed's ZeRO 2/3 hooks and tensor parallel's reduction cannot take.
            # It stays as initialised: AdamW moves nothing on zero gradients and zero moments, and it is
            # marked no_weight_decay (__init__)
            out = zero_grad_to(out, self.mu_router.weight)
        return out
