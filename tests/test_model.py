"""The model against docs/architecture.md: counts, independent references per piece, gradients, caching, learning."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

import reference
from complexity_dist.config import load_config
from complexity_dist.model import ComplexityForCausalLM, count_parameters
from complexity_dist.model.accounting import flops_per_token, model_counts
from complexity_dist.model.dynamics import INLDynamics
from complexity_dist.model.experts import route


def tiny(**extra):
    return load_config(None, tiny_overrides(**extra))


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Hand-set weights: every parameter (norms and mu included) random, so no term can hide at its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale + (1.0 if "norm" in name else 0.0))
    return model


def test_pretrain_1b_parameter_count(root):
    cfg = load_config(root / "configs/pretrain_1b.yaml")
    counts = model_counts(cfg.model)
    assert counts.total == 1_507_829_248
    assert counts.total + 8_388_608 == 1_516_217_856  # the reference with its dead layer-0 mu weights
    assert abs(counts.active - 0.89e9) < 0.01e9
    assert abs(counts.active_nonembedding - 819e6) < 1e6
    assert abs(flops_per_token(cfg.model, 2048, counts) - 6.5e9) < 0.05e9


def test_info_command_prints_counts(root):
    out = subprocess.run([sys.executable, "-m", "complexity_dist", "info", str(root / "configs/pretrain_1b.yaml")],
                         capture_output=True, text=True, check=True).stdout
    assert "1,507,829,248" in out
    assert "0.885B" in out
    assert "6.52 GFLOP" in out


@pytest.mark.parametrize("preset", ["tiny", "150m", "350m", "pretrain_1b", "3b"])
def test_presets_load(root, preset):
    """Every value a preset file sets is the value the loaded config holds (none ignored or coerced
    into something else), and the preset's layout is valid on one process."""
    import yaml

    path = root / f"configs/{preset}.yaml"
    cfg = load_config(path)
    loaded = cfg.to_dict()
    for section, values in yaml.safe_load(path.read_text()).items():
        for key, value in values.items():
            got = loaded[section][key]
            # YAML reads 3e-3 as a string; the config converts it to the declared type
            want = [float(v) for v in value] if isinstance(got, list) else type(got)(value)
            assert got == want, (preset, section, key, got, value)
    assert cfg.model.vocab_size == 32000 and cfg.model.rope_theta == 10000.0
    cfg.layout(1)


def test_full_model_matches_independent_reference():
    """Attention (GQA grouping, QK-norm, RoPE), dynamics, routing and the mu highway, end to end."""
    cfg = tiny()
    torch.manual_seed(0)
    model = randomized(ComplexityForCausalLM(cfg.model)).double()
    # ids chosen so every expert is the base expert of some token
    ids = torch.tensor([[5, 8, 13, 2, 31, 96, 40, 7, 11, 0, 3, 62]])
    logits = model(ids).logits[0]
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    m = cfg.model
    expected = reference.forward(sd, ids[0], m.num_attention_heads, m.num_key_value_heads, m.num_experts,
                                 m.num_hidden_layers)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)


def test_attention_grouping_and_positions():
    """One attention layer alone: kv head j must serve query heads j*g..j*g+g-1, RoPE uses absolute
    positions, and swapping kv heads changes the output (the grouping is not symmetric by accident)."""
    cfg = tiny()
    model = randomized(ComplexityForCausalLM(cfg.model), seed=3).double()
    attn = model.model.layers[1].self_attn
    n, mu_prev = torch.randn(1, 7, 32, dtype=torch.float64), torch.randn(1, 7, 32, dtype=torch.float64)
    from complexity_dist.model.layers import rope_tables
    cos, sin = rope_tables(8, 0, 7, 10000.0, torch.float64)
    got = attn(n, mu_prev, cos, sin)[0]
    sd = {f"a.{k}": v.detach() for k, v in attn.state_dict().items()}
    want = reference.attention(sd, "a.", n[0], mu_prev[0], 4, 2, list(range(7)))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # the same tokens at positions 5..11 (cache offset) give what the reference computes at those positions
    cos5, sin5 = rope_tables(8, 5, 7, 10000.0, torch.float64)
    torch.testing.assert_close(attn(n, mu_prev, cos5, sin5)[0],
                               reference.attention(sd, "a.", n[0], mu_prev[0], 4, 2, list(range(5, 12))),
                               rtol=1e-9, atol=1e-9)
    swapped = dict(sd)
    kw = sd["a.k_proj.weight"]
    swapped["a.k_proj.weight"] = torch.cat([kw[8:], kw[:8]])
    assert not torch.allclose(reference.attention(swapped, "a.", n[0], mu_prev[0], 4, 2, list(range(7))), want)


