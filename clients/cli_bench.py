"""`kmserve bench NAME [ARGS...]`: run a benchmark (its own options follow the name).

Each benchmark prints JSON and writes it (and, with --plot where offered, a PNG) under bench/results/.
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

BENCHMARKS = {
    "serve": "bench.serve", "train-step": "bench.train_step", "queue": "bench.queue", "retrieval": "bench.retrieval",
    "load": "bench.load", "faults": "bench.faults",
}
NameArg = Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCHMARKS)}.")]


def register(app: typer.Typer) -> None:
    """Add the `bench` command to the CLI."""

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def bench(ctx: typer.Context, name: NameArg) -> None:
        """Run a benchmark: serve, train-step, queue, retrieval, load or faults (`kmserve bench load --short --plot`).

        Options after the name go to the benchmark; `python -m bench.<name> --help` lists them.
        """
        module = BENCHMARKS.get(name)
        if module is None:
            raise typer.BadParameter(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
        importlib.import_module(module).main(list(ctx.args))
