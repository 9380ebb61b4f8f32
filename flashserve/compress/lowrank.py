"""Low-rank factorisation: each decoder linear W [out, in] becomes B [out, r] @ A [r, in].

Plain truncated SVD keeps the directions of largest weight energy, but what matters is the
error on the layer's actual inputs, ``E||(W - BA) x||^2 = ||(W - BA) C^(1/2)||_F^2`` with
``C = E[x x^T]``. So the SVD is taken of a scaled matrix and the scale undone in A:

* ``whiten`` (default): ``W L`` with ``L L^T = C`` (Cholesky of the calibration inputs' second
  moment, damped by 1% of its mean diagonal); the truncation is then optimal for that error
  (the whitening of SVD-LLM, Wang et al., 2024).
* ``diag``: ``W diag(s)`` with ``s_j = sqrt(E[x_j^2])``, the input-channel scaling of ASVD.
* ``none``: the SVD of W itself (no calibration).

The fused projections (q/k/v, gate/up) share their input and are factorised as one matrix, so
the pair of thin linears replaces the fused one. Factors are balanced: ``B = U sqrt(S)``,
``A = sqrt(S) V^T (scale)^-1``. The rank of each matrix comes from one rule: ``ratio`` (keep this
share of its parameters: ``r = ratio * out * in / (out + in)``), ``rank`` (the same rank for all)
or ``energy`` (the smallest rank keeping this share of the scaled matrix's squared singular
values). Layers are factorised one at a time on the inputs the factorised layers below produce
(flashserve.compress.calibration).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flashserve.compress.calibration import InputStats, LayerwiseCalibration, linear_modules
from flashserve.compress.layers import is_low_rank, set_low_rank

SCALINGS = ("whiten", "diag", "none")
DAMPING = 0.01  # share of the mean input second moment added to the diagonal before Cholesky


def check_rule(ratio: float | None, rank: int | None, energy: float | None) -> None:
    """Exactly one rank rule, in range; ValueError naming the problem otherwise."""
    given = [n for n, v in (("ratio", ratio), ("rank", rank), ("energy", energy)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --ratio, --rank, --energy (got {', '.join(given) or 'none'})")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"--ratio is the share of each matrix's parameters to keep and must be in (0, 1], got {ratio}")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"--energy must be in (0, 1], got {energy}")


def rank_for(out_f: int, in_f: int, singular: torch.Tensor | None, ratio: float | None, rank: int | None,
             energy: float | None, name: str = "matrix") -> int:
    """The rank of one [out_f, in_f] matrix under the rule (``singular``: its scaled singular values)."""
    full = min(out_f, in_f)
    if rank is not None:
        if rank > full:
            raise ValueError(f"rank {rank} is larger than {name} allows: a {out_f}x{in_f} matrix has rank at most {full}")
        return rank
    if ratio is not None:
        return max(1, min(full, math.floor(ratio * out_f * in_f / (out_f + in_f))))
    assert singular is not None and energy is not None
    cum = singular.double().pow(2).cumsum(0)
    return min(full, int((cum < energy * cum[-1] * (1 - 1e-12)).sum()) + 1)


def factorise(weight: torch.Tensor, stats: InputStats | None, scaling: str, ratio: float | None = None,
              rank: int | None = None, energy: float | None = None, name: str = "matrix") -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) in the weight's dtype with ``B @ A`` approximating ``weight`` [out, in]."""
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; expected one of {', '.join(SCALINGS)}")
    out_f, in_f = weight.shape
    if rank is not None:
        rank_for(out_f, in_f, None, None, rank, None, name)  # fail before any SVD
    w = weight.detach().double()
    chol: torch.Tensor | None = None
    if scaling == "none":
        scaled = w
    elif stats is None:
        raise ValueError(f"scaling {scaling!r} needs calibration statistics")
    elif scaling == "diag":
        s = stats.mean_sq.double().sqrt().clamp_min(1e-8)  # [in]
        scaled = w * s[None, :]
    else:
        c = stats.second_moment.double()
        c = c + DAMPING * c.diagonal().mean().clamp_min(1e-12) * torch.eye(in_f, dtype=c.dtype, device=c.device)
        chol = torch.linalg.cholesky(c)  # lower, L L^T = C
        scaled = w @ chol
    u, sv, vh = torch.linalg.svd(scaled, full_matrices=False)  # [out, k], [k], [k, in]
    r = rank_for(out_f, in_f, sv, ratio, rank, energy, name)
    root = sv[:r].sqrt()
    b = u[:, :r] * root[None, :]  # [out, r]
    a = root[:, None] * vh[:r]  # [r, in], in scaled coordinates
    if scaling == "diag":
        a = a / s[None, :]
    elif chol is not None:  # a L^-1: solve L^T X = a^T
        a = torch.linalg.solve_triangular(chol.T, a.T, upper=True).T
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()


def lowrank_model(model: nn.Module, ratio: float | None = None, rank: int | None = None, energy: float | None = None,
                  scaling: str = "whiten", calibration: list[list[int]] | None = None) -> dict[str, int]:
    """Factorise every decoder linear of ``model`` in place; returns {module name: rank}."""
    check_rule(ratio, rank, energy)
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; expected one of {', '.join(SCALINGS)}")
    if scaling != "none" and not calibration:
        raise ValueError(f"scaling {scaling!r} needs calibration text")
    for i, layer in enumerate(model.model.layers):  # every rank checked before any work
        for name, m in linear_modules(layer).items():
            if is_low_rank(m):
                raise ValueError(f"model.layers.{i}.{name} is already factorised")
            if rank is not None:
                rank_for(m.out_features, m.in_features, None, None, rank, None, f"model.layers.{i}.{name}")
    calib = LayerwiseCalibration(model, calibration) if scaling != "none" else None
    ranks: dict[str, int] = {}
    for i, layer in enumerate(model.model.layers):
        stats = calib.collect(layer, gram=scaling == "whiten") if calib is not None else {}
        for name, m in linear_modules(layer).items():
            full = f"model.layers.{i}.{name}"
            a, b = factorise(m.weight.data, stats.get(name), scaling, ratio, rank, energy, full)
            set_low_rank(m, a, b)  # the layer keeps its name and bias; weight -> weight_a, weight_b
            ranks[full] = a.shape[0]
        if calib is not None:
            calib.advance(layer)
    return ranks