def test_dynamics_formula_and_clamps_hold_under_extreme_inputs():
    cfg = tiny()
    dyn = INLDynamics(cfg.model).double()
    randomized(dyn, seed=1)
    with torch.no_grad():
        dyn.controller_out.bias[32:64] = 1e4  # softplus would give 1e4: beta must clamp to 2
    a = torch.randn(5, 32, dtype=torch.float64) * 1e3
    v = torch.randn(5, 32, dtype=torch.float64) * 1e3
    a_next, v_next, mu = dyn(a, v)
    sd = {f"d.{k}": t.detach() for k, t in dyn.state_dict().items()}
    ra, rv, rmu = reference.dynamics(sd, "d.", a, v)
    torch.testing.assert_close(v_next, rv)
    torch.testing.assert_close(a_next, ra)
    torch.testing.assert_close(mu, rmu)
    assert v_next.abs().max() <= 10.0 and (v_next.abs() == 10.0).any()
    assert torch.isfinite(a_next).all()
    # beta is clamped: with v = 0 and a - mu = 1 everywhere, v_next = -beta (before the velocity clamp)
    with torch.no_grad():
        dyn.mu_proj.weight.zero_()
        dyn.mu.zero_()
    _, v_next, _ = dyn(torch.ones(2, 32, dtype=torch.float64), torch.zeros(2, 32, dtype=torch.float64))
    assert torch.all(v_next[:, :] >= -2.0 - 1e-12)
    c = dyn.controller_out(F.silu(dyn.controller_in(torch.cat([torch.ones(2, 32), torch.zeros(2, 32)], -1).double())))
    assert (F.softplus(c[:, 32:64]) > 2.0).all()  # the clamp is what held, not a small softplus


def test_routing_override_needs_margin_above_ten():
    ids = torch.tensor([0, 1, 2, 3, 5])
    logits = torch.zeros(5, 4)
    expert, _ = route(ids, logits, 4, 10.0)
    assert expert.tolist() == [0, 1, 2, 3, 1]  # token_id % E
    # another expert beats the base only when its router logit exceeds the base's by more than 10
    logits[0, 3] = 9.9
    logits[1, 0] = 10.1
    logits[2, 2] = 50.0
    logits[2, 0] = 59.0  # margin 9 over the base's router logit: no flip
    logits[3, 1] = 10.0001
    expert, _ = route(ids, logits, 4, 10.0)
    assert expert.tolist() == [0, 0, 2, 1, 1]


def test_highway_is_carried_between_layers():
    """mu_prev of layer l+1 is mu_l + 0.1 * sum_{k<=l} mu_k: changing the highway scale changes the output,
    and the layer API returns the running sum."""
    cfg = tiny()
    model = randomized(ComplexityForCausalLM(cfg.model), seed=2).double()
    layers = model.model.layers
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4]])
    from complexity_dist.model.layers import rope_tables
    cos, sin = rope_tables(8, 0, 4, 10000.0, torch.float64)
    mus = []
    v = mu_prev = R = None
    for layer in layers:
        a = layer.self_attn(layer.input_layernorm(x), mu_prev, cos, sin)
        _, _, mu = layer.dynamics(a, v)
        mus.append(mu)
        x, v, mu_prev, R = layer(x, v, mu_prev, R, ids, cos, sin)
        torch.testing.assert_close(R, sum(mus))
        torch.testing.assert_close(mu_prev, mu + 0.1 * sum(mus))


@pytest.mark.parametrize("mu_router", ["hard", "straight_through"])
def test_every_parameter_gets_a_gradient(mu_router):
    cfg = load_config(None, ["model.vocab_size=512", "model.mu_router=" + mu_router])  # tiny preset sizes
    torch.manual_seed(0)
    model = ComplexityForCausalLM(cfg.model)
    ids = torch.arange(64).view(2, 32)  # every residue mod E: every expert gets tokens
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    zero = [n for n, p in model.named_parameters() if not torch.any(p.grad != 0)]
    if mu_router == "hard":
        # argmax's derivative is zero: mu_router gets exactly that, and is the only one
        assert zero and all(n.endswith("mlp.mu_router.weight") for n in zero)
        from complexity_dist.parallel.deepspeed_engine import param_groups
        decay, no_decay = param_groups(model, 0.1)
        assert all(any(p is q for q in no_decay["params"]) for n, p in model.named_parameters() if n in zero)
    else:
        assert zero == []


def test_straight_through_forward_equals_hard():
    torch.manual_seed(0)
    hard = ComplexityForCausalLM(tiny().model)
    st = ComplexityForCausalLM(tiny(**{"model.mu_router": "straight_through"}).model)
    st.load_state_dict(hard.state_dict())
    ids = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(st(ids).logits, hard(ids).logits)


def test_cached_decoding_equals_full_forward():
    cfg = tiny()
    torch.manual_seed(0)
    model = randomized(ComplexityForCausalLM(cfg.model), seed=4).double().eval()
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    cache = model.new_cache()
    parts = [model(ids[:, :5], cache=cache).logits]  # a prompt, then one token at a time
    for t in range(5, 12):
        parts.append(model(ids[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    out = model.generate(ids[:, :4], 6)
    assert out.shape == (2, 10)
    torch.testing.assert_close(model(out).logits[:, 3:-1].argmax(-1), out[:, 4:])


def test_tiny_model_overfits_one_batch():
    cfg = load_config(None, ["model.vocab_size=512", "model.num_hidden_layers=2"])
    torch.manual_seed(0)
    model = ComplexityForCausalLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 512, (4, 33))
    losses = []
    for _ in range(60):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_state_dict_keys_follow_the_checkpoint_layout():
    model = ComplexityForCausalLM(tiny().model)
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.mu_to_q.weight" not in keys  # no dead layer-0 mu weights
    for k in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.1.self_attn.mu_to_v.weight", "model.layers.2.dynamics.controller_out.bias",
              "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.mu_router.weight"]:
        assert k in keys
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.state_dict()["model.layers.0.mlp.gate_up_proj"].shape == (4, 32, 24)
    # the tied LM head is the embedding: counted once, though the state dict lists it under two keys
    V, H = 97, 32
    assert count_parameters(model) == sum(t.numel() for t in model.state_dict().values()) - V * H
