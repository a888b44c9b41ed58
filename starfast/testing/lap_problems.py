"""Random linear-assignment problems of the kinds weight matching meets, shared by the LAP tests
and benchmarks: iid normal, small-integer ties, all-equal, rank-1, weight-matching-like
(``A = W (P W + noise)^T``) and that at huge and tiny magnitudes."""
import torch

KINDS = ["iid", "ties", "equal", "wm", "rank1", "huge", "tiny"]


def make_costs(kind: str, batch: int, n: int, rng: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    if kind == "iid":
        cost = torch.randn(batch, n, n, generator=rng, dtype=torch.float64)
    elif kind == "ties":
        cost = torch.randint(0, 4, (batch, n, n), generator=rng).double()
    elif kind == "equal":
        cost = torch.full((batch, n, n), 3.25, dtype=torch.float64)
    elif kind == "rank1":
        cost = torch.randn(batch, n, 1, generator=rng, dtype=torch.float64) @ torch.randn(batch, 1, n, generator=rng, dtype=torch.float64)
    else:  # weight-matching-like: A = W (P W + noise)^T, W of shape n x 4n
        w = torch.randn(batch, n, 4 * n, generator=rng, dtype=torch.float64)
        perm = torch.stack([torch.randperm(n, generator=rng) for _ in range(batch)])
        other = torch.gather(w, 1, perm.unsqueeze(2).expand_as(w)) + 0.5 * torch.randn(w.shape, generator=rng, dtype=torch.float64)
        cost = w @ other.transpose(1, 2)
        cost = cost * {"wm": 1.0, "huge": 1e12, "tiny": 1e-12}[kind]
    return cost.to(dtype)
