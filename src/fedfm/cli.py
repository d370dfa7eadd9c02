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

from .errors import DiskFull, FedfmError

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


class RichDisplay:
    """Progress bars (rounds, and clients inside a round), one line per round, tables at start and end."""

    def __init__(self, total_rounds: int):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.rounds = self.progress.add_task("rounds ", total=total_rounds)
        self.clients = self.progress.add_task("clients", total=1, visible=False)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def partition(self, desc: dict) -> None:
        names = desc.get("label_names")
        t = Table(title=f"partition: {desc['method']}, {desc['num_clients']} clients, test set {desc.get('test_size')}")
        t.add_column("client")
        t.add_column("train", justify="right")
        t.add_column("test", justify="right")
        if names:
            for n in names:
                t.add_column(str(n)[:12], justify="right")
        for c in desc["clients"][:50]:
            cells = [c["name"], str(c["n_train"]), str(c["n_test"])]
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
            self.progress.advance(self.rounds)
        self.progress.update(self.clients, visible=False)

    def message(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{text}[/yellow]")


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
    from .config import load_config

    from .tracking import RunDir

    overrides = list(overrides or [])
    try:
        if resume is not None:
            if config != "bbc-lora" and "=" in config:
                overrides.insert(0, config)
            RunDir(resume).check_resumable()
            cfg_path = str(resume / "config.yaml")
            cfg = load_config(cfg_path, overrides + [f"output.dir={resume}"])
            _check_unchanged(load_config(cfg_path, [f"output.dir={resume}"]), cfg, resume)
        else:
            if "=" in config and not Path(config).exists():  # `fedfm run key=value` means the default config
                overrides.insert(0, config)
                config = "bbc-lora"
            cfg = load_config(config, overrides)
    except FedfmError as e:
        _fail(e)
        return
    if print_config:
        console.print(cfg.to_yaml(), end="", markup=False)
        return
    if not dashboard:
        _run(cfg, resume=resume is not None, overwrite=overwrite)
        return
    with _dashboard(cfg.output_dir(), dashboard_host, dashboard_port,
                    then=f"; reopen it with: fedfm dashboard {escape(str(cfg.output_dir()))}"):
        _run(cfg, resume=resume is not None, overwrite=overwrite)


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


# What a run's trained parameters are made from: resuming with any of these changed is refused, naming the key. Only
# where and how they are computed may change.
_RESUME_SAME = ("model", "adapter", "task.name")
_RESUME_MAY_CHANGE = ("model.device", "model.autocast", "model.gradient_checkpointing")


def _flat(obj: Any, prefix: str) -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, sub in obj.items() for k, v in _flat(sub, f"{prefix}.{key}").items()} or {prefix: {}}
    return {prefix: obj}


def _check_unchanged(saved, cfg, run: Path) -> None:
    """``--resume`` with a key of ``_RESUME_SAME`` changed from the run's own config.yaml: refused before anything
    loads, naming the key (the checkpoint's parameters would not fit the model the config builds)."""
    old, new = saved.model_dump(mode="json"), cfg.model_dump(mode="json")
    for section in _RESUME_SAME:
        first, _, rest = section.partition(".")
        was, now = _flat(old[first], first), _flat(new[first], first)
        for key in dict.fromkeys([*was, *now]):
            if key.startswith(section) and not key.startswith(_RESUME_MAY_CHANGE) and was.get(key) != now.get(key):
                raise FedfmError(f"--resume: {key} is {now.get(key)!r} here but {was.get(key)!r} in {run}/config.yaml, "
                                 f"which the run's checkpoints were trained with; resume without changing {key}, or "
                                 f"start a new run (another output.dir)")


def _run(cfg, resume: bool, overwrite: bool) -> None:
    from .tracking import RunDir

    t0 = time.perf_counter()
    run_dir = RunDir(cfg.output_dir())

    def warn(text: str) -> None:
        console.print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)

    try:
        from .federation import begin, open_run_dir
        from .simulation import Simulation, driver_of, prepare

        driver = driver_of(cfg)
        if driver is not None:  # clients that run different models (fedmd): the driver the algorithm names
            _run_driver(cfg, driver, run_dir, resume, overwrite, warn, t0)
            return
        ck = open_run_dir(run_dir, resume, overwrite, warn)  # touches nothing; a checkpoint read before the model
        prepared = prepare(cfg)  # data + config checks, before any model loads
        desc = prepared.data.describe()
        display = RichDisplay(cfg.federation.rounds)
        console.print(f"[bold]fedfm[/bold] run [cyan]{cfg.name}[/cyan] → {run_dir.path}")
        display.partition(desc)
        server = Simulation(prepared, run_dir, display)  # builds the model; writes nothing into the run directory
        begin(server, run_dir, ck, resume, overwrite, warn, say=console.print)
        run_dir.write_json("partition.json", desc)
        if prepared.synthetic is not None:  # data.synthetic: the generated rows, and which clients got each
            run_dir.write_text("synthetic.jsonl", prepared.synthetic.jsonl())
        with display, run_dir.writing():  # a full disk anywhere else in the run: one line, too
            display.progress.update(display.rounds, completed=server.start_round - 1)
            server.run()
        rows = run_dir.read_metrics()
    except FedfmError as e:
        _fail(e)
        return
    console.print(_summary_table(rows, time.perf_counter() - t0))
    try:
        from .tracking.report import make_report

        make_report(run_dir.path)
    except DiskFull as e:
        _fail(e)
        return
    except Exception as e:  # a plot failing must not hide a finished run
        console.print(f"[yellow]report not drawn: {e}[/yellow]")
    console.print(f"run directory: [bold]{run_dir.path}[/bold]  (plots: fedfm report {run_dir.path})")


