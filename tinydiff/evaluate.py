"""Evaluation functions used by train.py, eval.py and bench.py (design.md §8)."""
import math

import torch
import torch.nn.functional as F

from .diffusion import LogLinearSchedule, val_bound


@torch.no_grad()
def ar_nll(model, val_x, batch_size=32, autocast=None):
    """Mean next-token NLL (nats) of an AR model on windows val_x (N, L+1): predicts tokens 1..L."""
    total, count = torch.zeros((), dtype=torch.float64, device=val_x.device), 0
    for i in range(0, len(val_x), batch_size):
        x = val_x[i:i + batch_size]  # (b, L+1)
        with autocast():
            logits = model(x[:, :-1])  # (b, L, V)
        total += F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").double()
        count += x[:, 1:].numel()
    return total.item() / count


def val_metrics(model, kind, val_x, mask_id=None, draws=2, seed=0, batch_size=32, autocast=None):
    """{"val_loss", "val_ppl"}: AR exact NLL; MDLM the NELBO bound (an upper bound on its NLL).
    val_x: (N, L+1) windows for AR, (N, L) for MDLM (see val_window_len)."""
    if kind == "ar":
        nats = ar_nll(model, val_x, batch_size, autocast)
    else:
        nats = val_bound(model, val_x, LogLinearSchedule(), mask_id, draws, seed, batch_size, autocast=autocast)
    return {"val_loss": nats, "val_ppl": math.exp(min(nats, 700.0))}


def val_window_len(kind, seq_len):
    """An AR model needs one extra token of context to predict all seq_len held-out tokens."""
    return seq_len + 1 if kind == "ar" else seq_len
