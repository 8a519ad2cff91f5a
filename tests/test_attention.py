"""Every attention variant against an independent explicit-softmax computation: outputs, gates, gradients.

The independent side builds the full attention matrix itself (softmax over masked scores, with an extra
logit column for the sink) and reads the gate off it, so it shares no attention code with model/gpt.py.
"""

import copy
import math

import pytest
import torch

from model.attention import VARIANTS, reference_attention
from model.gpt import GPT, QK_NORMS, CausalSelfAttention, GPTConfig, apply_rotary, rotary_tables

B, T, C, H = 2, 12, 32, 4
D = C // H
ALL = [(attention, qk_norm) for attention in VARIANTS for qk_norm in QK_NORMS]


def make_layer(attention: str, backend: str = "reference", seed: int = 0, qk_norm: str = "rms"):
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=64, n_layer=1, n_embd=C, n_head=H, seq_len=T, attention=attention, backend=backend, qk_norm=qk_norm
    )
    layer = CausalSelfAttention(cfg)
    for p in layer.parameters():  # random everything, incl. sink logits, gate weights and q/k norm gains
        torch.nn.init.normal_(p, std=0.5)
    return layer


def explicit_qk_norm(layer: CausalSelfAttention, name: str, x):
    """x / rms(x), times the layer's gain for rms_gain; x itself for none."""
    if layer.cfg.qk_norm == "none":
        return x
    x = x / x.square().mean(-1, keepdim=True).sqrt()
    return x * getattr(layer, name).weight if layer.cfg.qk_norm == "rms_gain" else x


def explicit_attention(layer: CausalSelfAttention, x, cos, sin):
    """(output (B,T,C), gate (B,H,T)) from the full attention matrix, written out independently."""
    cfg = layer.cfg
    q, k, v = (p(x).view(B, T, H, D).transpose(1, 2) for p in (layer.c_q, layer.c_k, layer.c_v))
    q = apply_rotary(explicit_qk_norm(layer, "q_norm", q), cos[:T], sin[:T])
    k = apply_rotary(explicit_qk_norm(layer, "k_norm", k), cos[:T], sin[:T])
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    if cfg.attention == "sink":
        # Sink attention = softmax with one more logit column b_h that has no value vector.
        extra = layer.sink_logit.view(1, H, 1, 1).expand(B, H, T, 1)
        probs = torch.softmax(torch.cat([scores, extra], dim=-1), dim=-1)
        out, gate = probs[..., :T] @ v, 1 - probs[..., T]
    else:
        probs = torch.softmax(scores, dim=-1)
        out = probs @ v
        if cfg.attention == "vanilla":
            gate = 1 - probs[..., 0]  # the attention not spent on the sink token
        elif cfg.attention == "gated":
            gate = torch.sigmoid(layer.gate_proj(x)).transpose(1, 2)
            out = out * gate.unsqueeze(-1)
        else:
            pytest.fail(f"attention={cfg.attention}: write its gate here, independently of model/attention.py")
    return layer.c_proj(out.transpose(1, 2).reshape(B, T, C)), gate


def outputs_and_grads(fn, layer, x):
    """Run fn, backprop a fixed random functional of (output, gate), return values and all gradients."""
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out, gate = fn(x)
    g = torch.Generator().manual_seed(1)
    w_out, w_gate = (torch.randn(t.shape, generator=g).to(t) for t in (out, gate))
    loss = (out * w_out).sum() + (gate * w_gate).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return out.detach(), gate.detach(), x.grad, grads


def named(ours, theirs):
    """(name, ours, theirs) over everything outputs_and_grads returns."""
    assert ours[3].keys() == theirs[3].keys()
    yield from zip(("output", "gate", "input gradient"), ours[:3], theirs[:3], strict=True)
    for name in ours[3]:
        yield f"gradient of {name}", ours[3][name], theirs[3][name]


def assert_same_outputs_and_grads(ours, theirs):
    """Two outputs_and_grads results agree: output, gate, input gradient and every parameter's gradient."""
    for name, mine, other in named(ours, theirs):
        torch.testing.assert_close(mine, other, msg=name)


@pytest.mark.parametrize("attention, qk_norm", ALL)
def test_reference_backend_matches_explicit_softmax(attention, qk_norm):
    layer = make_layer(attention, qk_norm=qk_norm).double()
    cos, sin = (t.double() for t in rotary_tables(T, D, 10000.0))
    x = torch.randn(B, T, C, dtype=torch.float64)
    ours = outputs_and_grads(lambda x: layer(x, cos, sin), layer, x)
    theirs = outputs_and_grads(lambda x: explicit_attention(layer, x, cos, sin), layer, x)
    assert_same_outputs_and_grads(ours, theirs)
    own = [*VARIANTS[attention].parameters, *(("q_norm", "k_norm") if qk_norm == "rms_gain" else ())]
    for module in own:  # gradients reach the gate's own parameters and the q/k gains
        gradient = torch.cat([g.flatten() for name, g in ours[3].items() if name.split(".")[0] == module])
        assert gradient.abs().sum() > 0, module


