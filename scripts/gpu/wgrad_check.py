"""Does torch's CUDA grouped_mm weight gradient leave experts with no rows uninitialised? Poison the
caching allocator with NaNs, free it, then take grouped_mm's own autograd wgrad with idle groups."""
import torch
import torch.nn.functional as F

torch.manual_seed(0)
E, O, I, S = 48, 160, 640, 4096
for trial in range(3):
    junk = torch.full((E * O * I * 2,), float("nan"), device="cuda", dtype=torch.bfloat16)
    del junk
    counts = torch.zeros(E, dtype=torch.int64)
    counts[:6] = S // 6
    counts[5] += S - counts.sum()
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    x = torch.randn(S, I, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, O, I, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    F.grouped_mm(x, w.transpose(-2, -1), offs=offs).float().sum().backward()
    idle = w.grad[6:]
    print(f"trial {trial}: idle experts' wgrad finite={bool(torch.isfinite(idle).all())} "
          f"max|.|={idle.float().abs().nan_to_num(1e30).max().item():.3g}")
