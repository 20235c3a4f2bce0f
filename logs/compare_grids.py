"""The sweep's grids, without running anything: a grid is {(method, rho): [learning rates]} (rho is
None for a method without rows), scores are {(method, rho, lr): final val bits/char}. Used by
logs/compare_optimizers.py (to extend the grids) and logs/compare_report.py (to mark a winner on an
edge)."""


def best_point(grids, scores, method):
    """(rho, lr, score) with the lowest score among the method's rows (the points that have one)."""
    points = [(rho, lr, scores[(m, rho, lr)]) for (m, rho), lrs in grids.items() if m == method
              for lr in lrs if (m, rho, lr) in scores]
    return min(points, key=lambda p: p[2])


def rhos_of(grids, method):
    return sorted(rho for m, rho in grids if m == method)


def on_edge(grids, method, rho, lr):
    """Whether (rho, lr) is on an edge of the method's grid: its lr at an end of its row, or (when
    the method has rows) its rho the smallest or largest one."""
    lrs = grids[(method, rho)]
    rhos = rhos_of(grids, method)
    return lr in (lrs[0], lrs[-1]) or (rho is not None and len(rhos) > 0 and rho in (rhos[0], rhos[-1]))


def extend(grids, scores):
    """Grow every row whose best lr is at an end by a factor 2 on that side, and add a rho row
    (x2 or /2) beside a best rho that is the smallest or largest, with its neighbour's grid scaled
    by the rho ratio (which keeps the unclipped step lr / rho). Returns whether anything grew."""
    grown = False
    for (method, rho), lrs in list(grids.items()):
        best = min(lrs, key=lambda lr: scores[(method, rho, lr)])
        if best == lrs[0]:
            lrs.insert(0, lrs[0] / 2)
            grown = True
        if best == lrs[-1]:  # a one-value grid grows both ways
            lrs.append(lrs[-1] * 2)
            grown = True
    for method in {m for m, rho in grids if rho is not None}:
        rhos = rhos_of(grids, method)
        best_rho = best_point(grids, scores, method)[0]
        for edge, factor in ((rhos[0], 0.5), (rhos[-1], 2.0)):
            if best_rho == edge:
                row = [lr for lr in grids[(method, edge)] if (method, edge, lr) in scores]
                grids[(method, edge * factor)] = sorted(lr * factor for lr in row)
                grown = True
    return grown
