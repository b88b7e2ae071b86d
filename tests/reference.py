"""An independent, loop-by-loop reading of docs/architecture.md ("One layer") over a state_dict with its checkpoint names.
Deliberately naive (per head, per token), sharing no code with complexity_dist.model."""
from __future__ import annotations

import math

import torch


def rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, theta=10000.0):
    """x: [S, d] for one head, NeoX rotate-half."""
    d = x.shape[-1]
    out = torch.empty_like(x)
    for s in range(x.shape[0]):
        for i in range(d // 2):
            ang = pos[s] * theta ** (-2 * i / d)
            c, si = math.cos(ang), math.sin(ang)
            a, b = x[s, i], x[s, i + d // 2]
            out[s, i] = a * c - b * si
            out[s, i + d // 2] = b * c + a * si
    return out


def attention(sd, p, n, mu_prev, nh, nkv, pos):
    S, H = n.shape
    d = H // nh
    q = n @ sd[p + "q_proj.weight"].T
    k = n @ sd[p + "k_proj.weight"].T
    v = n @ sd[p + "v_proj.weight"].T
    if mu_prev is not None:
        q = q + mu_prev @ sd[p + "mu_to_q.weight"].T
        k = k + mu_prev @ sd[p + "mu_to_k.weight"].T
        v = v + mu_prev @ sd[p + "mu_to_v.weight"].T
    g = nh // nkv
    heads = []
    for h in range(nh):
        j = h // g  # kv head j serves query heads j*g .. j*g+g-1
        qh = rope(rms(q[:, h * d:(h + 1) * d], sd[p + "q_norm.weight"]), pos)
        kh = rope(rms(k[:, j * d:(j + 1) * d], sd[p + "k_norm.weight"]), pos)
        vh = v[:, j * d:(j + 1) * d]
        scores = qh @ kh.T / math.sqrt(d)
        causal = torch.tensor([[pos[t] <= pos[s] for t in range(S)] for s in range(S)])
        scores = scores.masked_fill(~causal, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ vh)
    return torch.cat(heads, -1) @ sd[p + "o_proj.weight"].T


def dynamics(sd, p, a, v, dt=0.1):
    H = a.shape[-1]
    hid = torch.cat([a, v], -1) @ sd[p + "controller_in.weight"].T + sd[p + "controller_in.bias"]
    c = (hid * torch.sigmoid(hid)) @ sd[p + "controller_out.weight"].T + sd[p + "controller_out.bias"]
    alpha = torch.sigmoid(c[..., :H])
    beta = torch.minimum(torch.log1p(torch.exp(c[..., H:2 * H])), torch.tensor(2.0))
    gate = torch.sigmoid(c[..., 2 * H:])
    mu = sd[p + "mu"] + a @ sd[p + "mu_proj.weight"].T
    v_next = torch.clamp(alpha * v - beta * (a - mu), -10.0, 10.0)
    return a + dt * gate * v_next, v_next, mu


def moe(sd, p, m, ids, mu, E):
    out = torch.zeros_like(m)
    router = mu @ sd[p + "mu_router.weight"].T
    I2 = sd[p + "gate_up_proj"].shape[-1]
    for t in range(m.shape[0]):
        logits = router[t].clone()
        logits[int(ids[t]) % E] += 10.0
        e = int(torch.argmax(logits))
        gu = m[t] @ sd[p + "gate_up_proj"][e]
        g, u = gu[: I2 // 2], gu[I2 // 2:]
        out[t] = (g * torch.sigmoid(g) * u) @ sd[p + "down_proj"][e]
    return out


def forward(sd, ids, nh, nkv, E, L):
    """ids: [S] -> logits [S, V], one sequence."""
    pos = list(range(ids.shape[0]))
    x = sd["model.embed_tokens.weight"][ids]
    v = torch.zeros_like(x)
    mu_prev, R = None, torch.zeros_like(x)
    for layer in range(L):
        p = f"model.layers.{layer}."
        a = attention(sd, p + "self_attn.", rms(x, sd[p + "input_layernorm.weight"]), mu_prev, nh, nkv, pos)
        a_next, v, mu = dynamics(sd, p + "dynamics.", a, v)
        x = x + a_next
        x = x + moe(sd, p + "mlp.", rms(x, sd[p + "post_attention_layernorm.weight"]), ids, mu, E)
        R = R + mu
        mu_prev = mu + 0.1 * R
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T