@pytest.mark.parametrize("qk_norm", QK_NORMS)
def test_rotated_qk_rebuilds_the_attention_on_the_sink(qk_norm):
    """Evaluation recomputes explicit attention probabilities from rotated_qk: their column 0 is 1 - the vanilla gate
    the forward pass returns, so rotated_qk gives exactly the q and k that forward attends with."""
    layer = make_layer("vanilla", qk_norm=qk_norm).double()
    cos, sin = (t.double() for t in rotary_tables(T, D, 10000.0))
    x = torch.randn(B, T, C, dtype=torch.float64)
    q, k = layer.rotated_qk(x, cos, sin)
    assert q.shape == k.shape == (B, H, T, D)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    _, gate = layer(x, cos, sin)
    torch.testing.assert_close(1 - torch.softmax(scores, -1)[..., 0], gate)


def test_qk_norm_gain_starts_at_one_and_gets_no_weight_decay():
    from model.lit import SinkAwareLM

    model = dict(vocab_size=64, n_layer=2, n_embd=C, n_head=H, seq_len=T, attention="sink", qk_norm="rms_gain")
    optim = dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.5, warmup_steps=1, decay="none", min_lr_ratio=1)
    module = SinkAwareLM(model=model, optim=optim, aux={"lambda": 0.0, "scope": "local"})
    gains = {n: p for n, p in module.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))}
    assert len(gains) == 2 * 2 and all(torch.equal(p, torch.ones(D)) for p in gains.values())
    decayed, not_decayed = module.param_groups(0.5)
    assert decayed["weight_decay"] == 0.5 and not_decayed["weight_decay"] == 0.0
    assert all(any(p is q for q in not_decayed["params"]) for p in gains.values())
    assert not any(p is q for p in gains.values() for q in decayed["params"])


def test_qk_norm_rms_has_no_parameters_and_none_leaves_q_unnormalised():
    plain, none = (make_layer("vanilla", qk_norm=kind) for kind in ("rms", "none"))
    assert {n for n, _ in plain.named_parameters()} == {n for n, _ in none.named_parameters()}
    cos, sin = rotary_tables(T, D, 10000.0)
    x = 10 * torch.randn(B, T, C)
    q_plain, _ = plain.rotated_qk(x, cos, sin)
    q_none, _ = none.rotated_qk(x, cos, sin)  # same weights (same seed): only the norm differs
    torch.testing.assert_close(q_plain.square().mean(-1), torch.ones(B, H, T))  # the rotation keeps the norm
    assert q_none.square().mean(-1).mean() > 10


def test_vanilla_gate_is_one_minus_attention_on_token_zero():
    q, k, v = torch.randn(3, 1, 2, 7, 5, dtype=torch.float64).unbind(0)
    _, lse = reference_attention(q, k, v)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(5)).masked_fill(torch.ones(7, 7).triu(1).bool(), -1e9)
    probs = torch.softmax(scores, -1)
    sink_score = (q * k[:, :, :1]).sum(-1) / math.sqrt(5)
    torch.testing.assert_close(-torch.expm1(sink_score - lse), 1 - probs[..., 0])
    assert torch.all(probs[..., 0, 0] == 1)  # position 0 can only attend to itself: its gate is 0


def test_sink_gate_is_sigmoid_of_lse_minus_sink_logit():
    layer = make_layer("sink")
    cos, sin = rotary_tables(T, D, 10000.0)
    _, gate = explicit_attention(layer, torch.randn(B, T, C), cos, sin)
    with torch.no_grad():  # a larger sink logit takes more mass away from every token: smaller gates
        layer.sink_logit += 2.0
    _, smaller = explicit_attention(layer, torch.randn(B, T, C), cos, sin)
    assert gate.shape == (B, H, T) and smaller.mean() < gate.mean()


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_model_returns_one_gate_per_layer_head_token(attention):
    cfg = GPTConfig(vocab_size=64, n_layer=3, n_embd=C, n_head=H, seq_len=T, attention=attention)
    logits, gates = GPT(cfg)(torch.randint(0, 64, (B, T)))
    assert logits.shape == (B, T, 64) and gates.shape == (3, B, H, T)
    assert torch.all((gates >= 0) & (gates <= 1))


