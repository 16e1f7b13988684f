"""k-reciprocal re-ranking reference, and the golden file for the engine's re-ranking test.

Usage (from the repository root):  python3 tools/rerank_reference.py [--out tests/fixtures]

`re_ranking` is the algorithm of Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding" (CVPR 2017), in the form reid-strong-baseline and fast-reid use (TEST.RERANK:
k1 20, k2 6, lambda 0.3): squared Euclidean distances over query + gallery, each row divided by its
maximum, k-reciprocal neighbour sets expanded by their members' k1/2-reciprocal sets, Gaussian
weights exp(-d), local query expansion over the k2 nearest rows, Jaccard distance, and
lambda * d + (1 - lambda) * Jaccard. Written in float64 with dense arrays for clarity (the
published code stores V in float16 to save memory); the engine's version is sparse.

Writes tests/fixtures/rerank_small.safetensors: `qf` [24, 16] and `gf` [90, 16] (f32; 12 identities,
features = identity centre + noise, so neighbourhoods mean something), their identities `q_pids`
and `g_pids` (I64), and for two settings `dist.<k1>_<k2>_<lambda>` [24, 90]: the re-ranked query x
gallery distances. The seed is chosen so that no rank cut of the algorithm is within 1e-4 and no
two re-ranked distances of a query within 1e-6 (relative to the row maximum) of a tie: an f32
engine then picks the same neighbour sets and the same ranking.
"""

import argparse
import os

import numpy as np
import torch
from safetensors.torch import save_file

SETTINGS = ((20, 6, 0.3), (5, 3, 0.5))  # fast-reid's default; an odd k1 (round(2.5) = 2) and other k2, lambda


def squared_distances(feat):
    sq = (feat**2).sum(1)
    return sq[:, None] + sq[None, :] - 2 * feat @ feat.T


def k_reciprocal(rank, i, k):
    """The members of i's k+1 nearest (itself included) that have i among their own k+1 nearest."""
    forward = rank[i, : k + 1]
    return np.array([c for c in forward if i in rank[c, : k + 1]], dtype=np.int64)


def re_ranking(qf, gf, k1, k2, lam):
    feat = np.concatenate([qf, gf]).astype(np.float64)
    nq, n = len(qf), len(feat)
    dist = squared_distances(feat)
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")
    half = int(np.around(k1 / 2.0))
    v = np.zeros((n, n))
    for i in range(n):
        recip = k_reciprocal(rank, i, k1)
        expansion = list(recip)
        for c in recip:
            cand = k_reciprocal(rank, c, half)
            if len(np.intersect1d(cand, recip)) > 2.0 / 3 * len(cand):
                expansion.extend(cand)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        v[i, expansion] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((nq, n))
    for i in range(nq):
        common = np.minimum(v[i][None, :], v).sum(axis=1)
        jaccard[i] = 1 - common / (2 - common)
    return (jaccard * (1 - lam) + dist[:nq] * lam)[:, nq:]


def min_rank_gap(qf, gf, k1, k2):
    """Smallest relative gap, over rows, between the distances on either side of each cut the
    algorithm makes in a sorted row (k1 + 1, round(k1 / 2) + 1, k2): an f32 engine ranks the same
    neighbours only if this is well above f32 error."""
    feat = np.concatenate([qf, gf]).astype(np.float64)
    dist = np.sort(squared_distances(feat), axis=1)
    scale = dist[:, -1:]
    cuts = sorted({k1 + 1, int(np.around(k1 / 2.0)) + 1, k2})
    return min(((dist[:, c] - dist[:, c - 1]) / scale[:, 0]).min() for c in cuts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures")
    args = parser.parse_args()
    ids, nq, ng, dim = 12, 24, 90, 16
    for seed in range(1000):
        rng = np.random.default_rng(20261124 + seed)
        centres = rng.normal(size=(ids, dim))
        q_ids = np.arange(nq, dtype=np.int64) % ids
        g_ids = rng.integers(0, ids, size=ng, dtype=np.int64)
        qf = (centres[q_ids] + 0.6 * rng.normal(size=(nq, dim))).astype(np.float32)
        gf = (centres[g_ids] + 0.6 * rng.normal(size=(ng, dim))).astype(np.float32)
        gap = min(min_rank_gap(qf, gf, k1, k2) for k1, k2, _ in SETTINGS)
        if gap <= 1e-4:
            continue
        finals = {s: re_ranking(qf, gf, *s) for s in SETTINGS}
        ranking_gap = min((np.diff(np.sort(f, axis=1), axis=1) / f.max(axis=1, keepdims=True)).min() for f in finals.values())
        if ranking_gap > 1e-6:
            break
    else:
        raise SystemExit("no seed with clear rank cuts")
    tensors = {"qf": torch.from_numpy(qf), "gf": torch.from_numpy(gf), "q_pids": torch.from_numpy(q_ids), "g_pids": torch.from_numpy(g_ids)}
    for k1, k2, lam in SETTINGS:
        final = finals[(k1, k2, lam)]
        plain = squared_distances(np.concatenate([qf, gf]).astype(np.float64))[:nq, nq:]
        changed = (np.argsort(final, axis=1)[:, :5] != np.argsort(plain, axis=1)[:, :5]).mean()
        print(f"k1 {k1} k2 {k2} lambda {lam}: top-5 order changed in {100 * changed:.0f}% of positions")
        tensors[f"dist.{k1}_{k2}_{lam}"] = torch.from_numpy(final.astype(np.float32))
    meta = {"generator": "tools/rerank_reference.py", "seed": str(20261124 + seed), "min_rank_cut_gap": f"{gap:.2e}", "min_ranking_gap": f"{ranking_gap:.2e}"}
    path = os.path.join(args.out, "rerank_small.safetensors")
    save_file(tensors, path, metadata=meta)
    print(f"wrote {path} (seed {20261124 + seed}; smallest relative gaps: rank cuts {gap:.1e}, re-ranked distances {ranking_gap:.1e})")


if __name__ == "__main__":
    main()
