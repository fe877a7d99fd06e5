"""Batch scoring as a function over numpy batches: grouping, the grouped torch path, prefetch, FLOP counts."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch

from dmrx.data.prefetch import prefetch
from dmrx.data.reader import DataFile
from dmrx.errors import DmrxError
from dmrx.evaluation.predict import predict
from dmrx.models import bundle
from dmrx.scoring import Scorer, Work, flops_per_candidate, group_rows


@pytest.fixture(scope="module")
def run_bundle(tiny_run):
    return bundle.load(tiny_run)


@pytest.fixture(scope="module")
def reference(run_bundle, tiny_data):
    """Per-row torch scores of candidates.h5 (dmrx.evaluation.predict: the full model over aligned rows)."""
    with DataFile(tiny_data / "candidates.h5") as f:
        return predict(run_bundle.model, run_bundle.encoder(), f, batch_size=512)["prob"]


def raw_batch(b, path, n=None) -> dict:
    """Raw-id columns and [B, T] histories of a candidate file, as a Ray/Spark batch would carry them."""
    with DataFile(path) as f:
        n = f.n_rows if n is None else n
        keys = sorted(set(b.spec.batch_keys()) | {"user"})
        batch = next(
            f.batches(n, b.model.cfg.max_len, keys=keys, behavior_fields=list(b.spec.behaviors), row_range=(0, n))
        )
        se = f.read_columns(0, n, ["seq", "end"])
    batch.update(se)
    return batch


def test_group_rows():
    seq = np.array([3, 3, 1, 3, 1, 2])
    end = np.array([5, 5, 4, 6, 4, 2])
    first, inv = group_rows(seq, end)
    assert len(first) == 4
    assert (seq[first][inv] == seq).all() and (end[first][inv] == end).all()
    first, inv = group_rows(np.array([[1, 2], [1, 2], [0, 1]]))
    assert len(first) == 2 and inv[0] == inv[1] != inv[2]
    first, inv = group_rows(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert len(first) == 0 and len(inv) == 0


def test_score_batch_matches_per_row_reference(run_bundle, tiny_data, reference):
    scorer = Scorer(run_bundle, backend="torch", device="cpu", threads=1)
    assert scorer.describe()["path"].startswith("grouped")
    batch = raw_batch(run_bundle, tiny_data / "candidates.h5")
    got = scorer.score_batch(batch)
    assert got.dtype == np.float32 and got.shape == reference.shape
    np.testing.assert_allclose(got, reference, atol=1e-6, rtol=0)


def test_grouping_shares_user_encodings(run_bundle, tiny_data):
    scorer = Scorer(run_bundle, backend="torch", threads=1)
    batch = raw_batch(run_bundle, tiny_data / "candidates.h5", n=200)
    work, unknown = scorer.prepare(batch)
    # ~5 candidates per user, all at the end of the user's sequence: one encoding per user
    assert work.n_candidates == 200 and work.n_users == len(np.unique(batch["user"]))
    assert set(unknown) >= {"target/item", "hist/item", "user_index"}
    # without seq/end, identical history rows are grouped instead: same groups, same scores
    no_se = {k: v for k, v in batch.items() if k not in ("seq", "end")}
    work2, _ = scorer.prepare(no_se)
    assert work2.n_users == work.n_users
    np.testing.assert_array_equal(scorer.score_work(work2), scorer.score_work(work))


def test_ragged_histories_and_double_underscore_names(run_bundle, tiny_data):
    """Spark-style input: '__' for '/', histories as per-row id lists (most recent last), no hist_len."""
    scorer = Scorer(run_bundle, backend="torch", threads=1)
    batch = raw_batch(run_bundle, tiny_data / "candidates.h5", n=64)
    want = scorer.score_batch(batch)
    T = run_bundle.model.cfg.max_len
    ragged = {}
    for k, v in batch.items():
        if k.startswith("hist/"):
            ragged[k.replace("/", "__")] = [row[T - n :] for row, n in zip(v, batch["hist_len"], strict=False)]
        elif k not in ("hist_len", "seq", "end"):
            ragged[k.replace("/", "__")] = v
    np.testing.assert_allclose(scorer.score_batch(ragged), want, atol=1e-7, rtol=0)
    # a longer history than max_len keeps the most recent T
    long = dict(ragged)
    long["hist__item"] = [np.concatenate([[7] * 5, np.asarray(s)]) if len(s) == T else s for s in ragged["hist__item"]]
    with pytest.raises(DmrxError, match="differs from the other behaviour fields"):
        scorer.score_batch(long)


def test_ray_style_call_adds_score(run_bundle, tiny_data):
    scorer = Scorer(run_bundle, backend="torch", threads=1)
    batch = raw_batch(run_bundle, tiny_data / "candidates.h5", n=10)
    out = scorer(batch)
    assert set(out) == set(batch) | {"score"} and out["score"].shape == (10,)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda b: b.pop("target/item"), "lacks column"),
        (lambda b: b.__setitem__("target/item", -b["target/item"] - 1), "row 0: negative id"),
        (lambda b: b["dense/price"].__setitem__(3, np.nan), "dense/price row 3: not a finite"),
        (lambda b: b.__setitem__("user", b["user"][:-1]), "shape"),
        (lambda b: b.pop("hist_len"), "hist_len"),
    ],
)
def test_prepare_rejects_bad_batches(run_bundle, tiny_data, change, match):
    scorer = Scorer(run_bundle, backend="torch", threads=1)
    batch = raw_batch(run_bundle, tiny_data / "candidates.h5", n=8)
    batch["dense/price"] = batch["dense/price"].copy()
    change(batch)
    with pytest.raises(DmrxError, match=match):
        scorer.score_batch(batch)


def test_workers_and_split_give_identical_bytes(run_bundle, tiny_data):
    batch = raw_batch(run_bundle, tiny_data / "candidates.h5")
    one = Scorer(run_bundle, backend="torch", threads=1)
    work, _ = one.prepare(batch)
    parts = work.split(3)
    assert sum(p.n_candidates for p in parts) == work.n_candidates
    whole = np.concatenate([one.score_work(p) for p in parts])
    two = Scorer(run_bundle, backend="torch", threads=2)
    assert two.workers == 2
    again = np.concatenate(list(two.score_works(parts)))
    np.testing.assert_array_equal(whole, again)  # a batch's bytes do not depend on the worker count


def test_score_stream_keeps_order_and_reads_ahead_a_bounded_number(run_bundle, tiny_data):
    batch = raw_batch(run_bundle, tiny_data / "candidates.h5")
    two = Scorer(run_bundle, backend="torch", threads=2)
    parts = two.prepare(batch)[0].split(8)
    assert len(parts) > 2 * two.workers + 1
    read = []

    def items():
        for i, p in enumerate(parts):
            read.append(i)
            yield p, i

    got = []
    for tag, scores in two.score_stream(items()):
        if not got:
            assert len(read) <= 2 * two.workers + 1  # scoring began before the stream was read to its end
        got.append((tag, scores))
    assert [t for t, _ in got] == list(range(len(parts)))
    np.testing.assert_array_equal(np.concatenate([s for _, s in got]), np.concatenate(list(two.score_works(parts))))


def test_grouped_path_equals_reference_path(run_bundle, tiny_data):
    """The rearranged candidate side against model.score_grouped, on uneven groups (1..many per user)."""
    from dmrx.scoring.torch_backend import TorchBackend

    fast = TorchBackend(run_bundle, threads=1)
    ref = TorchBackend(run_bundle, threads=1, grouped=False)
    assert fast.grouped is not None and ref.grouped is None
    scorer = Scorer(run_bundle, backend="torch", threads=1)
    batch = raw_batch(run_bundle, tiny_data / "candidates.h5", n=300)
    work, _ = scorer.prepare(batch)
    rng = np.random.default_rng(0)
    # skewed, shuffled user_row: one user with many candidates, others with one
    row = np.where(rng.random(work.n_candidates) < 0.5, 0, rng.integers(0, work.n_users, work.n_candidates))
    skew = Work(work.hist, work.hist_len, row.astype(np.int64), work.cand)
    np.testing.assert_allclose(fast.score(skew), ref.score(skew), atol=1e-6, rtol=0)


def test_int8_close_to_fp32(run_bundle, tiny_data, reference):
    scorer = Scorer(run_bundle, backend="torch", precision="int8", device="cpu", threads=1)
    got = scorer.score_batch(raw_batch(run_bundle, tiny_data / "candidates.h5"))
    assert np.abs(got - reference).max() < 0.02  # documented int8 tolerance (dynamic per-batch scales)


def test_cpu_half_precision_is_refused(run_bundle):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DmrxError, match="needs a CUDA GPU"):
        Scorer(run_bundle, backend="torch", precision="fp16", device="cpu")
    with pytest.raises(DmrxError, match="--backend must be"):
        Scorer(run_bundle, backend="tpu")


def test_flops_per_candidate(run_bundle):
    f = flops_per_candidate(run_bundle.model)
    cfg = run_bundle.model.cfg
    assert 0 < f["grouped"] < f["full"]
    model = run_bundle.model
    d_p = sum(model.tables[model.table_of[k]].embedding_dim for k in run_bundle.spec.profile_keys())
    # full = grouped + the user side + the profile block of MLP layer 1 (once per user run when grouped)
    assert f["full"] == f["grouped"] + f["user_side"] + 2 * d_p * cfg.mlp[0]
    assert f["tanh_per_candidate"] == cfg.max_len * cfg.attn_hidden


# ---- prefetch ------------------------------------------------------------------------------------------
def test_prefetch_order_and_overlap():
    def slow():
        for i in range(6):
            time.sleep(0.02)
            yield i

    t0 = time.perf_counter()
    out = []
    with prefetch(slow(), depth=2) as it:
        for x in it:
            time.sleep(0.02)  # "compute" overlaps the next read
            out.append(x)
    assert out == list(range(6))
    assert time.perf_counter() - t0 < 6 * 0.04  # serial would take 0.24 s


def test_prefetch_reraises_producer_error_after_good_items():
    def bad():
        yield 1
        yield 2
        raise DmrxError("dataset examples/x row 9: broken")

    got = []
    with pytest.raises(DmrxError, match="row 9"):
        for x in prefetch(bad()):
            got.append(x)
    assert got == [1, 2]


def test_prefetch_close_stops_producer():
    produced = []
    stop = threading.Event()

    def endless():
        i = 0
        while not stop.is_set():
            produced.append(i)
            yield i
            i += 1

    with prefetch(endless(), depth=2) as it:
        assert next(it) == 0
    n = len(produced)
    time.sleep(0.05)
    assert len(produced) == n <= 4  # bounded read-ahead, and nothing after close
    stop.set()


# ---- the fused I2I kernel ------------------------------------------------------------------------------
def _attention_inputs(scale: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    U, T, H, D, B = 6, 20, 16, 24, 40
    keys = torch.randn(U, T, H, generator=gen) * scale
    e = torch.randn(U, T, D, generator=gen)
    lengths = torch.tensor([0, 1, 5, 20, 13, 20])
    mask = (torch.arange(T)[None, :] >= (T - lengths)[:, None]).float()
    q = torch.randn(B, H, generator=gen) * scale
    z = torch.randn(H, generator=gen)
    row = torch.randint(0, U, (B,), generator=gen)
    return keys, e, mask, q, z, row


def _attention_reference(keys, e, mask, q, z, row):
    from dmrx.models.dmr import masked_softmax

    a = torch.tanh(keys[row] + q[:, None, :]) @ z
    m = mask[row]
    return torch.bmm(masked_softmax(a, m > 0).unsqueeze(1), e[row]).squeeze(1), (a * m).sum(-1)


@pytest.mark.parametrize("scale, exp_form", [(0.5, True), (0.5, False), (3.0, True), (3.0, False), (30.0, None)])
def test_kernel_matches_torch_attention(scale, exp_form):
    from dmrx.scoring import kernel as score_kernel

    if score_kernel.load() is None:
        pytest.skip(f"kernel unavailable here: {score_kernel.reason}")
    args = _attention_inputs(scale)
    u_ref, r_ref = _attention_reference(*args)
    u, r = score_kernel.i2i(*args, exp_form=exp_form)
    assert u.shape == u_ref.shape and r.shape == r_ref.shape
    tol = 2e-5 * max(1.0, float(r_ref.abs().max()))
    assert (u - u_ref).abs().max() <= 2e-5 and (r - r_ref).abs().max() <= tol
    assert u[args[5] == 0].abs().max() == 0  # an empty history attends to nothing


def test_scoring_with_and_without_kernel_agree(run_bundle, tiny_data, reference, monkeypatch):
    from dmrx.scoring import kernel as score_kernel

    batch = raw_batch(run_bundle, tiny_data / "candidates.h5")
    with_kernel = Scorer(run_bundle, backend="torch", device="cpu", threads=1)
    if score_kernel.load() is None:
        pytest.skip(f"kernel unavailable here: {score_kernel.reason}")
    assert "kernel" in with_kernel.describe()["path"]
    monkeypatch.setenv("DMRX_SCORE_KERNEL", "0")
    without = Scorer(run_bundle, backend="torch", device="cpu", threads=1)
    assert without.describe()["path"] == "grouped, torch attention"
    assert without.describe()["kernel"] == "disabled by DMRX_SCORE_KERNEL=0"
    a, b = with_kernel.score_batch(batch), without.score_batch(batch)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a, reference, atol=1e-6, rtol=0)


def test_kernel_build_failures_are_reported_not_raised(tmp_path):
    from dmrx.scoring import kernel as score_kernel

    lib, why = score_kernel.build(None, tmp_path)
    assert lib is None and "no C compiler" in why
    lib, why = score_kernel.build("/bin/false", tmp_path)
    assert lib is None and "failed" in why
    assert list(tmp_path.glob("*.so")) == []


def test_loading_the_kernel_leaves_the_process_float_mode_alone():
    """-ffast-math at link time would turn on flush-to-zero for the whole process and change other
    libraries' arithmetic (ONNX Runtime's INT8 scores): subnormals must survive the kernel's load."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from dmrx.scoring import kernel\n"
        "assert kernel.load() is not None\n"
        "print(float((np.array([1e-39], np.float32) * np.float32(1.0))[0]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "AssertionError" in proc.stderr:
        pytest.skip("no C compiler: the kernel is not built here")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout) > 0


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_folds_the_input_norm_in_fp32(run_bundle, tiny_data, dtype, tol):
    """fp16/bf16 scoring (CUDA only) casts a copy of the model with the MLP input's batch norm folded into
    the first layer in fp32. Checked here on the CPU, where torch runs fp16/bf16 too: the model as the
    backend builds it for half precision (fold_input_norm, then the cast), run in that precision on real
    rows, against fp32. The running variance of the product columns is set to what longer training gives
    (1e-6, subnormal in fp16; the tiny run's are larger)."""
    from dmrx.evaluation.predict import to_tensors
    from dmrx.scoring.torch_backend import fold_input_norm

    model = copy.deepcopy(run_bundle.model).eval()
    cfg, bn = model.cfg, model.input_norm
    d_prod = sum(b - a for a, b in model.prod_e)
    assert bn is not None and cfg.target_product and d_prod
    cols = slice(bn.num_features - int(cfg.use_u2i) - d_prod, bn.num_features - int(cfg.use_u2i))
    with torch.no_grad():
        bn.running_var[cols] = 1e-6
        bn.running_mean[cols] = 2e-4
    encoder = run_bundle.encoder()
    with DataFile(tiny_data / "candidates.h5") as f:
        keys = ["seq", "end"] + sorted(set(encoder.spec.batch_keys()))
        batch = next(f.batches(512, cfg.max_len, encoder=encoder, keys=keys, behavior_fields=encoder.spec.behaviors))
    t = to_tensors(encoder.finish(batch))
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}
    with torch.inference_mode():
        ref = torch.sigmoid(model(t)["logit"])
        folded = fold_input_norm(model)
        assert folded.input_norm is None and model.input_norm is not None  # a copy; the model is untouched
        assert (torch.sigmoid(folded(t)["logit"]) - ref).abs().max() <= 1e-5  # the fold itself is exact
        got = torch.sigmoid(folded.to(dtype)(half)["logit"].float())
    assert (got - ref).abs().max() <= tol
