"""Top-k compressor: error feedback conserves mass, warm-up schedule, selection, clipping, config."""

from __future__ import annotations

import math

import pytest
import torch

from edgeglm.compress.sparsify import Selection, SparsifyConfig, TopKCompressor
from edgeglm.errors import ConfigError


def _grads(steps: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # heavy-ish tails and a per-step scale change, like real gradients
    return [torch.randn(shape, generator=g) * (1 + t % 3) * torch.rand(shape, generator=g) ** 2 for t in range(steps)]


# -- error feedback ----------------------------------------------------------------------------


@pytest.mark.parametrize("selection", [Selection.EXACT, Selection.SAMPLED])
@pytest.mark.parametrize("warmup_steps", [0, 6])
def test_error_feedback_conserves_mass_without_momentum(selection: Selection, warmup_steps: int) -> None:
    """With m = 0: Σ_τ send_τ + v_t = Σ_τ G_τ."""
    cfg = SparsifyConfig(ratio=0.01, momentum=0.0, warmup_steps=warmup_steps, selection=selection)
    comp = TopKCompressor(cfg)
    grads = _grads(12, (50, 120))
    sent_total = torch.zeros(50, 120)
    for step, g in enumerate(grads):
        sent_total += comp.compress(g, step).to_dense()
    assert comp.momentum is None
    total = sent_total + comp.residual.view(50, 120)
    torch.testing.assert_close(total, torch.stack(grads).sum(0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("masking", [True, False])
def test_error_feedback_conserves_momentum_mass(masking: bool) -> None:
    """With m > 0: Σ_τ send_τ + v_t = Σ_τ u_τ, with u_τ = m · u_{τ-1}^masked + G_τ (before masking)."""
    m = 0.9
    comp = TopKCompressor(SparsifyConfig(ratio=0.02, momentum=m, momentum_masking=masking))
    grads = _grads(15, (3000,), seed=1)
    u = torch.zeros(3000)
    u_total = torch.zeros(3000)
    sent_total = torch.zeros(3000)
    for step, g in enumerate(grads):
        u = m * u + g
        u_total += u
        sent = comp.compress(g, step)
        sent_total += sent.to_dense()
        if masking:
            u[sent.indices] = 0
        torch.testing.assert_close(comp.momentum, u, rtol=0, atol=1e-5)
    torch.testing.assert_close(sent_total + comp.residual, u_total, rtol=0, atol=1e-4)


def test_sent_entries_are_the_largest_of_the_residual() -> None:
    comp = TopKCompressor(SparsifyConfig(ratio=0.05, momentum=0.0))
    g = torch.randn(1000)
    sent = comp.compress(g, 0)
    assert sent.indices.dtype == torch.int64
    assert torch.all(sent.indices[1:] > sent.indices[:-1])  # ascending
    assert sent.values.abs().min() >= comp.residual.abs().max()
    assert torch.all(comp.residual[sent.indices] == 0)


def test_compress_leaves_the_gradient_alone_and_checks_its_shape() -> None:
    comp = TopKCompressor(SparsifyConfig(ratio=0.1, clip_norm=0.1))
    g = torch.randn(10, 10)
    before = g.clone()
    comp.compress(g, 0)
    assert torch.equal(g, before)
    with pytest.raises(ValueError, match="one compressor per tensor"):
        comp.compress(torch.randn(100), 1)
    comp.reset()
    comp.compress(torch.randn(100), 0)


# -- warm-up -----------------------------------------------------------------------------------


def test_warmup_follows_dgc_schedule() -> None:
    """0.25 → 0.001 over 4 stages of 100 steps: ρ = 0.25 · 0.004^(s/4), held within a stage.

    DGC's published per-epoch sparsities (75 %, 93.75 %, 98.4375 %, 99.6 %, then 99.9 %) match to 2 %
    of the kept fraction.
    """
    cfg = SparsifyConfig(ratio=0.001, warmup_ratio=0.25, warmup_steps=400, warmup_stage_steps=100)
    dgc = [0.75, 0.9375, 0.984375, 0.996]
    for stage, sparsity in enumerate(dgc):
        for step in (100 * stage, 100 * stage + 57, 100 * stage + 99):
            assert cfg.ratio_at(step) == pytest.approx(0.25 * 0.004 ** (stage / 4), rel=1e-12)
            assert cfg.sparsity_at(step) == pytest.approx(1 - cfg.ratio_at(step), abs=1e-15)
            assert cfg.ratio_at(step) == pytest.approx(1 - sparsity, rel=0.02)
    assert cfg.sparsity_at(400) == cfg.sparsity_at(10**6) == pytest.approx(0.999)
    assert SparsifyConfig(ratio=0.01).sparsity_at(0) == pytest.approx(0.99)


def test_compressor_sends_the_scheduled_count_per_step() -> None:
    numel = 20_000
    cfg = SparsifyConfig(ratio=0.001, warmup_ratio=0.25, warmup_steps=8, momentum=0.0)
    comp = TopKCompressor(cfg)
    for step, g in enumerate(_grads(10, (numel,), seed=2)):
        sent = comp.compress(g, step)
        assert sent.indices.numel() == cfg.k_at(step, numel) == max(1, round(cfg.ratio_at(step) * numel))
        assert 1 - sent.indices.numel() / numel == pytest.approx(cfg.sparsity_at(step), abs=0.5 / numel)
    assert cfg.k_at(0, numel) == 5000 and cfg.k_at(8, numel) == 20
    assert cfg.k_at(0, 10) == 2 and SparsifyConfig(ratio=1e-6).k_at(0, 10) == 1 and cfg.k_at(0, 0) == 0


# -- selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.001, 0.01])
def test_sampled_selection_picks_the_exact_top_set(ratio: float) -> None:
    n = 400_000
    g = torch.Generator().manual_seed(3)
    x = (torch.randperm(n, generator=g).float() - n / 2) / n  # distinct magnitudes but for ± pairs
    x = x + torch.rand(n, generator=g) * 1e-7
    k = round(ratio * n)
    exact = TopKCompressor(SparsifyConfig(ratio=ratio, momentum=0.0, selection=Selection.EXACT))
    sampled = TopKCompressor(SparsifyConfig(ratio=ratio, momentum=0.0, selection=Selection.SAMPLED))
    a, b = exact.compress(x, 0), sampled.compress(x, 0)
    assert a.indices.numel() == k
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(exact.residual, sampled.residual)


def test_sampled_selection_keeps_about_k_on_awkward_tensors() -> None:
    n, ratio = 300_000, 0.001
    k = round(ratio * n)
    g = torch.Generator().manual_seed(4)
    awkward = {
        "gaussian": torch.randn(n, generator=g),
        "cauchy": torch.tan(math.pi * (torch.rand(n, generator=g) - 0.5)),
        "mostly zeros": torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.0005),
        "all equal": torch.ones(n),
    }
    for name, x in awkward.items():
        for seed in range(5):
            cfg = SparsifyConfig(ratio=ratio, momentum=0.0, selection=Selection.SAMPLED)
            sent = TopKCompressor(cfg, seed=seed).compress(x, 0)
            assert 0.9 * k <= sent.indices.numel() <= k, name
            assert sent.values.abs().min() >= x.abs().kthvalue(n - k).values, name


def test_auto_selection_switches_at_the_cutoff() -> None:
    cfg = SparsifyConfig(ratio=0.01, momentum=0.0, exact_max_numel=1000)
    x = torch.randn(5000)
    comp = TopKCompressor(cfg)
    assert torch.equal(comp.compress(x, 0).indices, torch.sort(x.abs().topk(50).indices).values)


# -- clipping ----------------------------------------------------------------------------------


def test_local_clipping_scales_to_clip_norm_over_sqrt_workers() -> None:
    cfg = SparsifyConfig(ratio=0.1, momentum=0.0, clip_norm=2.0)
    g = torch.randn(400)
    g = g * (100 / g.norm())
    comp = TopKCompressor(cfg, world_size=4)
    clipped = comp.compress(g, 0).to_dense() + comp.residual
    assert clipped.norm().item() == pytest.approx(2.0 / math.sqrt(4), rel=1e-5)
    torch.testing.assert_close(clipped, g * (1.0 / 100))  # direction kept
    small = g * (0.5 / 100)  # below the bound: untouched
    comp2 = TopKCompressor(cfg, world_size=4)
    torch.testing.assert_close(comp2.compress(small, 0).to_dense() + comp2.residual, small)


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": 0.5, "warmup_ratio": 0.25}, "warmup_ratio"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 10, "warmup_stage_steps": 3}, "multiple"),
        ({"momentum": 1.0}, "momentum"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"selection": "fastest"}, "selection"),
        ({"sample_fraction": 0.0}, "sample_fraction"),
        ({"exact_max_numel": 0}, "exact_max_numel"),
        ({"schema_version": 2}, "schema_version"),
    ],
)
def test_config_rejects_bad_values_with_a_hint(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        SparsifyConfig(**kwargs)
    assert info.value.hint


def test_config_round_trips_through_a_dict() -> None:
    cfg = SparsifyConfig.from_dict({"ratio": 0.001, "selection": "sampled", "warmup_steps": 4})
    assert cfg.selection is Selection.SAMPLED
    assert SparsifyConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["selection"] == "sampled" and SparsifyConfig.kind == "sparsify"
    with pytest.raises(ConfigError, match="unknown key"):
        SparsifyConfig.from_dict({"ratoi": 0.01})
