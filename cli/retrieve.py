"""`dmrx index build|info` and `dmrx retrieve`."""

from __future__ import annotations

import contextlib
import csv
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from dmrx.choices import AnnKind, EncoderBackend, SearchMethod, choice
from dmrx.cli.common import err_console, print_json, print_table, user_errors
from dmrx.errors import DmrxError
from dmrx.progress import progress

index_app = typer.Typer(
    help="Build and inspect a run's retrieval index (user vectors u, item table V').", no_args_is_help=True
)

RunArg = Annotated[
    Path | None,
    typer.Argument(metavar="RUN", help="Run directory (default: the most recent run).", show_default=False),
]
OutputFormat = choice("OutputFormat", ("table", "json", "csv"))


def _build(run: Path | None, data, ann, backend, ef_search, hnsw_m: int = 32, ef_construction: int = 128):
    from dmrx.retrieval.index import build_index

    with progress() as start:
        return build_index(
            run,
            data=data,
            ann=ann.value,
            backend=backend.value,
            ef_search=ef_search,
            hnsw_m=hnsw_m,
            ef_construction=ef_construction,
            progress=start,
        )


def _summary_table(m: dict, path) -> Table:
    table = Table(title=f"index {path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("users", f"{m['n_users']:,}")
    table.add_row(f"items ({m['match_field']})", f"{m['n_items']:,}")
    table.add_row("dimension", str(m["dim"]))
    table.add_row("sources", ", ".join(f"{s['path']} ({s['users']:,} users)" for s in m["sources"]))
    table.add_row("backend", m["backend"])
    table.add_row("ann", m["ann"] + (f" (M {m['hnsw']['m']}, efSearch {m['hnsw']['ef_search']})" if m["hnsw"] else ""))
    fig = m.get("figures") or {}
    if "exact_users_per_s" in fig:
        table.add_row("exact search", f"{fig['exact_users_per_s']:,.0f} users/s (batched)")
    for key, label in (("int8_recall", "int8 two-stage recall"), ("hnsw_recall", "HNSW recall")):
        if key in fig:
            table.add_row(
                label,
                "  ".join(f"@{k} {v:.4f}" for k, v in fig[key].items())
                + f"  (vs exact, {fig['recall_users']:,} users)",
            )
    if "hnsw_users_per_s" in fig:
        table.add_row("HNSW search", f"{fig['hnsw_users_per_s']:,.0f} users/s")
    table.add_row("built in", f"{m['built_seconds']:.1f} s")
    return table


@index_app.command("build")
@user_errors
def build(
    run: RunArg = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            help="Data file(s) to take user histories from (repeatable; "
            "default: the run's training file and the valid.h5/test.h5 "
            "beside it). Per user the longest visible history wins."
        ),
    ] = None,
    ann: Annotated[
        AnnKind, typer.Option(help="none (exact search only) or hnsw (faiss HNSW: pip install dmrx\\[faiss]).")
    ] = AnnKind.none,
    backend: Annotated[
        EncoderBackend, typer.Option(help="User encoder (onnxruntime uses RUN/export/user_encoder.onnx).")
    ] = EncoderBackend.torch,
    ef_search: Annotated[
        int, typer.Option(min=1, help="HNSW efSearch (search-time list size; higher: better recall, slower).")
    ] = 128,
    hnsw_m: Annotated[int, typer.Option("--hnsw-m", min=2, help="HNSW links per node (memory, recall).")] = 32,
    ef_construction: Annotated[
        int, typer.Option(min=1, help="HNSW efConstruction (build-time list size; higher: better graph, slower).")
    ] = 128,
    json_out: Annotated[bool, typer.Option("--json", help="Print the index manifest as JSON.")] = False,
):
    """Compute u for every user from the most recent history and index V' with raw item ids (RUN/index)."""
    manifest = _build(run, data, ann, backend, ef_search, hnsw_m, ef_construction)
    if json_out:
        print_json(manifest)
    else:
        print_table(_summary_table(manifest, manifest["path"]))


@index_app.command("info")
@user_errors
def info(
    run: RunArg = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the index manifest as JSON.")] = False,
):
    """Show a run's index (checked against the run's weights and its file hashes)."""
    from dmrx.models.bundle import resolve_run
    from dmrx.retrieval.index import load_index

    index = load_index(resolve_run(run))
    if json_out:
        print_json(index.manifest)
    else:
        print_table(_summary_table(index.manifest, index.path))


