"""The distributed context of a run (rank, world, device) and FSDP2 sharding."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..command import check_device


class Run:
    """Distributed context: rank, world, device; FSDP2 when world > 1."""

    def __init__(self, device: str | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        check_device(device)
        self.device = torch.device(f"cuda:{local}" if device == "cuda" else device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def shard(model, run: Run, ignored: set | None = None):
    """FSDP2: each decoder layer, then the root (embeddings, final norm, LM head); `ignored` parameters (an
    expert-parallel run's per-expert tensors) stay whole and local."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(run.device.type, (run.world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model


class ExpertShards:
    """`--ep K`: every MoE layer's experts split over K processes (molae/expert_parallel.py), the W processes of
    the run forming a (data = W/K, expert = K) mesh, as torchtitan composes EP with FSDP2. The per-expert tensors
    (A's, whole matrices) of a rank's experts live only on that rank and its data-parallel replicas, outside
    FSDP2 (`local`); everything else, the replicated B's included, is FSDP2-sharded over all W processes.

    Gradients then mean what FSDP2's averaged ones mean: a local tensor's gradient, after the backward, holds
    the sum over its EP group's losses; `reduce_grads` sums it over the data-parallel replicas and divides by W.
    The gradient norm adds the local tensors' squares over the EP group. Checkpoints and the exported model
    hold whole tensors: `gather` assembles them, `scatter` cuts a whole state back to this rank's share."""

    def __init__(self, model, run: Run, ep: int):
        from torch.distributed.device_mesh import init_device_mesh

        from ..expert_parallel import ExpertParallelExperts
        from ..models import find_experts, set_submodule

        if run.world % ep:
            raise ValueError(f"--ep {ep} does not divide the {run.world} processes: use a divisor of the world size")
        mesh = init_device_mesh(run.device.type, (run.world // ep, ep), mesh_dim_names=("dp", "ep"))
        self.ep_group, self.dp_group = mesh.get_group("ep"), mesh.get_group("dp")
        self.world, self.dp = run.world, run.world // ep
        self.modules = {}
        for name, m in find_experts(model):
            shard_ = ExpertParallelExperts.from_experts(m, group=self.ep_group)
            set_submodule(model, name, shard_)
            self.modules[name] = shard_
        self.local = {f"{n}.{p}": t for n, m in self.modules.items() for p, t in m.local_params().items()}

    def reduce_grads(self):
        for p in self.local.values():
            if p.grad is not None:
                if self.dp > 1:
                    dist.all_reduce(p.grad, group=self.dp_group)
                p.grad.div_(self.world)

    def squared_norm(self) -> torch.Tensor:
        sq = sum((p.grad.float().square().sum() for p in self.local.values() if p.grad is not None),
                 torch.zeros((), device=next(iter(self.local.values())).device))
        dist.all_reduce(sq, group=self.ep_group)
        return sq

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.ep_group))]
        dist.all_gather(parts, t.contiguous(), group=self.ep_group)
        return torch.cat(parts).cpu()

    def gather(self, msd: dict, osd: dict, opt) -> None:
        """Whole tensors (and their optimizer state) into the gathered state dicts, on every process."""
        for name, p in self.local.items():  # the same collectives on every process (some get empty dicts)
            msd[name] = self._gather(p.detach())
            state = {k: self._gather(v) if torch.is_tensor(v) and v.dim() else v
                     for k, v in opt.state.get(p, {}).items()}
            if state and "state" in osd:
                osd["state"][name] = state

    def scatter(self, msd: dict, osd: dict | None = None) -> None:
        """Whole tensors of a gathered state cut to this rank's share, in place."""
        for name, p in self.local.items():
            k = dist.get_world_size(self.ep_group)
            lo = dist.get_rank(self.ep_group) * msd[name].shape[0] // k
            cut = lambda v, lo=lo, n=p.shape[0]: v[lo:lo + n] if torch.is_tensor(v) and v.dim() else v  # noqa: E731
            msd[name] = cut(msd[name])
            if osd is not None and name in osd.get("state", {}):
                osd["state"][name] = {key: cut(v) for key, v in osd["state"][name].items()}
