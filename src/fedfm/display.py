"""What a run shows while it runs: callbacks a CLI implements; this base shows nothing."""
from __future__ import annotations


class Display:
    """Callbacks the loop calls so a CLI can show progress; this base shows nothing."""

    def partition(self, desc: dict) -> None: ...
    def model(self, info: dict) -> None: ...
    def round_start(self, rnd: int, total: int, n_clients: int) -> None: ...
    def client_done(self, result) -> None: ...
    def round_end(self, row: dict) -> None: ...
    def message(self, text: str) -> None: ...


class Displays(Display):
    """Several displays as one: every callback goes to each, in order (a terminal, a tracker, a user's callback)."""

    def __init__(self, *displays: Display):
        self.displays = [d for d in displays if d is not None]

    def partition(self, desc: dict) -> None:
        for d in self.displays:
            d.partition(desc)

    def model(self, info: dict) -> None:
        for d in self.displays:
            d.model(info)

    def round_start(self, rnd: int, total: int, n_clients: int) -> None:
        for d in self.displays:
            d.round_start(rnd, total, n_clients)

    def client_done(self, result) -> None:
        for d in self.displays:
            d.client_done(result)

    def round_end(self, row: dict) -> None:
        for d in self.displays:
            d.round_end(row)

    def message(self, text: str) -> None:
        for d in self.displays:
            d.message(text)
