"""Knowledge transfer between different models through their predictions on a public set (FedMD, Li & Wang 2019;
FedDF, Lin et al. 2020): no weight crosses, only logits of the public rows.

The distillation loss is Hinton et al.'s (2015), which FedDF uses for its ensemble distillation::

    L_KD(z_s, z_t) = T² · (1/P) Σ_p KL( softmax(z_t,p / T) ‖ softmax(z_s,p / T) )

z_s the student's logits, z_t the teacher's (the consensus, or what the server sends back), T the temperature, the
T² keeping the gradient's scale independent of T. The consensus of the clients' logits on the public set is their
mean (FedMD's "Aggregate", FedDF's averaged logits), ``consensus``.

What travels is ``pack``ed logits: the [P, C] values cast to fp32, fp16 or bf16, raw bytes in row order, no header
(both sides know P, the public rows, and C, the classes), so a message is exactly P × C × bytes-per-value.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UpdateRejected

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T² · mean over rows of KL(softmax(teacher/T) ‖ softmax(student/T)); the teacher is a target (no gradient)."""
    log_q = F.log_softmax(student.float() / T, dim=-1)
    log_p = F.log_softmax(teacher.detach().float() / T, dim=-1)
    return (T * T) * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def consensus(logits: list[torch.Tensor]) -> torch.Tensor:
    """The ensemble's logits on the public set: the clients' mean (fp32)."""
    return torch.stack([z.float() for z in logits]).mean(0)


def pack(logits: torch.Tensor, codec: str) -> bytes:
    """[P, C] logits as raw bytes of the codec's cast (``codec.name``: fp32, fp16 or bf16), row-major, no header."""
    t = logits.detach().to("cpu", DTYPES[codec]).contiguous()
    return t.view(torch.uint8).numpy().tobytes()


def unpack(data: bytes, shape: tuple[int, int], codec: str) -> torch.Tensor:
    """Logits from ``pack``'s bytes, checked: exactly P × C values of the codec's cast, all finite; fp32 out."""
    dtype = DTYPES[codec]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    want = shape[0] * shape[1] * itemsize
    if len(data) != want:
        raise UpdateRejected(f"logits: {len(data)} bytes, expected {shape[0]} public rows × {shape[1]} classes × "
                             f"{itemsize} bytes ({codec}) = {want}")
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if want else torch.zeros(0, dtype=torch.uint8)
    z = raw.view(dtype).reshape(shape).float()
    if not torch.isfinite(z).all():
        raise UpdateRejected("logits: non-finite values")
    return z


def _ordered(task, enc: dict[str, torch.Tensor], rows: np.ndarray, batch_size: int) -> Iterator[tuple[slice, dict]]:
    """Batches of ``rows`` in their given order (``Task.batches`` sorts evaluation rows by length), without labels:
    the public set's labels are never used."""
    public = {k: v for k, v in enc.items() if k != "labels"}
    idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    for i in range(0, len(idx), batch_size):
        yield slice(i, i + batch_size), task.collate(public, idx[i:i + batch_size])


@torch.no_grad()
def public_logits(model, task, enc: dict[str, torch.Tensor], rows: np.ndarray, batch_size: int) -> torch.Tensor:
    """The model's [P, C] logits on the public rows, in row order (fp32, on the CPU)."""
    was_training = model.training
    model.eval()
    out = []
    for _, batch in _ordered(task, enc, rows, batch_size):
        with task.autocast():
            out.append(model(**batch).logits.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def distill(model, params: list[torch.nn.Parameter], task, enc: dict[str, torch.Tensor], rows: np.ndarray,
            teacher: torch.Tensor, T: float, steps: int, lr: float, batch_size: int, generator: torch.Generator,
            grad_clip: float | None = None) -> float:
    """``steps`` AdamW steps on ``params`` of L_KD(model's logits, ``teacher``) over random mini-batches of the
    public rows (``teacher[p]`` the target of ``rows[p]``); returns the mean loss of the steps (0 steps: nan)."""
    if steps <= 0 or not len(rows):
        return float("nan")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    public = {k: v for k, v in enc.items() if k != "labels"}
    rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    teacher = teacher.float()
    model.train()
    total = 0.0
    for _ in range(steps):
        pick = torch.randperm(len(rows), generator=generator)[:batch_size]
        batch = task.collate(public, rows[pick])
        with task.autocast():
            logits = model(**batch).logits
        loss = kd_loss(logits, teacher[pick].to(logits.device), T)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total += float(loss.detach())
    return total / steps


def kl_to(model, task, enc: dict[str, torch.Tensor], rows: np.ndarray, teacher: torch.Tensor, T: float,
          batch_size: int) -> float:
    """L_KD of the model's logits on the public rows against ``teacher`` (how far the student is from it)."""
    return float(kd_loss(public_logits(model, task, enc, rows, batch_size), teacher, T))
