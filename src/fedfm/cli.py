"""``fedfm`` command line: run, configs, report, export."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .display import Display
from .errors import FedfmError

app = typer.Typer(add_completion=False, no_args_is_help=False, help="fedfm: federated fine-tuning of foundation models.")
console = Console(highlight=False)


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(str(err))}", soft_wrap=True)  # a message's [...] is text
    raise typer.Exit(code=getattr(err, "exit_code", 2))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class RichDisplay(Display):
    """The run's header and partition table, progress bars (rounds, and clients inside a round) once rounds start, one
    line per round."""

    def __init__(self, cfg):
        self.name, self.path = cfg.name, cfg.output_dir()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.rounds = self.progress.add_task("rounds ", total=cfg.federation.rounds)
        self.clients = self.progress.add_task("clients", total=1, visible=False)
        self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.progress.stop()

    def partition(self, desc: dict) -> None:
        console.print(f"[bold]fedfm[/bold] run [cyan]{escape(self.name)}[/cyan] → {escape(str(self.path))}")
        names = desc.get("label_names")
        t = Table(title=f"partition: {desc['method']}, {desc['num_clients']} clients, test set {desc.get('test_size')}")
        t.add_column("client")
        t.add_column("train", justify="right")
        t.add_column("test", justify="right")
        if names:
            for n in names:
                t.add_column(escape(str(n)[:12]), justify="right")
        for c in desc["clients"][:50]:
            cells = [escape(str(c["name"])), str(c["n_train"]), str(c["n_test"])]
            if names and c.get("label_counts"):
                cells += [str(x) for x in c["label_counts"]]
            t.add_row(*cells)
        if len(desc["clients"]) > 50:
            t.caption = f"… {len(desc['clients']) - 50} more clients in partition.json"
        console.print(t)

    def model(self, info: dict) -> None:
        console.print(f"model ready in {info['seconds']:.1f}s: {info['method']} trains and shares "
                      f"{info['trainable']:,} of {info['total']:,} parameters "
                      f"({100 * info['trainable'] / max(info['total'], 1):.2f}%)")

    def round_start(self, rnd: int, total: int, n_clients: int) -> None:
        if not self.started:  # the bars appear once training starts (a resumed run's first round is not 1)
            self.progress.start()
            self.started = True
        self.progress.update(self.rounds, completed=rnd - 1)
        self.progress.reset(self.clients, total=n_clients, visible=True, description=f"round {rnd} clients")

    def client_done(self, result) -> None:
        self.progress.advance(self.clients)

    def round_end(self, row: dict) -> None:
        parts = [f"round {row['round']:>3}"]
        for key, label in (("eval_accuracy", "acc"), ("eval_loss", "eval loss"), ("eval_perplexity", "ppl"),
                           ("fed_accuracy", "federated acc"), ("fed_loss", "federated loss"),
                           ("train_loss", "train loss"), ("client_acc_worst10", "worst-10% client acc")):
            if row.get(key) is not None:
                parts.append(f"{label} {row[key]:.4f}")
        if "bytes_up" in row:
            parts.append(f"up {_fmt_bytes(row['bytes_up'])} down {_fmt_bytes(row['bytes_down'])}")
        parts.append(f"{row.get('wall_s', 0):.1f}s")
        if "staleness" in row:  # fedbuff: one row per server step
            parts.append(f"sim {row['sim_time_s']:.0f}s staleness {row['staleness']}")
        if row.get("dropped"):
            parts.append(f"[yellow]dropped {len(row['dropped'])}[/yellow]")
        self.progress.console.print(" | ".join(parts))
        if row["round"] > 0:
            self.progress.update(self.rounds, completed=row["round"])
        self.progress.update(self.clients, visible=False)

    def message(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{escape(text)}[/yellow]", soft_wrap=True)


def _summary_table(rows: list[dict[str, Any]], total_s: float) -> Table:
    t = Table(title="summary")
    t.add_column("metric")
    t.add_column("final", justify="right")
    t.add_column("best", justify="right")
    scored = ("eval_", "fed_", "fm_")  # fm_: the server's foundation model under fedmd
    evals = [r for r in rows if any(k.startswith(scored) for k in r)]
    keys = sorted({k for r in evals for k, v in r.items()
                   if k.startswith((*scored, "client_")) and isinstance(v, float)})
    for k in keys:
        vals = [r[k] for r in evals if isinstance(r.get(k), float)]
        best = min(vals) if ("loss" in k or "perplexity" in k) else max(vals)
        t.add_row(k, f"{vals[-1]:.4f}", f"{best:.4f}")
    train = [r for r in rows if r["round"] > 0]
    t.add_row("rounds", str(len(train)), "")
    t.add_row("bytes up (total)", _fmt_bytes(sum(r.get("bytes_up", 0) for r in train)), "")
    t.add_row("bytes down (total)", _fmt_bytes(sum(r.get("bytes_down", 0) for r in train)), "")
    t.add_row("dropped client updates", str(sum(len(r.get("dropped", [])) for r in train)), "")
    t.add_row("wall time", f"{total_s:.1f} s", "")
    return t


@app.command("run")
def run_cmd(
    config: str = typer.Argument("bbc-lora", help="a built-in config name (see `fedfm configs`) or a YAML file"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved config and exit"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this run directory"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run directory"),
    dashboard: bool = typer.Option(False, "--dashboard", help="serve a live page of the run while it runs "
                                                               "(pip install \"fedfm\\[dashboard]\")"),  # \\[ : not rich markup
    dashboard_host: str = typer.Option("127.0.0.1", "--dashboard-host", help="the address the page is served on"),
    dashboard_port: int = typer.Option(8765, "--dashboard-port", min=0, max=65535, help="its port (0: any free one)"),
) -> None:
    """Run a federated fine-tuning job (default: the built-in `bbc-lora`)."""
    from . import api

    overrides = list(overrides or [])
    try:
        if resume is not None:
            if config != "bbc-lora" and "=" in config:
                overrides.insert(0, config)
            cfg = api.resume_config(resume, overrides)
        else:
            if "=" in config and not Path(config).exists():  # `fedfm run key=value` means the default config
                overrides.insert(0, config)
                config = "bbc-lora"
            cfg = api.load_config(config, overrides)
    except FedfmError as e:
        _fail(e)
        return
    if print_config:
        console.print(cfg.to_yaml(), end="", markup=False)
        return
    if not dashboard:
        _run(cfg, resume, overrides, overwrite)
        return
    with _dashboard(cfg.output_dir(), dashboard_host, dashboard_port,
                    then=f"; reopen it with: fedfm dashboard {escape(str(cfg.output_dir()))}"):
        _run(cfg, resume, overrides, overwrite)


def _run(cfg, resume: Optional[Path], overrides: list[str], overwrite: bool) -> None:
    from . import api

    t0 = time.perf_counter()
    try:
        with RichDisplay(cfg) as display:
            if resume is not None:
                result = api.resume(resume, overrides, display=display)
            else:
                result = api.run(cfg, display=display, overwrite=overwrite)
    except FedfmError as e:
        _fail(e)
        return
    console.print(_summary_table(result.rows, time.perf_counter() - t0))
    plots = f"  (plots: fedfm report {result.run_dir})" if (result.run_dir / "report").is_dir() else ""
    console.print(f"run directory: [bold]{escape(str(result.run_dir))}[/bold]{escape(plots)}")


@contextmanager
def _dashboard(run_dir: Path, host: str, port: int, then: str) -> Iterator[Any]:
    """The page of ``run_dir`` served while the block runs (``fedfm run --dashboard``, ``fedfm dashboard``)."""
    from .dashboard import Dashboard

    try:
        board = Dashboard(run_dir, host, port).start()
    except FedfmError as e:
        _fail(e)
        return
    console.print(f"dashboard of {escape(str(run_dir))}: [bold]{board.url}[/bold]", soft_wrap=True)
    try:
        yield board
    finally:
        board.stop()
        console.print(f"dashboard stopped{then}", soft_wrap=True)


@app.command("dashboard")
def dashboard_cmd(
    run_dir: Path = typer.Argument(..., help="a run directory (of fedfm run, or a deployment's server side)"),
    host: str = typer.Option("127.0.0.1", "--host", help="the address to serve on (keep 127.0.0.1; docs/dashboard.md)"),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="the port (0: any free one)"),
    wait: bool = typer.Option(False, "--wait", help="RUN_DIR need not exist yet: wait for the run to write it"),
) -> None:
    """Serve a live page of a run (rounds, accuracy and loss, clients, label mix, privacy budget) until Ctrl-C."""
    from .dashboard import check_run_dir

    try:
        check_run_dir(run_dir, wait)
    except FedfmError as e:
        _fail(e)
        return
    with _dashboard(run_dir, host, port, then="") as board:
        console.print("Ctrl-C stops it")
        board.wait()


@app.command("privacy")
def privacy_cmd(
    config: str = typer.Argument("bbc-lora", help="a built-in config name or a YAML file"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """The privacy a config would give, without training: ε at δ, the sampling, z and the accountant."""
    from . import api

    try:
        cfg = _config(config, overrides)
        rows = api.privacy_guarantee(cfg)
    except FedfmError as e:
        _fail(e)
        return
    table = Table(title=f"{cfg.privacy.mode}-level DP of {cfg.name}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


@app.command("configs")
def configs_cmd() -> None:
    """List the built-in configs."""
    from . import api

    t = Table(title="built-in configs")
    t.add_column("name")
    t.add_column("description")
    for name, description in api.builtin_configs().items():
        t.add_row(name, description)
    console.print(t)


@app.command("sweep")
def sweep_cmd(
    spec: Path = typer.Argument(..., help="a sweep spec (YAML): base config, shared overrides, metric, arms"),
    out: Optional[Path] = typer.Option(None, "--out", help="where the runs and the summary go (default "
                                                             "runs/sweeps/<name>); runs recorded there are kept"),
    parallel: int = typer.Option(1, "--parallel", min=1, help="runs at once, each in its own process"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads of each run"),
    check: bool = typer.Option(False, "--check", help="only check the spec and every setting; train nothing"),
) -> None:
    """Compare arms fairly: tune each on the clients' validation splits, run its best setting on every seed,
    report mean and 95% interval (docs/sweeps.md)."""
    from . import api

    try:
        result = api.sweep(spec, out, parallel=parallel, threads=threads, check_only=check,
                           log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True))
    except FedfmError as e:
        _fail(e)
        return
    if result is None:
        console.print(f"{spec}: every setting of every arm is a valid config and the validation splits (if any "
                      "arm is tuned) can be scored; nothing was trained", markup=False, soft_wrap=True)
        return
    console.print((result.out / "summary.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"sweep directory: [bold]{escape(str(result.out))}[/bold] (trials.jsonl, summary.md, curves.png)")


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="a run directory")) -> None:
    """Draw PNG plots of a run into RUN_DIR/report/."""
    from . import api
    from .tracking.report import generation_changes

    try:
        paths = api.report(run_dir)
    except FedfmError as e:
        _fail(e)
        return
    rounds, rows = generation_changes(run_dir)
    if rows:
        t = Table(title=f"held-out prompts: answers at round {rounds[0]} and round {rounds[1]}", show_lines=True)
        for col in ("question", "reference", f"round {rounds[0]}", f"round {rounds[1]}"):
            t.add_column(col, overflow="fold")
        for r in rows:
            t.add_row(r["question"][:200], r["reference"][:200], r["before"][:200], r["after"][:200])
        console.print(t)
    for p in paths + [run_dir / "report" / "summary.md"]:
        console.print(str(p))


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    out: Path = typer.Option(..., "--out", help="where to write the adapter or the merged model"),
    merge: bool = typer.Option(False, "--merge", help="merge the adapter into the base and write a plain model"),
) -> None:
    """Write the run's adapter, or (--merge) a merged model that plain transformers loads."""
    from . import api

    try:
        path = api.export(run_dir, out, merge=merge)
    except FedfmError as e:
        _fail(e)
        return
    console.print(f"exported to {path}")


