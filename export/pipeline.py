"""`dmrx export`: a trained run -> an inference bundle of ONNX graphs (FP32, FP16, INT8), V', engines.

OUT/                              (default RUN/export; built in a temp dir beside it, renamed at the end)
  ranking.onnx                    aligned rows -> ctr, logit, r, r_hat
  user_encoder.onnx               history -> hist_emb, mask, u, i2i_keys
  candidate_scorer.onnx           user-side tensors [U] + user_row [S slots] + candidates [C] -> ctr [C], ...
  *.fp16.onnx, *.int8.onnx        with --fp16 / --int8 (INT8: symmetric Q/DQ, the form TensorRT builds from)
  *.int8-cpu.onnx                 with --int8: the CPU flavour (7-bit weights, laid out for ONNX Runtime's
                                  CPU kernels; export.int8.cpu_flavour), what CPU scoring loads for int8
  v_out.safetensors               V' ("v_out" [N, d]) and the match field's raw ids ("raw_ids" [N], -1 = padding)
  engines/*.plan                  with --engine tensorrt
  manifest.json                   written last: files (sha256), artifacts (io, opset, precision), parity,
                                  quality, gates, calibration, library versions (dmrx.runtime.export_bundle)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.numpy import save_file

from dmrx.artifacts import manifests
from dmrx.artifacts.atomic import atomic_dir
from dmrx.choices import CALIB_METHODS, ENGINES
from dmrx.errors import DmrxError
from dmrx.export import gates as G
from dmrx.export.graphs import OPSET, describe_io, export_graph, opset_of
from dmrx.models import bundle as run_bundle
from dmrx.models.dmr import DMR
from dmrx.runtime import export_bundle
from dmrx.runtime.graphs import GRAPHS, GraphSpec, to_feeds
from dmrx.runtime.ort import CPU_INT8, session

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_CALIB_ROWS = 4096
DEFAULT_EVAL_ROWS = 100_000


class GateFailure(DmrxError):
    """One or more gates missed: the message is one line, `.gates` holds the table."""

    def __init__(self, failed: list[G.Gate]):
        names = ", ".join(g.name for g in failed)
        super().__init__(
            f"export gate(s) missed: {names} (nothing was written; --no-gate writes the "
            "artifacts anyway and marks them in the manifest)"
        )
        self.gates = failed


@dataclass
class ExportOptions:
    out: Path | None = None
    fp16: bool = False
    int8: bool = False
    calib_data: Path | None = None
    calib_rows: int = DEFAULT_CALIB_ROWS
    calib_method: str = "percentile"  # 99.999th percentile: robust to PReLU outputs' long tails
    eval_data: Path | None = None
    eval_rows: int = DEFAULT_EVAL_ROWS
    engine: str | None = None
    check_tensorrt: bool = False
    gate: bool = True
    force: bool = False  # replace an existing `out` (atomically)
    timing: bool = True
    cache_dir: Path | None = None  # calibration range cache (default RUN/.calibration-cache)
    extra: dict = field(default_factory=dict)


def _data_paths(b: run_bundle.Bundle, opts: ExportOptions) -> tuple[Path | None, Path | None]:
    """(held-out file, calibration file): the options' files, else the run's own data; each is required only
    by the gates that read it (held-out: FP16/INT8 quality, calibration: INT8), and None where absent."""
    held = opts.eval_data or run_bundle.run_data(
        b.path, "valid", "test.h5", config=b.config, option="--eval-data", missing_ok=not (opts.fp16 or opts.int8)
    )
    calib = opts.calib_data or run_bundle.run_data(
        b.path, "train", config=b.config, option="--calib-data", missing_ok=not opts.int8
    )
    return held, calib


def export_run(run: str | Path | None, opts: ExportOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Export a run; returns the manifest. Raises DmrxError (GateFailure for missed gates)."""
    say = progress or (lambda msg: None)
    b = run_bundle.load(run)
    if not isinstance(b.model, DMR):
        raise DmrxError(
            f"{b.path}: dmrx export handles DMR runs; this run trained the "
            f"{b.model.cfg.model if hasattr(b.model, 'cfg') else type(b.model).__name__!r} baseline"
        )
    out = Path(opts.out) if opts.out is not None else b.path / "export"
    if out.exists() and not opts.force:
        raise DmrxError(f"{out}: output directory exists; replace it with --force or choose another with --out")
    if opts.force and out.exists() and not out.is_dir():
        raise DmrxError(f"{out}: exists and is not a directory; --force replaces only an earlier export")
    if opts.force and out.resolve() in (b.path.resolve(), *b.path.resolve().parents):
        raise DmrxError(f"{out}: --force would replace the run itself; choose another --out")
    if opts.calib_method not in CALIB_METHODS:
        raise DmrxError(f"--calib-method must be minmax, entropy or percentile, got {opts.calib_method!r}")
    if opts.engine is not None and opts.engine not in ENGINES:
        raise DmrxError(f"--engine must be 'tensorrt', got {opts.engine!r}")
    if opts.engine == "tensorrt":
        from dmrx.export import tensorrt as trt_mod

        trt_mod.require()  # before any work: a clear message when TensorRT or a GPU is missing
    encoder = b.encoder()
    held, calib = _data_paths(b, opts)
    if opts.eval_data is not None:  # a named file must be right; check before any work
        from dmrx.data.reader import DataFile

        with DataFile(opts.eval_data) as f:
            encoder.check_file(f)
            f.require_labels("the quality gates (AUC)")
    calib_rows = 0
    if opts.int8:
        from dmrx.calibration import check_calibration_file

        calib_rows = check_calibration_file(calib, encoder, opts.calib_rows)

    model, gs = b.model.eval(), GraphSpec.of(b.model)
    precisions = ["fp32"] + ["fp16"] * opts.fp16 + ["int8"] * opts.int8
    flavours = [CPU_INT8] * opts.int8  # further graph sets, gated like a precision; scoring picks them by target
    manifest: dict = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {
            "run_name": b.path.resolve().name,
            "weights_sha256": b.weights_hash,
            "run_manifest_files": b.manifest.get("files", {}),
        },
        "opset": OPSET,
        "exporter": f"torch.onnx.export TorchScript-based (dynamo=False), torch {torch.__version__}",
        "input_names": dict(gs.names),
        "max_len": gs.max_len,
        "precisions": precisions,
        "gated": opts.gate,
        "artifacts": {},
        "versions": run_bundle.library_versions(),
    }
    with atomic_dir(out, overwrite=opts.force) as tmp:
        paths: dict[str, dict[str, Path]] = {p: {} for p in precisions + flavours}
        for graph in GRAPHS:
            say(f"exporting {graph} (FP32)")
            proto = export_graph(model, gs, graph)
            paths["fp32"][graph] = tmp / export_bundle.graph_name(graph, "fp32")
            onnx.save(proto, str(paths["fp32"][graph]))
        say("writing the vocabularies, the feature spec and the model's inference settings")
        export_bundle.write_inference_files(tmp, b.spec, b.vocabs, export_bundle.model_settings(model))
        say("writing V' (v_out.safetensors)")
        match_vocab = b.vocabs[model.match_table]
        save_file(
            {
                "v_out": model.output_table().detach().float().contiguous().numpy(),
                "raw_ids": np.concatenate([[-1], match_vocab.ids]).astype(np.int64),
            },
            str(tmp / "v_out.safetensors"),
            metadata={"match_field": model.cfg.match_field},
        )

        say("FP32 parity against torch")
        rows = G.sample_rows(held or calib, encoder, model, max(G.PARITY_SIZES))
        manifest["parity"] = G.parity(model, gs, paths["fp32"], rows)
        gate_list = [
            G.Gate(
                "fp32_parity",
                manifest["parity"]["max_abs_ctr_diff"],
                f"<= {G.PARITY_TOL:g}",
                manifest["parity"]["passed"],
                "vs torch; batch 1/37/1024; empty+full histories",
            )
        ]

        if opts.fp16:
            from dmrx.export import fp16 as fp16_mod

            for graph in GRAPHS:
                say(f"converting {graph} to FP16")
                proto = fp16_mod.convert(onnx.load(str(paths["fp32"][graph])))
                paths["fp16"][graph] = tmp / export_bundle.graph_name(graph, "fp16")
                onnx.save(proto, str(paths["fp16"][graph]))
            manifest["fp16"] = {
                "fp32_islands": fp16_mod.fp32_islands(onnx.load(str(paths["fp16"]["ranking"]))),
                "io": "FP32 (casts inside the graph)",
            }
        if opts.int8:
            manifest["calibration"] = _quantize(b, gs, encoder, paths, tmp, calib, calib_rows, opts, say)

        quality: dict = {}
        if len(precisions) > 1:
            say(f"quality on held-out rows of {held}")
            quality = G.evaluate(paths, gs, encoder, held, opts.eval_rows)
            quality.pop("_probs")
            quality["data"] = Path(held).name
        for p in precisions + flavours:
            q = quality.setdefault(p, {})
            q["bytes"] = paths[p]["ranking"].stat().st_size
        if opts.timing:
            say("quick CPU timing (1 thread, batch 256)")
            feeds = to_feeds(G.sample_rows(held or calib, encoder, model, 256), gs, "ranking")
            for p in precisions + flavours:
                quality[p]["rows_per_s"] = G.quick_timing(paths[p]["ranking"], feeds)
        from dmrx.calibration import precision_report

        manifest["quality"] = precision_report({p: quality[p] for p in precisions + flavours})
        if quality.get("data"):
            manifest["quality_data"] = {"path": quality["data"], "rows": quality["fp32"].get("rows")}
        for p in precisions[1:] + flavours:
            gate_list += _quality_gates(p, quality)

        if opts.engine == "tensorrt":
            from dmrx.export import tensorrt as trt_mod

            manifest["engines"] = {}
            for p in [x for x in ("fp16", "int8") if x in precisions] or ["fp32"]:
                for graph in GRAPHS:
                    say(f"building TensorRT engine {graph} {p}")
                    rel = f"engines/{graph}.{p}.plan"
                    (tmp / "engines").mkdir(exist_ok=True)
                    manifest["engines"][rel] = trt_mod.build_engine(
                        paths[p][graph], tmp / rel, cache_dir=out.parent / ".trt-cache"
                    )

        lint_ok = True
        for p in precisions:
            for graph in GRAPHS:
                path = paths[p][graph]
                proto = onnx.load(str(path))
                entry = {
                    "graph": graph,
                    "precision": p,
                    "bytes": path.stat().st_size,
                    "opset": opset_of(proto),
                    **describe_io(proto),
                }
                if opts.check_tensorrt:
                    from dmrx.export.lint import lint

                    rep = lint(proto)
                    entry["tensorrt_lint"] = rep.to_json() | {"path": path.name}
                    lint_ok &= rep.ok
                manifest["artifacts"][path.name] = entry
        for p in flavours:  # not linted for TensorRT: INT8 Gathers, which TensorRT does not take
            for graph in GRAPHS:
                path = paths[p][graph]
                proto = onnx.load(str(path))
                manifest["artifacts"][path.name] = {
                    "graph": graph,
                    "precision": "int8",
                    "target": "cpu",
                    "bytes": path.stat().st_size,
                    "opset": opset_of(proto),
                    **describe_io(proto),
                }
        vpath = tmp / "v_out.safetensors"
        manifest["artifacts"]["v_out.safetensors"] = {
            "kind": "V' (output item table) and the match field's raw ids",
            "bytes": vpath.stat().st_size,
            "precision": "fp32",
            "tensors": {
                "v_out": {"dtype": "float32", "shape": list(model.output_table().shape)},
                "raw_ids": {"dtype": "int64", "shape": [int(model.output_table().shape[0])]},
            },
            "match_field": model.cfg.match_field,
        }
        for name, kind in export_bundle.INFERENCE_FILES.items():
            manifest["artifacts"][name] = {"kind": kind, "bytes": (tmp / name).stat().st_size}
        for rel, info in manifest.get("engines", {}).items():
            manifest["artifacts"][rel] = {k: v for k, v in info.items() if k != "sha256"}
        if opts.check_tensorrt:
            failed_files = [
                n for n, a in manifest["artifacts"].items() if not a.get("tensorrt_lint", {}).get("ok", True)
            ]
            gate_list.append(
                G.Gate("tensorrt_lint", len(failed_files), "0 files with problems", lint_ok, ", ".join(failed_files))
            )
        manifest["gates"] = [g.to_json() for g in gate_list]
        failed = [g for g in gate_list if not g.passed]
        manifest["gates_passed"] = not failed
        if failed and opts.gate:
            raise GateFailure(failed)
        if failed:
            manifest["gate_override"] = "written with --no-gate although gates missed: " + ", ".join(
                g.name for g in failed
            )
        manifest = manifests.write(tmp, export_bundle.FORMAT, export_bundle.VERSION, manifest["artifacts"], **manifest)
    manifest["path"] = str(out)
    return manifest


