"""DSelect-k mixture of experts at LeNet scale: a differentiable gate that selects at most k experts.

H. Hazimeh, Z. Zhao, A. Chowdhery, M. Sathiamoorthy, Y. Chen, R. Mazumder, L. Hong,
E. H. Chi, *DSelect-k: Differentiable Selection in the Mixture of Experts with Applications
to Multi-Task Learning*, NeurIPS 2021.

n LeNet experts are shared by all tasks. Each task has a DSelect-k gate made of k
single-expert selectors and a softmax over them:

- smooth-step S(t) = 0 for t ≤ −γ/2, 1 for t ≥ γ/2, −2t³/γ³ + 3t/(2γ) + 1/2 in between
  (continuously differentiable, exactly 0 or 1 outside [−γ/2, γ/2]);
- a selector z ∈ R^m, m = ⌈log₂ n⌉, puts weight r(z)_i = Π_j S(z_j)^{b_ij} (1 − S(z_j))^{1−b_ij}
  on expert i, b_i the binary code of i − 1: a product of m Bernoulli-like factors, so it
  sums to 1 over the 2^m codes and is one-hot once every |z_j| ≥ γ/2;
- the gate is q = Σ_{i=1}^k softmax(α)_i r(z^(i)), so at most k experts get weight once the
  selectors are binary. Task t's head reads Σ_e q_e · expert_e(x).

`gate=static` (task-only gates: z and α are parameters of the task) or `gate=per_example`
(z = G x, α = A x, linear in the flattened input). The paper's entropy regulariser
λ Σ_i h(r(z^(i))) (h the entropy, averaged over the batch for per-example gates, summed
over the tasks' gates) speeds up the selectors' convergence to binary: `entropy_reg` = λ,
returned by `auxiliary_loss()` and added unweighted to the balanced loss. When n is not a
power of 2, codes ≥ n select no expert; as in the authors' code, Σ_i 1/Σ_{e<n} r(z^(i))_e
is added then, so no selector ends on a missing expert.

Contract: the experts are the shared parameters; task t's gate and head are task t's.
With static gates the outputs depend on x only through the stacked expert outputs
[B, n, hidden], so `has_representation` is true (MGDA-UB differentiates w.r.t. them);
per-example gates read the input, so it is false and `mode=representation` fails at
setup. Per-example gate layers read the raw input: they are input layers.

The paper targets recommendation and image-level MTL (no dense prediction): there is no
ResNet-trunk variant here. Deviations of LibMTL's DSelect_k are in docs/models.md.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlsparse.models.cgc import mix
from mtlsparse.models.mmoe import SharedExperts, check_num_experts
from mtlsparse.tasks import Task

GATES = ("static", "per_example")
EPS = 1e-6  # inside the entropy's log, as in the authors' code


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """S(t): 0 below −γ/2, 1 above γ/2, the cubic −2t³/γ³ + 3t/(2γ) + 1/2 in between."""
    cubic = -2.0 / gamma ** 3 * t ** 3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


def binary_codes(num_experts: int) -> Tensor:
    """[n, m] bool: row i is the m-bit binary code of i (most significant bit first), m = ⌈log₂ n⌉."""
    bits = max(math.ceil(math.log2(num_experts)), 0)
    i = torch.arange(num_experts).unsqueeze(1)
    return (i >> torch.arange(bits - 1, -1, -1)) & 1 == 1


def selector_weights(s: Tensor, codes: Tensor) -> Tensor:
    """r: [..., k, n] from smooth-step activations s [..., k, m] and codes [n, m] (a product over the bits)."""
    s = s.unsqueeze(-2)  # [..., k, 1, m]
    return torch.where(codes, s, 1 - s).prod(-1)


class DSelectKGate(nn.Module):
    """One task's DSelect-k gate over `num_experts` experts: k selectors, softmax weights over them."""

    def __init__(self, num_experts: int, k: int, gamma: float, in_features: int | None) -> None:
        super().__init__()
        self.k, self.gamma = k, gamma
        self.register_buffer("codes", binary_codes(num_experts), persistent=False)
        bits = self.codes.shape[1]
        if in_features is None:  # static: parameters of the task
            self.z = nn.Parameter(torch.empty(k, bits).uniform_(-gamma / 100, gamma / 100))
            self.alpha = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))
            self.z_map = self.alpha_map = None
        else:  # per example: linear in the input
            self.z, self.alpha = None, None
            self.z_map, self.alpha_map = nn.Linear(in_features, k * bits), nn.Linear(in_features, k)
            for p in self.z_map.parameters():
                nn.init.uniform_(p, -gamma / 100, gamma / 100)
            for p in self.alpha_map.parameters():
                nn.init.uniform_(p, -0.05, 0.05)

    @property
    def static(self) -> bool:
        return self.z is not None

    def selectors(self, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(r, softmax(α)): selector outputs [k, n] / [B, k, n] and their weights [k] / [B, k]."""
        if self.static:
            z, alpha = self.z, self.alpha
        else:
            flat = x.flatten(1)
            z = self.z_map(flat).view(flat.shape[0], self.k, -1)
            alpha = self.alpha_map(flat)
        return selector_weights(smooth_step(z, self.gamma), self.codes), torch.softmax(alpha, dim=-1)

    def forward(self, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(q, r): expert weights q = Σ_i softmax(α)_i r(z^(i)) ([n] or [B, n]) and the selectors r."""
        r, w = self.selectors(x)
        return (w.unsqueeze(-1) * r).sum(-2), r

    def regulariser(self, r: Tensor, entropy_reg: float) -> Tensor:
        """λ Σ_i h(r(z^(i))) (+ Σ_i 1/Σ_e r_ie when n is not a power of 2), averaged over examples."""
        per_selector = torch.zeros((), device=r.device)
        if entropy_reg:
            per_selector = entropy_reg * -(r * torch.log(r + EPS)).sum(-1)
        if self.codes.shape[0] != 2 ** self.codes.shape[1]:
            per_selector = per_selector + 1.0 / r.sum(-1)
        total = per_selector.sum(-1) if per_selector.dim() else per_selector
        return total.mean() if total.dim() else total


class DSelectK(SharedExperts):
    """`num_experts` LeNet experts (same knobs as MMoE) + one DSelect-k gate and one linear head per task."""

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], num_experts: int = 4, k: int = 2,
                 gamma: float = 1.0, gate: str = "static", entropy_reg: float = 1e-3,
                 channels: Sequence[int] = (10, 20), hidden: int = 50, kernel_size: int = 5,
                 batch_norm: bool = False) -> None:
        check_num_experts(num_experts)  # before k's range, which it bounds
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"model.k (experts each gate selects) must be an integer in 1..{num_experts} "
                             f"(model.num_experts), got {k!r}")
        if not gamma > 0:
            raise ValueError(f"model.gamma (width of the smooth-step's cubic region) must be > 0, got {gamma!r}")
        if gate not in GATES:
            raise ValueError(f"model.gate must be one of {GATES}, got {gate!r}")
        if not entropy_reg >= 0:
            raise ValueError(f"model.entropy_reg (λ of the entropy regulariser) must be >= 0, got {entropy_reg!r}")
        in_features = None if gate == "static" else math.prod(in_shape)
        super().__init__(tasks, in_shape, num_experts, channels, hidden, kernel_size, batch_norm,
                         make_gate=lambda: DSelectKGate(num_experts, k, gamma, in_features))
        self.k, self.gamma, self.gate, self.entropy_reg = k, float(gamma), gate, float(entropy_reg)
        #: static gates read no input: the stacked expert outputs are a shared representation
        self.has_representation = gate == "static"
        self._aux: Tensor | None = None

    def gate_weights(self, x: Tensor | None = None) -> dict[str, Tensor]:
        """Each task's expert weights q: [n] for static gates, [B, n] per example."""
        return {name: gate(x)[0] for name, gate in self.gates.items()}

    def _mixtures(self, experts: list[Tensor], x: Tensor | None) -> dict[str, Tensor]:
        """Each task's head output on its gated mixture; the regulariser of this pass while training."""
        out, reg = {}, []
        for name, gate in self.gates.items():
            q, r = gate(x)
            weights = q.expand(experts[0].shape[0], -1) if gate.static else q
            out[name] = self.heads[name](mix(weights, experts))
            if self.training:
                reg.append(gate.regulariser(r, self.entropy_reg))
        self._aux = torch.stack(reg).sum() if reg else None
        return out

    def encode(self, x: Tensor) -> Tensor:
        """Stacked expert outputs [B, n, hidden] (static gates only: then every task depends on x through them)."""
        if not self.has_representation:
            return super().encode(x)
        return torch.stack([expert(x) for expert in self.experts], dim=1)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """Each task's static gate mixes the experts' outputs z [B, n, hidden]; then its head."""
        if not self.has_representation:
            return super().decode(z)
        return self._mixtures(list(z.unbind(1)), None)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self._mixtures([expert(x) for expert in self.experts], None if self.has_representation else x)

    def auxiliary_loss(self) -> Tensor | None:
        """The gates' regulariser of the last training forward (entropy, unreachable codes); None in eval."""
        if self._aux is None or not self._aux.requires_grad:
            return None
        return self._aux

    def input_layers(self) -> Sequence[nn.Module]:
        maps = [m for gate in self.gates.values() for m in (gate.z_map, gate.alpha_map) if m is not None]
        return [*self.expert_input_layers(), *maps]
