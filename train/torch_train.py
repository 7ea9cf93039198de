"""The same optimisation in PyTorch: `torch_ref` + `torch.optim`, for parity tests and benchmarks.

`torch_optimizer` mirrors `train.step.make_optimizer` for AdamW: the same schedule (the optax
function, evaluated per step), decoupled weight decay on the same tensors (the weights of the
linear and convolution layers and the token table), the same global-norm clipping.
`torch_train_step` is one update.
"""

from __future__ import annotations

import torch

from train.config import TrainConfig
from train.step import learning_rate_schedule


def decayed_names(model: torch.nn.Module) -> set[str]:
    """The torch twin of `train.step.decay_mask`: the `weight` of every Linear, Conv1d and Embedding
    (the layers whose flax leaves are `kernel` and `embedding`)."""
    from torch_ref.layers import Conv1d, Embedding, Linear

    return {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, Linear | Conv1d | Embedding)
    }


def torch_optimizer(model: torch.nn.Module, config: TrainConfig):
    """(AdamW, LambdaLR) over `model`'s parameters, as `make_optimizer(config)` does in optax."""
    if config.optimizer != "adamw":
        raise ValueError("the torch mirror covers AdamW only")
    named, decayed = list(model.named_parameters()), decayed_names(model)
    groups = [
        {"params": [p for n, p in named if n in decayed], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
    ]
    # lr=1 scaled by the schedule: the optax schedule gives the learning rate itself.
    optimizer = torch.optim.AdamW(groups, lr=1.0, betas=(config.b1, config.b2), eps=config.eps)
    schedule = learning_rate_schedule(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(schedule(step)))
    return optimizer, scheduler


def torch_train_step(model, optimizer, scheduler, mel, labels, clip_norm: float | None) -> float:
    """One AdamW update on the teacher-forcing loss; returns the loss before it."""
    optimizer.zero_grad(set_to_none=True)
    loss = model.loss(torch.as_tensor(mel), torch.as_tensor(labels, dtype=torch.long))
    loss.backward()
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())