def _quality_gates(p: str, quality: dict) -> list[G.Gate]:
    base = quality["fp32"]
    out = []
    for path in (p, p + "/split"):
        q = quality.get(path)
        if not q:
            continue
        ref = quality["fp32" + path[len(p) :]]
        d_auc = abs(q["auc"] - ref["auc"]) if np.isfinite(q["auc"]) and np.isfinite(ref["auc"]) else None
        tol = G.FP16_AUC_TOL if p == "fp16" else G.INT8_AUC_TOL
        name = p.replace("-", "_")
        label = "ranking" if path == p else "split"
        out.append(
            G.Gate(
                f"{name}_auc_{label}",
                d_auc,
                f"|ΔAUC| <= {tol:g}",
                d_auc is not None and d_auc <= tol,
                f"{q['rows']} rows",
            )
        )
        if p.startswith("int8"):
            rel = abs(q["logloss"] - ref["logloss"]) / ref["logloss"]
            out.append(
                G.Gate(
                    f"{name}_logloss_{label}",
                    rel,
                    f"relative diff <= {G.INT8_LOGLOSS_REL_TOL:g}",
                    rel <= G.INT8_LOGLOSS_REL_TOL,
                )
            )
    if p.startswith("int8"):
        ratio = quality[p]["bytes"] / base["bytes"]
        out.append(
            G.Gate(
                f"{p.replace('-', '_')}_size",
                ratio,
                f"<= {G.INT8_SIZE_RATIO:g} of the FP32 ranking.onnx",
                ratio <= G.INT8_SIZE_RATIO,
            )
        )
    return out


