"""Exact output laws of the samplers in tinydiff/sampling.py, by enumeration on a Toy (tests/harness.py).

Each function propagates a distribution over the (V+1)^L partial states (token V = mask) step by step
with its own, independent reading of the sampler's rule, and returns (N,) float64 aligned with
Toy.seqs (plus the expected NFE where the sampler's NFE is random). No code is shared with the
samplers except the knobs' filtering (harness._masked_probs, i.e. tinydiff.sampling.filter_logits) and,
for remdm, its documented per-step (p_reveal, sigma) table, which tests check by hand separately.
"""
import itertools
import math

import torch

from harness import _masked_probs, exact_sampler_law


def _setup(model, toy, knobs):
    V, L, m = toy.V, toy.L, toy.mask_id
    states = toy.states()  # (S, L)
    logits = model(states).double()  # (S, L, V+1)
    q = _masked_probs(logits.reshape(-1, V + 1), m, **knobs).view(len(states), L, -1)[..., :V]  # what is drawn
    p = _masked_probs(logits.reshape(-1, V + 1), m).view(len(states), L, -1)[..., :V]  # the model's own probs
    greedy = logits[..., :V].argmax(-1)  # (S, L): the final greedy pass
    return states, q, p, greedy


def _to_seqs(toy, P, states, greedy=None):
    """A distribution over states -> over sequences (masks left are filled by `greedy`)."""
    final = states if greedy is None else torch.where(states == toy.mask_id, greedy, states)
    out = torch.zeros(toy.N, dtype=torch.float64)
    done = (final != toy.mask_id).all(1)
    assert P[~done].sum() < 1e-12, "mass left on partial states"
    return out.index_add_(0, toy.index(final[done]), P[done])


def _plackett_luce(weights, c):
    """{frozenset of c indices: probability} of drawing c items without replacement with prob ∝ weights."""
    out = {}
    for order in itertools.permutations(range(len(weights)), c):
        prob, left = 1.0, sum(weights)
        for i in order:
            prob *= weights[i] / left
            left -= weights[i]
        out[frozenset(order)] = out.get(frozenset(order), 0.0) + prob
    return out


def _order_law(model, toy, steps, select, init=None, **knobs):
    """Law of an order-based sampler: every step that has masks draws a token at each masked position
    from q, then reveals the positions `select(k, conf, masked)` picks (a dict {positions: prob});
    conf = the model's own log-probability of each drawn token. Returns (law, expected NFE)."""
    states, q, p, _ = _setup(model, toy, knobs)
    P = torch.zeros(len(states), dtype=torch.float64)
    P[toy.state_index(init if init is not None else torch.full((toy.L,), toy.mask_id))] = 1.0
    nfe = 0.0
    for k in range(steps):
        new = torch.zeros_like(P)
        for s in P.nonzero().flatten().tolist():
            z = states[s]
            masked = [i for i in range(toy.L) if z[i] == toy.mask_id]
            if not masked:
                new[s] += P[s]
                continue
            nfe += P[s].item()
            for combo in itertools.product(range(toy.V), repeat=len(masked)):
                pc = math.prod(q[s, i, v].item() for i, v in zip(masked, combo))
                if pc == 0:
                    continue
                conf = [p[s, i, v].log().item() for i, v in zip(masked, combo)]
                for chosen, ps in select(k, conf, masked).items():
                    z2 = z.clone()
                    for j in chosen:
                        z2[masked[j]] = combo[j]
                    new[toy.state_index(z2)] += P[s] * pc * ps
        P = new
    return _to_seqs(toy, P, states), nfe


def counts_per_step(n_free, steps, schedule, eps):
    """Positions the confidence sampler reveals at each step: keep round(n_free (1 - a(t_{k+1})) / (1 - a(1)))
    masked after step k (ancestral's expectation), none after the last."""
    ts = [1 - k * (1 - eps) / steps for k in range(steps + 1)]
    a = [schedule.alpha(t) for t in ts]
    left = [n_free] + [math.floor(n_free * (1 - a[k + 1]) / (1 - a[0]) + 0.5) for k in range(steps - 1)] + [0]
    return [left[k] - left[k + 1] for k in range(steps)]


def confidence_law(model, toy, steps, gumbel=0.0, eps=1e-5, init=None, **knobs):
    from tinydiff.diffusion import LogLinearSchedule
    n_free = toy.L if init is None else int((init == toy.mask_id).sum())
    counts = counts_per_step(n_free, steps, LogLinearSchedule(), eps)

    def select(k, conf, masked):
        c, scale = counts[k], gumbel * (1 - (k + 1) / steps)
        if scale > 0:  # Gumbel-top-c of log p / scale = Plackett-Luce with weights p^(1/scale)
            return _plackett_luce([math.exp(x / scale) for x in conf], c)
        ranked = sorted(range(len(conf)), key=lambda j: (-conf[j], j))  # ties: the lower position first
        return {frozenset(ranked[:c]): 1.0}
    return _order_law(model, toy, steps, select, init, **knobs)[0]


def threshold_law(model, toy, steps, tau, init=None, **knobs):
    """(law, expected NFE of one sequence) of the threshold sampler with budget `steps`."""
    def select(k, conf, masked):
        if k == steps - 1:
            return {frozenset(range(len(conf))): 1.0}
        best = max(range(len(conf)), key=lambda j: (conf[j], -j))
        return {frozenset(j for j in range(len(conf)) if math.exp(conf[j]) >= tau) | {best}: 1.0}
    return _order_law(model, toy, steps, select, init, **knobs)


