"""The math of docs/architecture.md, written once. Nothing here imports torch.distributed: parallelism is
applied from outside (complexity_dist.parallel) by swapping the projections the factory builds."""

from complexity_dist.model.model import ComplexityForCausalLM, KVCache, count_parameters

__all__ = ["ComplexityForCausalLM", "KVCache", "count_parameters"]
