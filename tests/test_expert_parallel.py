"""Expert parallelism (molae/expert_parallel.py) in 2 and 4 gloo processes against the single-process layer:
outputs, every gradient, and the elements sent against the formula."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from molae.expert_parallel import ExpertParallelExperts, check_ep, traffic
from molae.layers import Experts

D, F_, E, K, T = 12, 8, 8, 2, 24  # T tokens per rank
CASES = {
    "standard": dict(latent=None, groups=1),
    "molae-g1-all": dict(latent=dict(gate=5, up=6, down=4), groups=1),
    "molae-g1-up-gate": dict(latent=dict(gate=5, up=5), groups=1),
    "molae-g4-all": dict(latent=dict(gate=5, up=6, down=4), groups=4),
    "molae-g1-up-only": dict(latent=dict(up=6), groups=1),
}


def _worker(rank, world, init, queue):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for name, case in CASES.items():
            if case["groups"] == 1 or case["groups"] % world == 0:
                queue.put((name, rank, *_compare(rank, world, case)))
    finally:
        dist.destroy_process_group()


def _compare(rank, world, case):
    torch.manual_seed(0)  # the same full layer and the same data on every rank
    full = Experts(D, F_, E, groups=case["groups"], latent=case["latent"]).double()
    x = torch.randn(world * T, D, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(world * T)])
    w = torch.rand(world * T, K, dtype=torch.float64)
    g = torch.randn(world * T, D, dtype=torch.float64)
    full.impl = "reference"
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (full(xr, idx, wr) * g).sum().backward()
    y_ref = full(x, idx, w).detach()

    ep = ExpertParallelExperts.from_experts(full)
    mine = slice(rank * T, (rank + 1) * T)
    xl, wl = x[mine].clone().requires_grad_(), w[mine].clone().requires_grad_()
    y = ep(xl, idx[mine], wl)
    (y * g[mine]).sum().backward()
    ep.sync_replicated_grads()
    errors = {"y": (y - y_ref[mine]).abs().max().item(), "x.grad": (xl.grad - xr.grad[mine]).abs().max().item(),
              "w.grad": (wl.grad - wr.grad[mine]).abs().max().item()}  # the routing weights' gradient too
    lo, hi = rank * E // world, (rank + 1) * E // world
    for name, p in ep.named_parameters():
        ref = dict(full.named_parameters())[name].grad
        ref = ref if name.endswith("_B") else ref[lo:hi]
        errors[name] = (p.grad - ref).abs().max().item()
    want = traffic(idx[mine], E, case["groups"], world, rank, ep.widths())
    got = {k: ep.last_traffic[k] for k in want}
    return errors, got, want


@pytest.fixture(scope="module", params=[2, 4])
def ep_results(request, tmp_path_factory):
    """Every case in one set of `world` processes: {case: [(rank, errors, got, want)]}."""
    world = request.param
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path_factory.mktemp('ep')}/rendezvous"
    procs = [ctx.Process(target=_worker, args=(r, world, init, queue)) for r in range(world)]
    for p in procs:
        p.start()
    n = world * sum(1 for c in CASES.values() if c["groups"] == 1 or c["groups"] % world == 0)
    results = [queue.get(timeout=300) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    out = {}
    for name, *rest in results:
        out.setdefault(name, []).append(rest)
    return world, out


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_matches_one_process(ep_results, name):
    world, results = ep_results
    if CASES[name]["groups"] > 1 and CASES[name]["groups"] % world:
        pytest.skip("G must be 1 or a multiple of the EP size")
    assert len(results[name]) == world
    for rank, errors, got, want in results[name]:
        assert max(errors.values()) < 1e-10, (rank, errors)
        assert len(errors) >= 6  # y, x.grad, w.grad and every parameter's gradient were compared
        assert got == want and want["remote_pairs"] > 0, (rank, got, want)


def test_latent_dispatch_sends_fewer_numbers(tmp_path):
    """MoLAE with up+gate and down factorized: dispatch 2d and combine d per pair, against D and D."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/one", rank=0, world_size=1)
    try:
        assert ExpertParallelExperts(D, F_, E, latent=dict(gate=4, up=4, down=3)).widths() == (8, 3)
        assert ExpertParallelExperts(D, F_, E, latent=dict(up=4)).widths() == (4 + D, D)
        assert ExpertParallelExperts(D, F_, E).widths() == (D, D)
        full = Experts(D, F_, E, latent=dict(gate=4, down=3), groups=2)  # one rank: the whole layer, same output
        ep = ExpertParallelExperts.from_experts(full)
        x, idx, w = torch.randn(10, D), torch.stack([torch.randperm(E)[:K] for _ in range(10)]), torch.rand(10, K)
        torch.testing.assert_close(ep(x, idx, w), full(x, idx, w))
        assert ep.last_traffic["remote_pairs"] == 0 and ep.last_traffic["pairs"] >= 10
    finally:
        dist.destroy_process_group()


def test_bad_ep_sizes_are_refused():
    with pytest.raises(ValueError, match="2 groups over 4 EP ranks"):
        check_ep(8, 2, 4)
    with pytest.raises(ValueError, match="6 experts do not split over 4"):
        check_ep(6, 1, 4)
    check_ep(8, 8, 4), check_ep(8, 1, 4)  # allowed
