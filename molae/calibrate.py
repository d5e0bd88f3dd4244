"""Calibration: what one MoE layer's experts see on real text, for activation-aware conversion,
budget allocation and the data-driven baselines (merging, pruning, D²-MoE's Fisher weights).

Shape legend: B windows, T tokens, S = T*K routed slots, E experts, D hidden size n, F expert
intermediate size m, K experts per token, L latent size.

The layer-by-layer pipeline (molae.sequential) captures, per MoE layer, the inputs its experts
module was called with on the calibration windows: x [T, D], top-k expert ids [T, K] and weights
[T, K]. `LayerInputs` holds them (on the device) and derives every statistic a method asks for one
expert, or one group, at a time, so that nothing of size E x D x D is ever held:

  count [E]                  routed tokens per expert
  gram(e), C_e [D, D]        sum of x x^T over the tokens routed to e (float64), from its rows
  group_gram(g), total_gram  the same summed over a group's experts, or all (each routed slot once)
  inputs(e) [N_e, D]         the rows routed to e, found from one stable sort of the routed slots
                             (the fast path's routing plan), not a scan per expert
  hidden(e, W) [N_e, F]      h = silu(W_gate x) * (W_up x), expert e's intermediate activations
  reap(W) [E]                sum over routed tokens of p_e(x) * ||E_e(x)|| (REAP's saliency, / count)
  mean_outputs(W) [E, D]     mean over all tokens (routed or not) of E_e(x) (HC-SMoE)
  fisher(W) [E]              D²-MoE's Fisher weights, approximated layer-locally (see the method)

The regularisation the activation-aware solutions use is here too: C_e' = C_e + prior * C_mean with
C_mean = total_gram / total count (rarely routed experts borrow `prior` tokens' worth of the layer's
mean second moment), and a ridge damp * mean(diag) on whatever matrix is inverted or whitened.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def calibration_ids(source, tokenizer, n_tokens: int, seq_len: int = 512, seed: int = 0,
                    model_vocab: int | None = None) -> torch.Tensor:
    """[B, seq_len] token windows, B = ceil(n_tokens / seq_len). `source`: a prepared data directory
    (`molae data prepare`; windows at seeded random offsets of its training split; its vocabulary must
    fit the model's, `model_vocab`), a text file, or a directory of text files (sorted, read until
    enough text, tokenized with `tokenizer`)."""
    from .data import TokenData, is_prepared, text_files, tokenize_files

    n_windows = math.ceil(n_tokens / seq_len)
    if is_prepared(source):
        data = TokenData(source)
        if model_vocab is not None:
            data.check_vocabulary(model_vocab, "--calibration")
        return data.batch(seed, 0, 0, n_windows, seq_len)[:, :seq_len]
    ids = tokenize_files(text_files(source, "--calibration"), tokenizer, n_windows * seq_len)
    if len(ids) < seq_len:
        raise ValueError(f"--calibration {source} holds {len(ids)} tokens: need at least {seq_len} (one window)")
    n_windows = min(n_windows, len(ids) // seq_len)
    return torch.tensor(ids[:n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)


class LayerInputs:
    """One MoE layer's captured expert inputs and routing (module notes). x [T, D] in its own dtype on
    its device; every statistic is float64."""

    chunk_rows = 8192  # rows of x cast to float64 at a time

    def __init__(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor, n_experts: int,
                 prior_tokens: float = 64.0, logits_TE: torch.Tensor | None = None):
        self.x_TD, self.idx_TK, self.w_TK, self.E, self.prior = x_TD, idx_TK, w_TK, n_experts, prior_tokens
        self.logits_TE = logits_TE  # the router's logits, when captured (REAP's and HC-SMoE's weights)
        T, K = idx_TK.shape
        flat_S = idx_TK.reshape(-1)
        self.order_S = torch.argsort(flat_S, stable=True)  # slots sorted by expert
        self.tok_S = self.order_S // K  # the token of each sorted slot
        counts = torch.bincount(flat_S, minlength=n_experts)
        self.offs = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
        self.count = counts.double().cpu()
        self.tokens = T
        self._total = None

    # ---- rows
    def rows(self, e: int) -> torch.Tensor:
        """Token indices routed to expert e (ascending)."""
        return self.tok_S[self.offs[e]:self.offs[e + 1]]

    def inputs(self, e: int, dtype=torch.float64) -> torch.Tensor:
        return self.x_TD[self.rows(e)].to(dtype)

    def route_weights(self, e: int) -> torch.Tensor:
        """The weights the family's router gave expert e on its routed rows (as the experts module saw them)."""
        return self.w_TK.reshape(-1)[self.order_S[self.offs[e]:self.offs[e + 1]]].double()

    def router_probs(self, e: int) -> torch.Tensor:
        """softmax(router logits)[e] over all experts on e's routed rows: the weight REAP and HC-SMoE use (for
        routers that renormalize the top-k, such as Mixtral's, it differs from `route_weights`); the routed
        weights when no logits were captured."""
        if self.logits_TE is None:
            return self.route_weights(e)
        return torch.softmax(self.logits_TE[self.rows(e)].double(), dim=-1)[:, e]

    # ---- Grams
    def gram(self, e: int) -> torch.Tensor:
        X = self.inputs(e)
        return X.T @ X

    def _weighted_gram(self, c_T: torch.Tensor) -> torch.Tensor:
        """sum_t c_t x_t x_t^T over all tokens, in float64, a chunk of rows at a time."""
        D = self.x_TD.shape[1]
        out = torch.zeros(D, D, dtype=torch.float64, device=self.x_TD.device)
        for i in range(0, self.tokens, self.chunk_rows):
            X = self.x_TD[i:i + self.chunk_rows].double()
            out.addmm_((X * c_T[i:i + self.chunk_rows, None]).T, X)
        return out

    def group_gram(self, experts) -> torch.Tensor:
        """sum over the group's experts of C_e: each token weighted by how many of them it reaches."""
        member = torch.zeros(self.E, dtype=torch.float64, device=self.x_TD.device)
        member[torch.as_tensor(list(experts), device=member.device)] = 1
        return self._weighted_gram(member[self.idx_TK].sum(1))

    def total_gram(self) -> torch.Tensor:
        if self._total is None:
            self._total = self.group_gram(range(self.E))
        return self._total

    def mean_gram(self) -> torch.Tensor:
        """C_mean: the layer's second moment per routed slot."""
        return self.total_gram() / max(float(self.count.sum()), 1.0)

    def regularized_gram(self, e: int) -> torch.Tensor:
        """C_e + prior * C_mean (what `factorize.regularized_grams` gives for one expert)."""
        return self.gram(e) + self.prior * self.mean_gram()

    def regularized_grams(self) -> torch.Tensor:
        """[E, D, D] of every expert at once: the slow, obvious reference (tests, small models only)."""
        return torch.stack([self.regularized_gram(e) for e in range(self.E)])

    # ---- activations
    def hidden(self, e: int, W: dict[str, torch.Tensor], X: torch.Tensor | None = None) -> torch.Tensor:
        """h = silu(W_gate x) * (W_up x) for expert e's routed rows (or the rows X given), float64."""
        X = self.inputs(e) if X is None else X
        return F.silu(X @ W["gate"][e].double().T) * (X @ W["up"][e].double().T)

    def hidden_gram(self, e: int, W) -> torch.Tensor:
        h = self.hidden(e, W)
        return h.T @ h

    def outputs(self, e: int, W, X: torch.Tensor | None = None) -> torch.Tensor:
        return self.hidden(e, W, X) @ W["down"][e].double().T

    def reap(self, W) -> torch.Tensor:
        """[E] sum over routed tokens of p_e(x) * ||E_e(x)||_2, p_e the router's softmax probability
        (CerebrasResearch/reap, src/reap/pruning_metrics.py; its mean is this over the count)."""
        return torch.tensor([(self.router_probs(e) * self.outputs(e, W).norm(dim=1)).sum().item()
                             for e in range(self.E)], dtype=torch.float64)

    def mean_outputs(self, W) -> torch.Tensor:
        """[E, D] mean over every token of E_e(x): each expert run on all tokens (E times the compute of
        the routed layer), a chunk of rows at a time."""
        out = torch.zeros(self.E, self.x_TD.shape[1], dtype=torch.float64)
        for i in range(0, self.tokens, self.chunk_rows):
            X = self.x_TD[i:i + self.chunk_rows].double()
            for e in range(self.E):
                out[e] += self.outputs(e, W, X).sum(0).cpu()
        return out / max(self.tokens, 1)

    def fisher(self, W) -> torch.Tensor:
        """[E] sum over routed tokens of (g_e(x) ||E_e(x)||)^2: the squared norm of the LM loss's gradient
        with respect to the expert's output scale, if the gradient reaching the layer's output had the
        same size for every token. A layer-local stand-in for D²-MoE's Fisher weights (the exact ones need
        the whole model's backward pass; molae/methods/d2moe.py says what the difference measured)."""
        return torch.tensor([((self.route_weights(e) * self.outputs(e, W).norm(dim=1)) ** 2).sum().item()
                             for e in range(self.E)], dtype=torch.float64)


__all__ = ["calibration_ids", "LayerInputs"]