@app.command("generate")
def generate_cmd(
    run_dir: Path = typer.Argument(..., help="a finished run directory of an instruction or lm run"),
    question: str = typer.Argument(..., help="the question (instruction runs) or the text to continue (lm runs)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="the most tokens to generate"),
) -> None:
    """Answer QUESTION with the run's federated model (chat template applied; greedy decoding)."""
    from . import api

    try:
        text = api.generate(run_dir, question, max_new_tokens)
    except FedfmError as e:
        _fail(e)
        return
    console.print(text, markup=False, highlight=False, soft_wrap=True)


deploy_app = typer.Typer(no_args_is_help=True, help="Run fedfm between organisations over Flower "
                                                     "(pip install \"fedfm[flower]\"; docs/deployment.md).")
app.add_typer(deploy_app, name="deploy")


def _config(config: str, overrides: Optional[list[str]]):
    from . import api

    return api.load_config(config, list(overrides or []))


@deploy_app.command("app")
def deploy_app_cmd(directory: Path = typer.Argument(..., help="where to write the Flower app (its pyproject.toml)")) -> None:
    """Write the Flower app directory that `flwr run` takes (fedfm's ServerApp and ClientApp)."""
    from .deploy.local import write_app

    console.print(f"Flower app written to {write_app(directory)}")


@deploy_app.command("run")
def deploy_run_cmd(
    config: str = typer.Argument("bbc-lora", help="a built-in config name or a YAML file"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
    superlink: str = typer.Option(..., "--superlink", help="the SuperLink's address, HOST:PORT"),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates",
                                                     help="the CA certificate that signed the SuperLink's (TLS)"),
    insecure: bool = typer.Option(False, "--insecure", help="plain HTTP, no TLS (loopback tests only)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run whose config.yaml is here"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run directory"),
    timeout_s: float = typer.Option(24 * 3600.0, "--timeout", help="give up after this many seconds"),
) -> None:
    """Start a run on a SuperLink whose SuperNodes hold the clients' data; the server side writes the run
    directory (output.dir, on the SuperLink's machine) as `fedfm run` does."""
    import tempfile

    from .deploy import check_config
    from .deploy.local import run_app

    try:
        if (root_certificates is None) == (not insecure):
            raise FedfmError("fedfm deploy run: give --root-certificates CA.pem (TLS, the default between "
                             "organisations) or --insecure (plain HTTP, loopback tests only)")
        cfg = _config(str(resume / "config.yaml"), [f"output.dir={resume}", *(overrides or [])]) if resume else \
            _config(config, overrides)
        check_config(cfg)  # what a deployment refuses, here rather than on the SuperLink once the run has started
        with tempfile.TemporaryDirectory(prefix="fedfm-deploy-") as work:
            status = run_app(cfg.to_yaml(), superlink, root_certificates, Path(work), resume=resume is not None,
                             overwrite=overwrite, timeout_s=timeout_s)
    except FedfmError as e:
        _fail(e)
        return
    if not status.endswith("completed"):
        _fail(FedfmError(f"the run on {superlink} ended {status} (its output is above)"))


@deploy_app.command("local")
def deploy_local_cmd(
    config: str = typer.Argument("bbc-lora", help="a built-in config name or a YAML file"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
    work: Optional[Path] = typer.Option(None, "--work", help="where the sites, certificates and logs go "
                                                             "(default: a new folder beside output.dir)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS and no SuperNode authentication"),
) -> None:
    """A federation on this machine to try: the config's data split into partition.num_clients sites (one folder
    each), a SuperLink with TLS that admits only their registered keys, one SuperNode per site, the run."""
    from .deploy import check_config
    from .deploy.local import LocalFederation, site_config, write_sites

    try:
        cfg = _config(config, overrides)
        check_config(cfg)  # before the data is split and any process started
        # absolute: each Flower process runs in a folder of its own, where relative paths would resolve again
        work = (work or Path(f"{cfg.output_dir()}-federation")).resolve()
        if work.exists() and any(work.iterdir()):
            raise FedfmError(f"--work: {work} is not empty; give another folder")
        console.print(f"splitting {cfg.data.source} into {cfg.partition.num_clients} sites under {work}")
        sites = write_sites(cfg, work / "sites")
        with LocalFederation(work / "flower", secure=not insecure) as fed:
            fed.start_superlink()
            console.print(f"SuperLink on {fed.address} ({'TLS, registered SuperNodes only' if fed.secure else 'insecure'})")
            for cid, (train, test) in enumerate(sites):
                fed.start_supernode(f"site{cid}", train, test, client_id=cid)
            console.print(f"{len(sites)} SuperNodes started, each with its own files; logs in {fed.work}")
            status = fed.run(site_config(cfg).to_yaml(), timeout_s=24 * 3600.0, echo=True)
    except FedfmError as e:
        _fail(e)
        return
    if not status.endswith("completed"):
        _fail(FedfmError(f"the run ended {status} (logs in {work / 'flower'})"))
    console.print(f"run directory: [bold]{cfg.output_dir().resolve()}[/bold]")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