def _parse_user(text: str, where: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise DmrxError(f"{where}: {text.strip()!r} is not an integer user id") from None
    if value < 0:
        raise DmrxError(f"{where}: user id {value} is negative (ids are >= 0)")
    if value > np.iinfo(np.int64).max:
        raise DmrxError(f"{where}: user id {value} is beyond the largest id a data file holds (2**63 - 1)")
    return value


def _read_users(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DmrxError(f"{path}: no such file")
    ids = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            token = line.split(",")[0].strip()
            if token and not (n == 1 and token.lower() in ("user", "user_id")):
                ids.append(_parse_user(token, f"{path} line {n}"))
    if not ids:
        raise DmrxError(f"{path}: no user ids (one integer per line)")
    return np.array(ids, np.int64)


def _open_index(run: Path | None):
    """The run's index; built first (saying so on stderr) when there is none."""
    from dmrx.models import bundle
    from dmrx.retrieval.index import index_dir, load_index

    run_dir = bundle.resolve_run(run)
    run_manifest = bundle.verify(run_dir)
    if not index_dir(run_dir).exists():
        err_console.print(
            f"{run_dir} has no index yet: building it first (`dmrx index build {run_dir}`)", highlight=False
        )
        from dmrx.retrieval.index import build_index

        with progress() as start:
            build_index(run_dir, progress=start)
    return run_dir, load_index(run_dir, run_manifest)


def user_record(user: int, items: np.ndarray, scores: np.ndarray, meta: dict) -> dict:
    """One user's top K as --json writes it, for one user and for many alike (one JSON line each)."""
    keep = items >= 0
    ranked = [
        {"rank": i + 1, "item": int(it), "score": float(s)}
        for i, (it, s) in enumerate(zip(items[keep], scores[keep], strict=True))
    ]
    return {"user": int(user), **meta, "items": ranked}


def _emit_one(user: int, items: np.ndarray, scores: np.ndarray, fmt: str, meta: dict) -> None:
    if fmt == "json":
        print_json(user_record(user, items, scores, meta), indent=None)
        return
    keep = items >= 0
    items, scores = items[keep], scores[keep]
    if fmt == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["rank", "item", "score"])
        for i, (it, s) in enumerate(zip(items, scores, strict=False)):
            w.writerow([i + 1, int(it), f"{float(s):.6g}"])
    else:
        table = Table(title=f"top {len(items)} for user {user} ({meta['search']}, {meta['run']})")
        table.add_column("rank", justify="right")
        table.add_column(meta["match_field"], justify="right")
        table.add_column("score u . v'", justify="right")
        for i, (it, s) in enumerate(zip(items, scores, strict=False)):
            table.add_row(str(i + 1), str(int(it)), f"{float(s):.5f}")
        print_table(table)


RECORD_META = ("run", "search", "match_field")  # what each --json record repeats of the search


class _Sink:
    """Where many users' top K go: an HDF5 file (atomic), CSV/JSON lines file (atomic), or stdout."""

    def __init__(self, out: Path | None, fmt: str, n_users: int, k: int, meta: dict):
        self.out, self.fmt, self.k, self.meta, self.n = out, fmt, k, meta, 0
        self.record_meta = {key: meta[key] for key in RECORD_META if key in meta}
        self._stack = contextlib.ExitStack()
        if out is None:
            self.kind, self._fh = ("json" if fmt == "json" else "csv"), sys.stdout
        else:
            from dmrx.artifacts.atomic import atomic_file
            from dmrx.artifacts.hdf5 import h5_writer

            tmp = self._stack.enter_context(atomic_file(out))
            self.kind = (
                "h5" if out.suffix in (".h5", ".hdf5") else ("json" if out.suffix in (".json", ".jsonl") else "csv")
            )
            if self.kind == "h5":
                self._h5 = self._stack.enter_context(h5_writer(tmp))
                self._users = self._h5.create_dataset("users", (n_users,), np.int64)
                self._items = self._h5.create_dataset(
                    "items", (n_users, k), np.int64, chunks=(min(n_users, 4096) or 1, k)
                )
                self._scores = self._h5.create_dataset(
                    "scores", (n_users, k), np.float32, chunks=(min(n_users, 4096) or 1, k)
                )
                for key, v in meta.items():
                    self._h5.attrs[key] = v if v is not None else ""
            else:
                self._fh = self._stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        if self.kind == "csv":
            self._csv = csv.writer(self._fh, lineterminator="\n")
            self._csv.writerow(["user", "rank", "item", "score"])

    def write(self, users: np.ndarray, items: np.ndarray, scores: np.ndarray) -> None:
        from dmrx.artifacts.atomic import writing

        with writing(self.out or "<stdout>"):
            self._write(users, items, scores)

    def _write(self, users: np.ndarray, items: np.ndarray, scores: np.ndarray) -> None:
        if self.kind == "h5":
            sl = slice(self.n, self.n + len(users))
            self._users[sl], self._items[sl], self._scores[sl] = users, items, scores
        elif self.kind == "csv":
            for u, its, ss in zip(users.tolist(), items, scores, strict=False):
                for r, (it, s) in enumerate(zip(its.tolist(), ss.tolist(), strict=False)):
                    if it >= 0:
                        self._csv.writerow([u, r + 1, it, f"{s:.6g}"])
        else:
            for u, its, ss in zip(users.tolist(), items, scores, strict=True):
                print_json(user_record(u, its, ss, self.record_meta), file=self._fh, indent=None)
        self.n += len(users)

    def close(self, ok: bool) -> None:
        if ok:
            self._stack.close()
        else:
            self._stack.__exit__(DmrxError, DmrxError("aborted"), None)


def _eval_table(res: dict, run: Path) -> Table:
    table = Table(
        title=f"retrieval on {res['data']} ({run}): {res['queries']:,} queries, {res['users']:,} users, "
        f"{res['items']:,} items" + (", seen items excluded" if res["exclude_seen"] else "")
    )
    table.add_column("metric", style="bold")
    table.add_column("K", justify="right")
    table.add_column("DMR u . v'", justify="right")
    table.add_column("most popular", justify="right")
    for name, label in (("hit_rate", "HitRate"), ("recall", "Recall"), ("ndcg", "NDCG")):
        for k in res["k"]:
            key = f"{name}@{k}"
            d, p = res["dmr"][key], res["most_popular"][key]
            table.add_row(
                label,
                str(k),
                f"[bold]{d:.4f}[/]" if d > p else f"{d:.4f}",
                f"[bold]{p:.4f}[/]" if p > d else f"{p:.4f}",
            )
    return table


@user_errors
def retrieve(
    run: RunArg = None,
    user: Annotated[
        str | None, typer.Option("--user", help="Raw user id to recommend for.", show_default=False)
    ] = None,
    users: Annotated[
        Path | None, typer.Option("--users", help="File of raw user ids, one per line.", show_default=False)
    ] = None,
    all_users: Annotated[bool, typer.Option("--all", help="Every user in the index.")] = False,
    eval_: Annotated[
        bool,
        typer.Option("--eval", help="Evaluate retrieval of held-out positives in --data (DMR vs most popular)."),
    ] = False,
    data: Annotated[Path | None, typer.Option(help="Labelled test file for --eval.", show_default=False)] = None,
    topk: Annotated[int, typer.Option("--topk", "-k", help="Items per user.")] = 50,
    exclude_seen: Annotated[bool, typer.Option(help="Leave out items the user's history already holds.")] = False,
    fmt: Annotated[
        OutputFormat,
        typer.Option("--format", help="json: one JSON object per user and line (for --user, --users and --all alike)."),
    ] = OutputFormat.table,
    out: Annotated[
        Path | None,
        typer.Option(
            help="With --all/--users: write here (.h5, .csv or .jsonl; written atomically) instead of stdout.",
            show_default=False,
        ),
    ] = None,
    search: Annotated[
        SearchMethod,
        typer.Option(
            help="exact (default, the oracle), int8 (two-stage: int8 pass, fp32 "
            "re-rank) or hnsw (needs an index built with --ann hnsw)."
        ),
    ] = SearchMethod.exact,
    ef_search: Annotated[
        int | None,
        typer.Option(min=1, help="HNSW efSearch for this search (default: the index's).", show_default=False),
    ] = None,
    backend: Annotated[EncoderBackend, typer.Option(help="--eval: the user encoder.")] = EncoderBackend.torch,
    json_out: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
):
    """Top K items by u . v' for one user (--user), many (--users FILE, --all), or an evaluation (--eval)."""
    fmt = "json" if json_out else fmt.value
    search, backend = search.value, backend.value
    modes = [
        name
        for name, on in (
            ("--user", user is not None),
            ("--users", users is not None),
            ("--all", all_users),
            ("--eval", eval_),
        )
        if on
    ]
    if len(modes) != 1:
        raise DmrxError(
            "give exactly one of --user ID, --users FILE, --all or --eval"
            + (f" (got {', '.join(modes)})" if modes else "")
        )
    if topk <= 0:
        raise DmrxError(f"--topk must be a positive number of items, got {topk}")
    if eval_:
        return _evaluate(run, data, exclude_seen, backend, fmt)
    if data is not None:
        raise DmrxError("--data is for --eval; the index's users come from `dmrx index build --data`")
    if user is not None:
        user_id = _parse_user(user, "--user")
    else:
        wanted = _read_users(users) if users is not None else None
    run_dir, index = _open_index(run)
    k = index.check_k(topk)
    index.searcher(search, ef_search)  # fails early when HNSW was not built
    meta = {
        "run": str(run_dir),
        "k": k,
        "search": search,
        "exclude_seen": exclude_seen,
        "match_field": index.manifest["match_field"],
        "weights_hash": index.manifest["weights_hash"],
    }
    if user is not None:
        if index.user_rows([user_id])[0] < 0:
            raise DmrxError(
                f"user {user_id} is not in the index of {run_dir} ({index.n_users:,} users; "
                "rebuild it with `dmrx index build --data ...` to add users)"
            )
        items, scores = index.recommend(np.array([user_id]), k, search, exclude_seen, ef_search)
        _emit_one(user_id, items[0], scores[0], fmt, {key: meta[key] for key in RECORD_META})
        return
    if wanted is None:
        ids = index.users
    else:
        rows = index.user_rows(wanted)
        missing = wanted[rows < 0]
        if len(missing):
            err_console.print(
                f"{len(missing):,} of {len(wanted):,} users are not in the index, skipped "
                f"(e.g. {', '.join(map(str, missing[:5].tolist()))})",
                highlight=False,
            )
        ids = wanted[rows >= 0]
        if not len(ids):
            raise DmrxError(f"{users}: none of its users is in the index of {run_dir}")
    if fmt == "table" and out is None:
        fmt = "csv"  # a table of many users is a CSV stream
    sink = _Sink(out, fmt, len(ids), k, meta)
    ok = False
    try:
        # bars on stderr would interleave with rows written to a terminal's stdout
        with progress(enabled=out is not None or not sys.stdout.isatty()) as start:
            advance = start("retrieving", len(ids), unit="users")
            step = 4096
            for s in range(0, len(ids), step):
                part = ids[s : s + step]
                items, scores = index.recommend(part, k, search, exclude_seen, ef_search)
                sink.write(part, items, scores)
                advance(len(part))
        ok = True
    finally:
        sink.close(ok)
    if out is not None:
        err_console.print(f"wrote top {k} for {len(ids):,} users to {out}", highlight=False)


def _evaluate(run: Path | None, data: Path | None, exclude_seen: bool, backend: str, fmt: str) -> None:
    from dmrx.models import bundle
    from dmrx.retrieval.evaluate import evaluate

    if data is None:
        raise DmrxError("--eval needs --data TEST.h5 (a labelled file whose positives are held out)")
    if not data.exists():
        raise DmrxError(f"{data}: no such file")
    b = bundle.load(run)
    with progress() as start:
        res = evaluate(b, data, exclude_seen=exclude_seen, backend=backend, progress=start)
    res = {"run": str(b.path), **res}
    if fmt == "json":
        print_json(res)
    elif fmt == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["metric", "k", "dmr", "most_popular"])
        for key in res["dmr"]:
            name, k = key.split("@")
            w.writerow([name, k, f"{res['dmr'][key]:.6f}", f"{res['most_popular'][key]:.6f}"])
    else:
        print_table(_eval_table(res, b.path))