def test_head_mask_zero_removes_a_heads_contribution():
    layer = make_layer("gated")
    cos, sin = rotary_tables(T, D, 10000.0)
    x = torch.randn(B, T, C)
    keep_all, _ = layer(x, cos, sin, torch.ones(H))
    no_heads, _ = layer(x, cos, sin, torch.zeros(H))
    assert torch.allclose(no_heads, torch.zeros_like(no_heads)) and not torch.allclose(keep_all, no_heads)


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="attention='softmax'"):
        GPTConfig(attention="softmax")
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="model.qk_norm='layer'"):
        GPTConfig(qk_norm="layer")
    with pytest.raises(ValueError, match="model.n_head=0 must be a positive integer"):
        GPTConfig(n_head=0)
    with pytest.raises(ValueError, match="100 / 4 = 25: the rotary embedding needs an even head dimension"):
        GPTConfig(n_embd=100, n_head=4)
    with pytest.raises(ValueError, match="model.fp8='fp4'"):
        GPTConfig(fp8="fp4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flex_attention backward)")
@pytest.mark.parametrize("attention, qk_norm", ALL)
def test_flex_backend_matches_reference_on_cuda(attention, qk_norm):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, n_layer=1, n_embd=256, n_head=2, seq_len=256, attention=attention, qk_norm=qk_norm)
    ref = CausalSelfAttention(GPTConfig(**cfg, backend="reference")).cuda()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    flex = CausalSelfAttention(GPTConfig(**cfg, backend="flex")).cuda()
    flex.load_state_dict(ref.state_dict())
    cos, sin = (t.cuda() for t in rotary_tables(256, 128, 10000.0))
    x = torch.randn(2, 256, 256, device="cuda")
    results = []
    for layer in (ref, flex):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out, gate = layer(xi, cos, sin)
        g = torch.Generator(device="cuda").manual_seed(1)
        w_out = torch.randn(out.shape, generator=g, device="cuda")
        w_gate = torch.randn(gate.shape, generator=g, device="cuda")
        ((out * w_out).sum() + (gate * w_gate).sum()).backward()
        results.append((out, gate, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (o1, g1, x1, p1), (o2, g2, x2, p2) = results
    torch.testing.assert_close(o2, o1, atol=2e-4, rtol=2e-3)
    torch.testing.assert_close(g2, g1, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x2, x1, atol=2e-3, rtol=2e-3)
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], atol=2e-3, rtol=2e-3, msg=f"gradient of {name}")


def test_sdpa_needs_no_lse_so_only_gated_may_use_it():
    assert [name for name, variant in VARIANTS.items() if not variant.needs_lse] == ["gated"]
    GPTConfig(attention="gated", backend="sdpa")
    for attention in (name for name, variant in VARIANTS.items() if variant.needs_lse):
        with pytest.raises(ValueError, match=f"backend=sdpa returns no LSE, which the {attention} gate needs"):
            GPTConfig(attention=attention, backend="sdpa")


@pytest.mark.parametrize("qk_norm", QK_NORMS)
def test_sdpa_backend_matches_reference_for_gated(qk_norm):
    layer = make_layer("gated", qk_norm=qk_norm).double()
    cos, sin = (t.double() for t in rotary_tables(T, D, 10000.0))
    x = torch.randn(B, T, C, dtype=torch.float64)
    results = []
    for backend in ("reference", "sdpa"):
        layer.cfg.backend = backend
        results.append(outputs_and_grads(lambda x: layer(x, cos, sin), layer, x))
    reference, sdpa = results
    assert_same_outputs_and_grads(sdpa, reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN)")
def test_sdpa_backend_on_cuda_is_as_accurate_as_the_reference():
    """cuDNN under bf16 autocast, as in training. bf16 alone is ~1% off, so the test is the one fused kernels
    are held to: against a float64 truth, sdpa's error is at most twice the reference backend's in the same
    autocast, for the output, the gate and every gradient."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, n_layer=1, n_embd=256, n_head=2, seq_len=256, attention="gated")
    layer = CausalSelfAttention(cfg).cuda()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    truth_layer = copy.deepcopy(layer).double()
    truth_layer.cfg.backend = "reference"
    cos, sin = (t.cuda() for t in rotary_tables(256, 128, 10000.0))
    x = torch.randn(2, 256, 256, device="cuda", dtype=torch.float64)
    truth = outputs_and_grads(lambda x: truth_layer(x, cos.double(), sin.double()), truth_layer, x)
    errors = {}
    for backend in ("reference", "sdpa"):
        layer.cfg.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            result = outputs_and_grads(lambda x: layer(x, cos, sin), layer, x.float())
        errors[backend] = {name: (ours.double() - true).abs().max().item() for name, ours, true in named(result, truth)}
    verdicts = {name: (errors["sdpa"][name], errors["reference"][name]) for name in errors["sdpa"]}
    print("max |error| vs float64 (sdpa, reference):", verdicts)
    worse = {name: e for name, e in verdicts.items() if e[0] > 2 * e[1] + 1e-6}
    assert not worse, f"sdpa more than twice as far from float64 as the reference: {worse}"