def _run_driver(cfg, driver, run_dir, resume: bool, overwrite: bool, warn, t0: float) -> None:
    """``fedfm run`` for an algorithm whose clients run different models (fedmd, ``hetero.HeteroSimulation``): the
    same checks before any model loads and the same run directory (config.yaml, partition.json, metrics.jsonl, one
    row a round); it keeps no checkpoints, so ``--resume`` is refused."""
    from .federation import open_run_dir

    try:
        if resume:
            chosen_by = "continual.stages" if cfg.continual.stages else f"client.algorithm {cfg.client.algorithm!r}"
            raise FedfmError(f"--resume: {chosen_by} runs in {driver.__module__}.{driver.__name__}, which does not "
                             f"resume from checkpoints; start a new run (another output.dir or --overwrite)")
        open_run_dir(run_dir, False, overwrite, warn)  # touches nothing
        prepared = driver.prepare(cfg)  # data + config checks, before any model loads
        desc = prepared.data.describe()
        display = RichDisplay(cfg.federation.rounds)
        console.print(f"[bold]fedfm[/bold] run [cyan]{cfg.name}[/cyan] → {run_dir.path}")
        display.partition(desc)
        fed = driver(prepared, display=display, run_dir=run_dir)  # builds the models; writes nothing yet
        run_dir.create(overwrite=overwrite)
        run_dir.write_config(cfg.to_yaml())
        run_dir.write_json("partition.json", desc)
        with run_dir.writing():
            fed.run(initial=cfg.eval.initial)
        rows = run_dir.read_metrics()
    except FedfmError as e:
        _fail(e)
        return
    console.print(_summary_table(rows, time.perf_counter() - t0))
    console.print(f"run directory: [bold]{run_dir.path}[/bold]")


@app.command("privacy")
def privacy_cmd(
    config: str = typer.Argument("bbc-lora", help="a built-in config name or a YAML file"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """The privacy a config would give, without training: ε at δ, the sampling, z and the accountant."""
    from .config import load_config

    try:
        cfg = load_config(config, list(overrides or []))
        if cfg.privacy.mode == "none":
            raise FedfmError("privacy.mode is 'none': this config gives no differential-privacy guarantee (set "
                             "privacy.mode=client or sample, with privacy.noise_multiplier or privacy.target_epsilon)")
        from .simulation import prepare

        prepared = prepare(cfg)  # reads and partitions the data (the accountant needs N and n_k); loads no model
        p, R = cfg.privacy, cfg.federation.rounds
        derived = "" if p.noise_multiplier is not None else " (derived from privacy.target_epsilon)"
        if cfg.privacy.mode == "client":
            m = prepared.mechanism
            rows = [("protects", "one client's whole data"), ("epsilon", f"{m.epsilon(R, p.delta):.4g}"),
                    ("delta", f"{p.delta:g}"), ("rounds", str(R)),
                    ("client sampling", f"{m.sampling}: q = {m.q:.4g} ({m.per_round} of {m.num_clients})"),
                    ("noise multiplier z", f"{m.noise_multiplier:.4g}{derived}"),
                    ("clip C", f"{p.clip:g}" + (" (adaptive)" if p.target_quantile is not None else "")),
                    ("accountant", f"dp-accounting {m.accountant.upper()}")]
        else:
            sd = prepared.sample_dp
            qs = [sd.rate(k) for k in range(len(sd.sizes))]
            rows = [("protects", "one training example of a client"),
                    ("epsilon (worst client)", f"{sd.worst_epsilon(R, p.delta):.4g} if sampled in every round"),
                    ("delta", f"{p.delta:g}"), ("rounds", str(R)),
                    ("example sampling", f"poisson per step: q_k = {min(qs):.4g} … {max(qs):.4g} "
                                         f"(B = {cfg.client.batch_size}, n_k = {int(sd.sizes.min())} … {int(sd.sizes.max())})"),
                    ("steps per round", f"{int(sd.steps.min())} … {int(sd.steps.max())}"),
                    ("noise multiplier z", f"{sd.noise_multiplier:.4g}{derived}"),
                    ("per-example clip C", f"{p.clip:g}"), ("accountant", f"dp-accounting {p.accountant.upper()}")]
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
    from .config import builtin_configs

    t = Table(title="built-in configs")
    t.add_column("name")
    t.add_column("description")
    for name, path in sorted(builtin_configs().items()):
        lines = path.read_text().splitlines()
        t.add_row(name, lines[0].lstrip("# ").strip() if lines else "")
    console.print(t)


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="a run directory")) -> None:
    """Draw PNG plots of a run into RUN_DIR/report/."""
    from .tracking.report import generation_changes, make_report

    try:
        paths = make_report(run_dir)
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
    from .export import export_run

    try:
        path = export_run(run_dir, out, merge=merge)
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
    from .export import answer

    try:
        text = answer(run_dir, question, max_new_tokens)
    except FedfmError as e:
        _fail(e)
        return
    console.print(text, markup=False, highlight=False, soft_wrap=True)


deploy_app = typer.Typer(no_args_is_help=True, help="Run fedfm between organisations over Flower "
                                                     "(pip install \"fedfm[flower]\"; docs/deployment.md).")
app.add_typer(deploy_app, name="deploy")


def _config(config: str, overrides: Optional[list[str]]):
    from .config import load_config

    return load_config(config, list(overrides or []))


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
