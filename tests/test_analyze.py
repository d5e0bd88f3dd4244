"""`molae analyze` against numpy's SVD, on constructed experts with known structure, and end to end."""

import json

import numpy as np
import pytest
import torch

import molae  # noqa: F401
from molae.analyze import analyze_projection
from molae.cli import main
from tiny import tiny_model


def test_figures_match_numpy():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    E, m, n = 8, 12, 40
    W = torch.randn(E, m, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    r = analyze_projection(W)
    Wn = W.numpy()
    for level in ("90", "95", "99"):  # each expert's effective rank
        ranks = []
        for w in Wn:
            e = np.linalg.svd(w, compute_uv=False) ** 2
            ranks.append(int(np.searchsorted(np.cumsum(e) / e.sum(), int(level) / 100 - 1e-12) + 1))
        assert r["expert_rank"][level] == dict(mean=sum(ranks) / E, min=min(ranks), max=max(ranks))
    spectra = r["expert_spectra"]  # each expert's spectrum, normalized, at sampled indices
    for i, w in enumerate(Wn):
        s = np.linalg.svd(w, compute_uv=False)
        np.testing.assert_allclose(spectra["values"][i], [s[j - 1] / s[0] for j in spectra["index"]], rtol=1e-9)
        assert spectra["largest"][i] == pytest.approx(s[0], rel=1e-9)
    for G in (1, 2, 8):  # energy kept by the shared latent, per group
        kept = None
        for g in range(G):
            e = np.linalg.svd(Wn[g * E // G:(g + 1) * E // G].reshape(-1, n), compute_uv=False) ** 2
            kept = np.cumsum(e) if kept is None else kept + np.cumsum(e)[:len(kept)]
        curve = r["stacked_energy"][str(G)]
        np.testing.assert_allclose(curve["energy"], [kept[d - 1] / kept[-1] for d in curve["d"]], rtol=1e-9)
        assert r["d_for_energy"][str(G)]["90"] == int(np.searchsorted(kept / kept[-1], 0.9 - 1e-12) + 1)
    assert r["stacked_energy"]["1"]["d"][-1] == n and r["stacked_energy"]["1"]["energy"][-1] == pytest.approx(1)


def test_shared_row_space_is_seen():
    gen = torch.Generator().manual_seed(0)
    E, m, n, d = 6, 10, 64, 5
    R = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0].T  # shared rows
    # orthonormal coefficients: each expert's singular values are equal, so its 90% subspace is all of R's
    C = torch.linalg.qr(torch.randn(E, m, d, generator=gen, dtype=torch.float64))[0]
    shared = analyze_projection(C @ R)
    assert all(shared["expert_rank"][lv]["min"] == d for lv in ("90", "95", "99"))
    assert shared["d_for_energy"]["1"]["99"] <= d
    assert shared["overlap"] > 0.999 > 0.2 > shared["overlap_random"]
    independent = analyze_projection(torch.randn(E, m, n, generator=gen, dtype=torch.float64))
    assert independent["d_for_energy"]["1"]["90"] > 3 * d
    assert abs(independent["overlap"] - independent["overlap_random"]) < 0.1


def test_comparison_puts_shared_and_independent_experts_side_by_side():
    from molae.analyze import format_comparison

    gen = torch.Generator().manual_seed(1)
    E, m, n, d = 6, 10, 64, 5
    R = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0].T
    shared = analyze_projection(torch.linalg.qr(torch.randn(E, m, d, generator=gen, dtype=torch.float64))[0] @ R)
    independent = analyze_projection(torch.randn(E, m, n, generator=gen, dtype=torch.float64))
    md = format_comparison({"a": {"layers": {"0": {"up": shared}}}, "b": {"layers": {"0": {"up": independent}}}})
    row = md.splitlines()[2].split(" | ")
    over_a, rank_a, d_a = (float(v) for v in row[2].split(", "))
    over_b, rank_b, d_b = (float(v) for v in row[3].rstrip(" |").split(", "))
    assert over_a == pytest.approx(shared["overlap"] - shared["overlap_random"], abs=1e-3) and over_a > 0.7
    assert abs(over_b) < 0.1 and rank_a == pytest.approx(d / m) and d_a < d_b


def test_summary_puts_models_of_any_shape_side_by_side():
    from molae.analyze import analysis_summary

    gen = torch.Generator().manual_seed(2)
    E, m, n, d = 6, 10, 64, 5
    R = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0].T
    shared = analyze_projection(torch.linalg.qr(torch.randn(E, m, d, generator=gen, dtype=torch.float64))[0] @ R)
    other = analyze_projection(torch.randn(4, 12, 40, generator=gen, dtype=torch.float64))  # another shape
    md = analysis_summary({"a": {"layers": {"0": {"up": shared}, "1": {"up": shared}}},
                           "b": {"layers": {"3": {"down": other}}}})
    rows = md.splitlines()[2:]
    assert rows[0].startswith("| a | up | 2 | +") and rows[1].startswith("| b | down | 1 | ")
    over = shared["overlap"] - shared["overlap_random"]
    assert f"{over:+.3f} [{over:+.3f}, {over:+.3f}]" in rows[0] and f"{d / m:.2f} [" in rows[0]


def test_analyze_cli(tmp_path, capsys):
    model = tiny_model("deepseek_v3", dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    code = main(["analyze", str(tmp_path / "m"), "--out", str(tmp_path / "a"), "--layers", "2",
                 "--projections", "up,down"])
    out = capsys.readouterr()
    assert code == 0, out.err
    res = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert list(res["layers"]) == ["2"] and list(res["layers"]["2"]) == ["up", "down"]
    assert res["layers"]["2"]["down"]["m"] == 16 and res["layers"]["2"]["down"]["n"] == 32  # down transposed
    assert "| 2 | down | 8 x 16 x 32 |" in out.out
    for png in ("energy_vs_d.png", "spectra.png", "groups.png", "ranks.png"):
        assert (tmp_path / "a" / png).read_bytes()[:4] == b"\x89PNG"
    assert main(["convert", str(tmp_path / "m"), "--out", str(tmp_path / "l"), "--latent-dim", "8"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "l")]) == 2
    assert "is a MoLAE checkpoint" in capsys.readouterr().err