def _quantize(b, gs: GraphSpec, encoder, paths, tmp: Path, calib: Path, rows: int, opts: ExportOptions, say) -> dict:
    from dmrx.calibration import DataFileReader, RangeCache, cache_key
    from dmrx.export import int8 as int8_mod

    cache = RangeCache(opts.cache_dir or b.path / ".calibration-cache")
    cache.prepare()
    info: dict = {
        "data": Path(calib).name,
        "rows": rows,
        "method": opts.calib_method,
        "graphs": {},
    }
    user_sess = session(paths["fp32"]["user_encoder"])
    for graph in GRAPHS:
        src = paths["fp32"][graph]
        key = cache_key(b.weights_hash, manifests.sha256(src), opts.calib_method, calib, rows, graph)
        hit = cache.has(key)
        say(
            f"quantizing {graph} to INT8 ({opts.calib_method}, "
            f"{'cached ranges' if hit else f'calibrating on {rows} rows'})"
        )
        reader = DataFileReader(
            calib, encoder, gs, graph, rows=rows, user_session=user_sess if graph == "candidate_scorer" else None
        )
        paths["int8"][graph] = tmp / export_bundle.graph_name(graph, "int8")
        res = int8_mod.quantize(src, paths["int8"][graph], reader, opts.calib_method, cache.path(key))
        res["cache_key"] = key
        res["rows"] = rows
        info["graphs"][graph] = res
        paths[CPU_INT8][graph] = tmp / export_bundle.graph_name(graph, CPU_INT8)
        ranges = int8_mod.attention_ranges(src, reader)
        res["cpu_flavour"] = int8_mod.cpu_flavour(paths["int8"][graph], src, paths[CPU_INT8][graph], ranges)
        res["cpu_flavour"]["attention_ranges"] = ranges
    return info


def load_manifest(out: Path) -> dict:
    return export_bundle.read(out)
