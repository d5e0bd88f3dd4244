"""--budget arithmetic, in one place. A budget is a fraction f of a layer's routed-expert parameters,
3 E m n (gate, up and down of E experts [m, n]); each method spends its share on its own factors:

    MoLAE, one factorized kind, G groups, latent d:   G d n + E m d          (latent_cost per unit of d)
    per-expert rank r (SVD-LLM, D²-MoE's deltas):     E r (m + n) [+ m n for a shared base]
    MoBE, one kind, J bases of rank k:                E m k + J k n + E J    (methods/mobe.py)
"""

from __future__ import annotations


LATENT_ALIGN = 8  # latent sizes in multiples of this where they are not tiny: torch's grouped GEMM takes 16-byte
# rows (8 bf16 values); at other sizes the experts fall back to a padded batched matmul that syncs with the host


def routed_params(E: int, m: int, n: int) -> int:
    """A layer's routed-expert parameters: gate, up and down of E experts."""
    return 3 * E * m * n


def latent_cost(E: int, m: int, n: int, groups: int = 1) -> int:
    """Parameters one unit of latent size costs a factorized kind: G rows of B (n each) and E columns of A (m)."""
    return groups * n + E * m


def uniform_latent(fraction: float, E: int, m: int, n: int, groups: int = 1, align: int = LATENT_ALIGN) -> int:
    """The one d for gate, up and down (G groups) that keeps `fraction` of the routed-expert parameters, rounded
    down to a multiple of `align` where d >= 2 * align."""
    d = min(int(fraction * E * m * n // latent_cost(E, m, n, groups)), E // groups * m, n)
    return max(1, d - d % align if d >= 2 * align else d)


def rank_per_expert(fraction: float, E: int, M: int, N: int, shared: int = 0) -> int:
    """The rank r of each of E rank-r factorizations (r (M + N) each) that fit `fraction` of one kind's
    E M N parameters after `shared` parameters (a whole base matrix, D²-MoE's); at most min(M, N)."""
    r = int((fraction * E * M * N - shared) // (E * (M + N)))
    if r < 1:
        raise ValueError(f"--budget {fraction} leaves no rank for {E} experts of {M}x{N}"
                         f"{' plus a shared base' if shared else ''}: raise --budget")
    return min(r, min(M, N))


__all__ = ["LATENT_ALIGN", "routed_params", "latent_cost", "uniform_latent", "rank_per_expert"]
