"""An independent, deliberately plain weight-matching implementation: one model at a time,
every cost matrix rebuilt from scratch with index_select, scipy's linear_sum_assignment — the
Git Re-Basin way. Used by the matching tests as the reference and by the benchmarks as the
baseline. It follows the same documented rules as starfast.matching (group order from
``torch.randperm(G, generator=Generator().manual_seed(seed))`` each sweep, accept a group's new
assignment only if it strictly improves, stop after a sweep with no change)."""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def match_one(target: dict, source: dict, spec, seed: int = 0, max_iter: int = 100):
    """Returns (perm, sweeps) aligning ``source`` (name -> tensor) to ``target``."""
    groups = [g for g in spec.groups if any(axis.name in target for axis in g.axes)]
    perm = {g.name: torch.arange(g.size) for g in spec.groups}
    order_rng = torch.Generator().manual_seed(seed)
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        changed = False
        for gi in torch.randperm(len(groups), generator=order_rng).tolist():
            group = groups[gi]
            cost = np.zeros((group.size, group.size))
            for axis in group.axes:
                if axis.name not in target:
                    continue
                b = source[axis.name]
                for other, other_group in spec.axes_of(axis.name):
                    if other_group == group.name:
                        continue
                    segment = b.narrow(other.axis, other.offset, spec.group(other_group).size)
                    b = b.clone()
                    b.narrow(other.axis, other.offset, segment.shape[other.axis]).copy_(
                        segment.index_select(other.axis, perm[other_group])
                    )
                a = target[axis.name].narrow(axis.axis, axis.offset, group.size).movedim(axis.axis, 0)
                b = b.narrow(axis.axis, axis.offset, group.size).movedim(axis.axis, 0)
                cost += (a.reshape(group.size, -1).double() @ b.reshape(group.size, -1).double().T).numpy()
            rows, cols = linear_sum_assignment(cost, maximize=True)
            old = cost[np.arange(group.size), perm[group.name].numpy()].sum()
            new = cost[rows, cols].sum()
            if new - old > 1e-12 * max(1.0, abs(old)):
                perm[group.name] = torch.from_numpy(cols).long()
                changed = True
        if not changed:
            break
    return perm, sweeps