def remdm_law(model, toy, plan, init=None, **knobs):
    """Law of the remasking sampler for a per-step plan [(p_reveal, sigma)] (cap / rescale / loop):
    masked -> token v w.p. p_reveal q(v), else stays masked; unmasked free -> mask w.p. sigma;
    clamped (unmasked in init) never change; masks left at the end: greedy fill."""
    states, q, _, greedy = _setup(model, toy, knobs)
    S, L, m = len(states), toy.L, toy.mask_id
    init = init if init is not None else torch.full((L,), m)
    clamped = init != m
    P = torch.zeros(S, dtype=torch.float64)
    P[toy.state_index(init)] = 1.0
    for p_reveal, sigma in plan:
        T = torch.ones(S, S, dtype=torch.float64)
        for i in range(L):
            a, b = states[:, i, None], states[None, :, i]  # digit of s, digit of s'
            q_b = q[:, i, :].gather(1, b.clamp(max=toy.V - 1).expand(S, S))  # q_i(s'_i | s)
            from_masked = torch.where(b == m, 1 - p_reveal, p_reveal * q_b)
            keep = (a == b).double()
            from_clean = keep if clamped[i] else torch.where(b == m, sigma, (1 - sigma) * keep)
            T *= torch.where(a == m, from_masked, from_clean)
        P = P @ T
    return _to_seqs(toy, P, states, greedy)


def semi_ar_law(model, toy, N, W, block, steps, eps=1e-5, prompt=(), **knobs):
    """Law over V^N of semi_ar with the ancestral sampler inside, after a clamped prompt (a tuple of P tokens):
    blocks [a, e) left to right from P, each sampled with max(1, round(steps (e - a) / (N - P))) steps in the
    window [max(0, e - W), .. + W) that shows the earlier tokens and masks after the block.
    Returns {sequence tuple: prob}."""
    m, V, P = toy.mask_id, toy.V, len(prompt)
    law = {tuple(prompt): 1.0}
    for a in range(P, N, block):
        e = min(a + block, N)
        s, k = max(0, e - W), max(1, round(steps * (e - a) / (N - P)))
        new = {}
        for prefix, pr in law.items():
            def block_probs(z, prefix=prefix):  # (n, e - a) block states -> the model's logits there
                w = torch.full((len(z), W), m, dtype=torch.long)
                w[:, :a - s] = torch.tensor(prefix[s:a], dtype=torch.long)
                w[:, a - s:e - s] = z
                return model(w)[:, a - s:e - s]
            q = exact_sampler_law(block_probs, k, V, e - a, m, eps=eps, **knobs)  # (V^(e-a),)
            for idx, x in enumerate(itertools.product(range(V), repeat=e - a)):
                if q[idx] > 0:
                    new[prefix + x] = new.get(prefix + x, 0.0) + pr * q[idx].item()
        law = new
    return law


def compare(K_list=(1, 2, 4, 8, 16, 64), seed=0):
    """Every sampler's exact law on Toy(V=3, L=4, seed) with the exact posterior as denoiser (the oracle):
    TV to the table, true cross-entropy E_law[-log p(x)] - H(p), entropy of the law - H(p), and NFE
    for the samplers whose NFE is deterministic (confidence: steps that reveal) or exactly known (threshold:
    expected, one sequence); ancestral's and remdm's NFE (cache) is left out."""
    from harness import OracleDenoiser, Toy, tv
    from tinydiff.diffusion import LogLinearSchedule
    from tinydiff.sampling import remdm_plan
    toy = Toy(V=3, L=4, seed=seed)
    oracle = OracleDenoiser(toy)
    H = toy.entropy()
    rows = []
    for K in K_list:
        n_conf = sum(c > 0 for c in counts_per_step(toy.L, K, LogLinearSchedule(), 1e-5))
        laws = {"ancestral": (exact_sampler_law(oracle, K, toy.V, toy.L, toy.mask_id), None),
                "confidence (greedy order)": (confidence_law(oracle, toy, K), n_conf),
                "confidence gumbel=1": (confidence_law(oracle, toy, K, gumbel=1.0), n_conf),
                "threshold tau=0.9 (budget K)": threshold_law(oracle, toy, K, 0.9),
                "threshold tau=0.5 (budget K)": threshold_law(oracle, toy, K, 0.5)}
        for remask, eta in [("cap", 0.02), ("cap", 0.3), ("loop", 0.02)]:
            plan = remdm_plan(K, LogLinearSchedule(), 1e-5, remask, eta, 0.55, 0.05, 0.9)
            laws[f"remdm {remask} eta={eta}"] = (remdm_law(oracle, toy, plan), None)
        sar = semi_ar_law(oracle, toy, toy.L, toy.L, 2, K)
        laws["semi_ar block=2 (ancestral)"] = (torch.tensor([sar.get(tuple(s), 0.0) for s in toy.seqs.tolist()]), None)
        for name, (q, nfe) in laws.items():
            ce = -(q * toy.p.log()).sum().item()
            ent = -(q[q > 0] * q[q > 0].log()).sum().item()
            rows.append((name, K, tv(q, toy.p), ce - H, ent - H, nfe))
    print(f"Toy(V=3, L=4, seed={seed}): H(p) = {H:.4f} nats; denoiser = the exact posterior marginals")
    print(f"| {'sampler':<30} | {'K':>3} | {'NFE':>5} | {'TV(law, p)':>10} | {'CE - H':>8} | {'H(law) - H':>10} |")
    print("|" + "---|" * 6)
    for name, K, d, ce, ent, nfe in rows:
        print(f"| {name:<30} | {K:>3} | {'-' if nfe is None else format(nfe, '.2f'):>5} | {d:>10.4f} | {ce:>8.4f} | "
              f"{ent:>10.4f} |")
    return rows


if __name__ == "__main__":  # python tests/sampler_laws.py: the exact comparison table of docs/samplers.md
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    compare()
