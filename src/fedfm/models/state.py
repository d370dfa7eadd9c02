"""`TrainableState`: the ordered ``name -> tensor`` of exactly the shared parameters; the only model data that moves."""
from __future__ import annotations

from collections import OrderedDict

import torch

TrainableState = "OrderedDict[str, torch.Tensor]"


def matches(name: str, patterns: list[str]) -> bool:
    """A parameter belongs to a pattern when the pattern is one of the dot-separated parts of its name
    (``classifier``, ``lora_B``) or a dotted run of them (``encoder.layer.0``)."""
    padded = f".{name}."
    return any(f".{p.strip('.')}." in padded for p in patterns)


class Layout:
    """Names, shapes and the flat layout of a trainable state, without a model: what the server side knows of it."""

    def __init__(self, shapes: "dict[str, tuple[int, ...]]"):
        self.names = list(shapes)
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes.values()]
        self.numel = sum(self.numels)

    def layout(self) -> "Layout":
        """The names and shapes alone (no parameters): what a server side is built from."""
        return Layout(self.shapes)

    def flatten(self, state) -> torch.Tensor:
        if not self.names:
            return torch.zeros(0)
        return torch.cat([state[n].reshape(-1).float() for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        parts = torch.split(flat, self.numels)
        return OrderedDict((n, t.view(self.shapes[n])) for n, t in zip(self.names, parts))


class StateSpec(Layout):
    """The layout of a model's trainable parameters, bound to them (computed once per run).

    With ``personal`` patterns, ``StateSpec(model, personal)`` holds the shared parameters (those matching none)
    and ``StateSpec(model, personal, shared=False)`` the personal ones (those that stay on the client).
    """

    def __init__(self, model: torch.nn.Module, personal: list[str] | None = None, shared: bool = True):
        personal = personal or []
        self.params: "OrderedDict[str, torch.nn.Parameter]" = OrderedDict(
            (n, p) for n, p in model.named_parameters() if p.requires_grad and matches(n, personal) != shared
        )
        super().__init__({n: tuple(p.shape) for n, p in self.params.items()})

    def get(self) -> "OrderedDict[str, torch.Tensor]":
        """A detached copy of the current trainable values, on the CPU (where states are encoded and compared)."""
        return OrderedDict((n, p.detach().to("cpu", copy=True)) for n, p in self.params.items())

    @torch.no_grad()
    def load(self, state: "OrderedDict[str, torch.Tensor] | dict[str, torch.Tensor]") -> None:
        """Copy ``state`` into the model in place (no new model, no new parameters)."""
        for n, p in self.params.items():
            p.copy_(state[n])

    def flat(self) -> torch.Tensor:
        if not self.params:
            return torch.zeros(0)
        return torch.cat([p.detach().reshape(-1) for p in self.params.values()]).float().cpu()

    @torch.no_grad()
    def load_flat(self, flat: torch.Tensor) -> None:
        """Copy a flat (CPU) vector into the parameters, wherever they live (one transfer for a GPU model)."""
        if not self.params:
            return
        flat = flat.to(next(iter(self.params.values())).device)
        torch._foreach_copy_(list(self.params.values()), list(self.unflatten(flat).values()))

