"""Retrieval: search kernels, the index stored in a run, `dmrx index build` and `dmrx retrieve`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dmrx.cli.app import app
from dmrx.retrieval.search import ExactSearch, Int8Search, recall, topk_excluding

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_usage_error(res, *fragments: str):
    """A bad choice is refused by the command line parser: exit code 2, the option and its choices named."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())
    for frag in fragments:
        assert frag in text, res.output


def assert_clean_error(res, *fragments: str):
    """Non-zero exit, one 'error:' line naming the problem, no traceback."""
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    text = res.output  # stdout and stderr
    assert "Traceback" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    for frag in fragments:
        assert frag in " ".join(text.split()), text


# ---- search kernels -------------------------------------------------------------------------------------
def brute(U, V, k):
    S = U @ V.T
    rows = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(S, rows, 1)


@pytest.mark.parametrize("n", [3, 64, 2500])
def test_exact_search_matches_brute_force(n):
    rng = np.random.default_rng(n)
    V = rng.standard_normal((n, 12)).astype(np.float32)
    U = rng.standard_normal((70, 12)).astype(np.float32)
    k = min(n, 40)
    rows, scores = ExactSearch(V, user_block=32, chunk_floats=4096).search(U, k)
    ref_rows, ref_scores = brute(U, V, k)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert (rows == ref_rows).mean() > 0.99  # only exact float ties may swap
    assert (np.diff(scores, axis=1) <= 0).all()


def test_int8_two_stage_recall_and_exact_scores():
    rng = np.random.default_rng(0)
    V = (rng.standard_normal((20_000, 32)) * rng.lognormal(0, 0.3, (20_000, 1))).astype(np.float32)
    U = rng.standard_normal((50, 32)).astype(np.float32)
    exact, _ = ExactSearch(V).search(U, 50)
    s = Int8Search(V, shortlist=512)
    rows, scores = s.search(U, 50)
    assert recall(rows, exact) >= 0.99
    np.testing.assert_allclose(scores, np.einsum("bkd,bd->bk", V[rows], U), rtol=1e-5, atol=1e-5)  # fp32 re-rank
    assert s.codes.dtype == np.int8 and s.codes.nbytes < V.nbytes / 3
    many = rng.standard_normal((300, 32)).astype(np.float32)  # several re-rank blocks of users
    rows, _ = Int8Search(V, shortlist=4096).search(many, 10)
    assert rows.shape == (300, 10) and recall(rows, ExactSearch(V).search(many, 10)[0]) >= 0.99


def test_int8_pass_is_exact_integer_arithmetic_where_kernels_could_saturate():
    """Codes at +-127 times query bytes at 1 or 255: the pairs of products that clip a saturating int16 (ONNX
    Runtime's U8S8 kernel on x86 without VNNI). The shortlist must be the top by exact integer scores."""
    rng = np.random.default_rng(4)
    n, d = 64 * 64, 32
    V = (rng.choice([-1.0, 1.0], (n, d)) * rng.uniform(0.5, 1.0, (n, d))).astype(np.float32)
    V[0] = 1.0  # every column's scale is 1, item 0's codes are all 127
    U = np.concatenate([np.ones((1, d)), np.sign(V[1:40]), rng.standard_normal((20, d))]).astype(np.float32)
    s = Int8Search(V, shortlist=64, threads=1)
    q = s.quantize(U)
    assert np.abs(s.codes).max() == 127 and q.min() == 1 and q.max() == 255
    ints = (q.astype(np.int64) - 128) @ s.codes.T.astype(np.int64)  # [B, n]: numpy's exact integer scores
    for length in (64, 200):
        cand = s.candidates(U, length)
        top = -np.sort(-ints, axis=1)[:, :length]
        np.testing.assert_array_equal(-np.sort(-np.take_along_axis(ints, cand, 1), axis=1), top)
    rows, _ = s.search(U, 1)
    assert rows[0, 0] == 0  # the all-ones user's best item, which a saturating pass drops from the shortlist


def test_search_rejects_bad_k_and_shapes():
    from dmrx.errors import DmrxError

    s = ExactSearch(np.ones((5, 4), np.float32))
    for k in (0, -1, 6):
        with pytest.raises(DmrxError):
            s.search(np.ones((1, 4), np.float32), k)
    with pytest.raises(DmrxError, match=r"\[B, 4\]"):
        s.search(np.ones((1, 3), np.float32), 2)


def test_exclusion_stays_exact():
    rng = np.random.default_rng(1)
    V = rng.standard_normal((300, 8)).astype(np.float32)
    U = rng.standard_normal((4, 8)).astype(np.float32)
    ref, _ = brute(U, V, 300)
    excl = [ref[0, :5], np.zeros(0, np.int64), ref[2, [0, 2, 4]], np.arange(300)[np.arange(300) != ref[3, 7]]]
    rows, scores = topk_excluding(ExactSearch(V).search, U, 10, excl, 300)
    assert (rows[0] == ref[0, 5:15]).all() and (rows[1] == ref[1, :10]).all()
    assert (rows[2] == np.delete(ref[2], [0, 2, 4])[:10]).all()
    assert rows[3, 0] == ref[3, 7] and (rows[3, 1:] == -1).all() and np.isinf(scores[3, 1:]).all()


def test_hnsw_search():
    pytest.importorskip("faiss")
    from dmrx.retrieval.search import HnswSearch

    rng = np.random.default_rng(2)
    V = rng.standard_normal((3000, 16)).astype(np.float32)
    U = rng.standard_normal((40, 16)).astype(np.float32)
    exact, _ = ExactSearch(V).search(U, 20)
    rows, scores = HnswSearch.build(V, ef_search=200).search(U, 20)
    assert recall(rows, exact) >= 0.95
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_searchers_pickle_for_ray_and_spark():
    """Searchers travel to workers by pickle and search the same there."""
    import pickle

    rng = np.random.default_rng(3)
    V = rng.standard_normal((2000, 8)).astype(np.float32)
    U = rng.standard_normal((5, 8)).astype(np.float32)
    searchers = [ExactSearch(V), Int8Search(V, shortlist=256)]
    try:
        from dmrx.retrieval.search import HnswSearch

        searchers.append(HnswSearch.build(V, ef_search=64))
    except Exception:  # noqa: BLE001 -- faiss is optional
        pass
    for s in searchers:
        rows, scores = s.search(U, 7)
        rows2, scores2 = pickle.loads(pickle.dumps(s)).search(U, 7)
        np.testing.assert_array_equal(rows, rows2)
        np.testing.assert_allclose(scores, scores2)


def test_metrics_by_hand():
    from dmrx.retrieval.evaluate import metrics_from_hits

    hits = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 1]], bool)
    n_rel = np.array([1, 1, 2])
    m = metrics_from_hits(hits, n_rel, np.array([1, 2, 3]), [1, 3])
    assert m["hit_rate@1"] == pytest.approx(1 / 3) and m["hit_rate@3"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx((1 + 0 + 1) / 3)
    ndcg0 = (1 / np.log2(3)) / 1.0
    ndcg2 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    assert m["ndcg@3"] == pytest.approx((ndcg0 + 0 + ndcg2) / 3)
    # users averaged first: two queries of user 1 weigh as much as one of user 2
    m = metrics_from_hits(np.array([[1], [1], [0]], bool), np.array([1, 1, 1]), np.array([1, 1, 2]), [1])
    assert m["hit_rate@1"] == pytest.approx(0.5)


# ---- a run with an index -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> Path:
    """A private copy of the tiny run (the index is written into it)."""
    dst = tmp_path_factory.mktemp("retrieval") / "run"
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("index", "export"))
    return dst


@pytest.fixture(scope="module")
def built(run) -> dict:
    res = invoke("index", "build", run, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def index(run, built):
    from dmrx.retrieval.index import load_index

    return load_index(run)


def test_consistency_u_dot_v_equals_model_r(run, tiny_data):
    """u . v' from the retrieval path equals the model's r (Eq. 5) for the same history and target."""
    from dmrx.data.reader import DataFile
    from dmrx.evaluation.predict import to_tensors
    from dmrx.models import bundle
    from dmrx.retrieval.index import item_table
    from dmrx.retrieval.users import HistoryReader, UserEncoder

    b = bundle.load(run)
    enc = b.encoder()
    ids, V = item_table(b)
    user_enc = UserEncoder(b)
    keys = ["seq", "end"] + sorted(set(b.spec.batch_keys()))
    with DataFile(tiny_data / "test.h5") as f:
        batch = next(f.batches(200, b.model.cfg.max_len, encoder=enc, keys=keys, behavior_fields=b.spec.behaviors))
        cols = f.read_columns(0, len(batch["user"]), ["seq", "end"])  # file order: the batch's rows
    seq, end = cols["seq"], cols["end"]
    with torch.no_grad():
        r = b.model(to_tensors(enc.finish(dict(batch))))["r"].numpy()
    with HistoryReader(tiny_data / "test.h5", b.spec.behaviors, b.model.cfg.max_len, enc) as reader:
        hist, _ = reader.read(seq, end)
    for key in hist:  # the retrieval reader assembles the same histories as DataFile.batches
        np.testing.assert_array_equal(hist[key], batch[key])
    u = user_enc(hist)
    target = batch[f"target/{b.spec.match_field}"]
    known = target > 0
    assert known.sum() > 100
    np.testing.assert_allclose((u * V[target - 1]).sum(1)[known], r[known], atol=1e-5, rtol=0)
    # and the index stores V' under the right raw ids
    vocab = b.vocabs[b.spec.table_of()[f"target/{b.spec.match_field}"]]
    np.testing.assert_array_equal(vocab.encode(ids), np.arange(1, len(ids) + 1))


def test_index_build_users_and_latest_history(run, built, index, tiny_data):
    from dmrx.data.reader import DataFile
    from dmrx.retrieval.users import latest_histories

    assert (
        built["n_items"] == index.n_items
        and built["weights_hash"] == json.loads((run / "manifest.json").read_text())["files"]["model.safetensors"]
    )
    best = {}
    for name in ("train.h5", "valid.h5", "test.h5"):
        with DataFile(tiny_data / name) as f:
            cols = f.read_columns(0, f.n_rows, ["user", "end"])
        for u, e in zip(cols["user"].tolist(), cols["end"].tolist(), strict=False):
            best[u] = max(best.get(u, -1), e)
    assert index.users.tolist() == sorted(best)
    latest = latest_histories([tiny_data / n for n in ("train.h5", "valid.h5", "test.h5")])
    assert latest.end.tolist() == [best[u] for u in latest.users.tolist()]
    assert index.user_vectors.shape == (len(best), built["dim"])
    assert set(built["figures"]["int8_recall"]) == {"10", "50", "100"}


def test_index_user_vectors_and_seen_items(run, index, tiny_data):
    """Each user's stored u and seen items come from its longest visible history (read independently here)."""
    import h5py

    from dmrx.data.reader import DataFile
    from dmrx.evaluation.predict import to_tensors
    from dmrx.models import bundle

    b = bundle.load(run)
    enc = b.encoder()
    vocab = b.vocabs[b.spec.table_of()["target/item"]]
    with DataFile(tiny_data / "test.h5") as f:  # test rows see the longest histories of the tiny data
        cols = f.read_columns(0, f.n_rows, ["user", "seq", "end"])
        offsets = f.offsets
        keys = ["seq", "end"] + sorted(set(b.spec.batch_keys()))
        batches = list(f.batches(64, b.model.cfg.max_len, encoder=enc, keys=keys, behavior_fields=b.spec.behaviors))
    with h5py.File(tiny_data / "test.h5", "r") as h5:
        items = h5["behaviors/item"][:]
    hist = {k: np.concatenate([bt[k] for bt in batches]) for k in batches[0]}
    checked = 0
    for row in np.flatnonzero(cols["end"] > 0)[:40].tolist():
        user, seq, end = int(cols["user"][row]), int(cols["seq"][row]), int(cols["end"][row])
        r = int(index.user_rows([user])[0])
        if int(cols["end"][cols["user"] == user].max()) != end:
            continue  # not this user's longest history
        raw = items[offsets[seq] : offsets[seq] + end]
        want = np.unique(vocab.encode(raw))
        want = want[want > 0] - 1
        np.testing.assert_array_equal(index.seen(np.array([r]))[0], want)
        with torch.no_grad():
            u = b.model.encode_user(to_tensors({k: hist[k][row : row + 1] for k in hist if k.startswith("hist")}))
        np.testing.assert_allclose(index.user_vectors[r], u["u"][0].numpy(), atol=1e-6)
        checked += 1
    assert checked >= 5


def test_retrieve_one_user_matches_brute_force(run, index):
    uid = int(index.users[3])
    res = invoke("retrieve", run, "--user", uid, "--topk", 20, "--format", "json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    items = [x["item"] for x in out["items"]]
    scores = np.array([x["score"] for x in out["items"]])
    S = index.item_vectors @ index.user_vectors[3]
    ref = np.argsort(-S, kind="stable")[:20]
    np.testing.assert_allclose(scores, S[ref], atol=1e-6)
    assert (np.diff(scores) <= 0).all() and len(items) == 20
    assert set(items) <= set(index.items.tolist())
    for fmt in ("csv", "table"):
        res = invoke("retrieve", run, "--user", uid, "-k", 5, "--format", fmt)
        assert res.exit_code == 0, res.output
        assert str(items[0]) in res.stdout
    csv_lines = invoke("retrieve", run, "--user", uid, "-k", 5, "--format", "csv").stdout.strip().splitlines()
    assert csv_lines[0] == "rank,item,score" and len(csv_lines) == 6


def test_exclude_seen(run, index):
    row = int(np.argmax(np.diff(index.seen_offsets)))
    uid = int(index.users[row])
    seen = set(index.items[index.seen(np.array([row]))[0]].tolist())
    assert seen
    k = 30
    plain = json.loads(invoke("retrieve", run, "--user", uid, "-k", k, "--json").stdout)["items"]
    res = invoke("retrieve", run, "--user", uid, "-k", k, "--json", "--exclude-seen")
    got = [x["item"] for x in json.loads(res.stdout)["items"]]
    assert len(got) == k and not set(got) & seen
    assert [x["item"] for x in plain if x["item"] not in seen] == got[
        : len([x for x in plain if x["item"] not in seen])
    ]


def test_int8_and_hnsw_search_from_the_cli(run, index, tmp_path):
    uid = int(index.users[0])
    exact = json.loads(invoke("retrieve", run, "--user", uid, "-k", 10, "--json").stdout)["items"]
    fast = json.loads(invoke("retrieve", run, "--user", uid, "-k", 10, "--json", "--search", "int8").stdout)["items"]
    assert [x["item"] for x in fast] == [x["item"] for x in exact]
    assert_clean_error(invoke("retrieve", run, "--user", uid, "--search", "hnsw"), "--ann hnsw")


def test_hnsw_index_reports_recall(tiny_run, tmp_path):
    pytest.importorskip("faiss")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("index", "export"))
    res = invoke(
        "index", "build", run, "--ann", "hnsw", "--ef-search", 256, "--hnsw-m", 32, "--ef-construction", 200, "--json"
    )
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert (
        m["hnsw"] == {"m": 32, "ef_construction": 200, "ef_search": 256}
        and min(m["figures"]["hnsw_recall"].values()) > 0.9
    )
    uid = int(np.load(run / "index" / "users.npy")[0])
    res = invoke("retrieve", run, "--user", uid, "-k", 5, "--search", "hnsw", "--ef-search", 100, "--json")
    assert res.exit_code == 0 and len(json.loads(res.stdout)["items"]) == 5


def test_retrieve_all_to_h5_and_users_file(run, index, tmp_path):
    import h5py

    out = tmp_path / "recs.h5"
    res = invoke("retrieve", run, "--all", "-k", 7, "--out", out)
    assert res.exit_code == 0, res.output
    with h5py.File(out) as f:
        assert f["items"].shape == (index.n_users, 7) and f.attrs["k"] == 7
        np.testing.assert_array_equal(f["users"][:], index.users)
        items, scores = index.recommend(index.users[:50], 7)
        np.testing.assert_array_equal(f["items"][:50], items)
        np.testing.assert_allclose(f["scores"][:50], scores)
    assert [p.name for p in tmp_path.iterdir()] == ["recs.h5"]  # nothing temporary left behind
    ufile = tmp_path / "users.txt"
    ufile.write_text(f"{index.users[1]}\n\n{index.users[0]}\n999999999\n")
    res = invoke("retrieve", run, "--users", ufile, "-k", 2, "--format", "csv")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "user,rank,item,score" and len(lines) == 5
    assert lines[1].startswith(f"{index.users[1]},1,")
    assert "1 of 3 users are not in the index" in " ".join(res.output.split())
    ufile.write_text("12\nabc\n")
    assert_clean_error(invoke("retrieve", run, "--users", ufile), "line 2", "'abc' is not an integer")


def test_hnsw_without_faiss_is_a_clean_error(run, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    assert_clean_error(invoke("index", "build", run, "--ann", "hnsw"), "HNSW needs faiss", "pip install faiss-cpu")


@pytest.mark.parametrize("name", ["recs.h5", "recs.csv", "recs.jsonl"])
def test_many_users_output_is_atomic(tmp_path, name):
    from dmrx.cli.retrieve import _Sink

    out = tmp_path / name
    sink = _Sink(out, "csv", 2, 3, {"run": "r", "k": 3})
    sink.write(np.array([1]), np.array([[4, 5, -1]]), np.array([[0.5, 0.25, -np.inf]], np.float32))
    sink.close(ok=False)  # interrupted: nothing appears, nothing temporary is left
    assert list(tmp_path.iterdir()) == []
    sink = _Sink(out, "csv", 1, 3, {"run": "r", "k": 3})
    sink.write(np.array([1]), np.array([[4, 5, -1]]), np.array([[0.5, 0.25, -np.inf]], np.float32))
    sink.close(ok=True)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_missing_index_is_built_first(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("index", "export"))
    uid = 5
    res = invoke("retrieve", run, "--user", uid, "-k", 3, "--format", "csv")
    assert res.exit_code == 0, res.output
    assert "no index yet: building it first" in " ".join(res.output.split())
    assert (run / "index" / "manifest.json").exists()
    assert res.stdout.strip().splitlines()[0] == "rank,item,score"


def test_default_run_is_the_most_recent(run, index, tmp_path, monkeypatch):
    from dmrx.models import bundle

    monkeypatch.chdir(tmp_path)
    bundle.mark_latest(run)
    res = invoke("retrieve", "--user", int(index.users[0]), "-k", 2, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["run"] == str(run.resolve())


def test_bad_input(run, index, tmp_path):
    uid = int(index.users[0])
    assert_clean_error(invoke("retrieve", run, "--user", "12x"), "'12x' is not an integer user id")
    assert_clean_error(invoke("retrieve", run, "--user", 10**9), f"user {10**9} is not in the index")
    assert_clean_error(invoke("retrieve", run, "--user", uid, "-k", 0), "--topk must be a positive")
    assert_clean_error(invoke("retrieve", run, "--user", uid, "-k", -3), "--topk must be a positive")
    assert_clean_error(
        invoke("retrieve", run, "--user", uid, "-k", index.n_items + 1),
        f"is larger than the {index.n_items:,} items",
    )
    assert_clean_error(invoke("retrieve", tmp_path / "nope", "--user", uid), "no such run directory")
    assert_clean_error(invoke("index", "build", tmp_path / "nope"), "no such run directory")
    assert_clean_error(invoke("retrieve", run), "exactly one of")
    assert_clean_error(invoke("retrieve", run, "--user", uid, "--all"), "exactly one of")
    assert_usage_error(invoke("retrieve", run, "--user", uid, "--format", "xml"), "--format")
    assert_clean_error(invoke("retrieve", run, "--eval"), "--eval needs --data")
    assert_usage_error(invoke("index", "build", run, "--ann", "ivf"), "--ann", "none", "hnsw")
    assert_clean_error(invoke("index", "build", run, "--data", tmp_path / "none.h5"), "no such file")


def test_damaged_or_stale_index_is_detected(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("index", "export"))
    assert invoke("index", "build", run).exit_code == 0
    uid = int(np.load(run / "index" / "users.npy")[0])
    vec = run / "index" / "item_vectors.npy"
    good = vec.read_bytes()
    arr = np.load(vec)
    arr[0, 0] += 1.0
    np.save(vec, arr)
    assert_clean_error(invoke("retrieve", run, "--user", uid), "item_vectors.npy: damaged", "dmrx index build")
    vec.write_bytes(good)
    assert invoke("retrieve", run, "--user", uid).exit_code == 0
    m = json.loads((run / "index" / "manifest.json").read_text())
    m["weights_hash"] = "0" * 64
    (run / "index" / "manifest.json").write_text(json.dumps(m))
    assert_clean_error(invoke("retrieve", run, "--user", uid), "built for other weights")
    (run / "index" / "manifest.json").write_text("{")
    assert_clean_error(invoke("index", "info", run), "damaged index manifest")
    (run / "index" / "manifest.json").unlink()
    assert_clean_error(invoke("retrieve", run, "--user", uid), "manifest.json is missing")


def test_eval_model_and_most_popular(run, tiny_data):
    from dmrx.data.reader import DataFile
    from dmrx.models import bundle

    res = invoke("retrieve", run, "--eval", "--data", tiny_data / "test.h5", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["k"] == [10, 50, 100] and out["queries"] > 0
    for method in ("dmr", "most_popular"):
        assert set(out[method]) == {f"{m}@{k}" for m in ("hit_rate", "recall", "ndcg") for k in (10, 50, 100)}
        assert all(0 <= v <= 1 for v in out[method].values())
        assert out[method]["hit_rate@10"] <= out[method]["hit_rate@50"] <= out[method]["hit_rate@100"]
    # most-popular by hand: one query per positive row here (distinct histories), users averaged
    b = bundle.load(run)
    vocab = b.vocabs[b.spec.table_of()["target/item"]]
    top50 = set((np.lexsort((np.arange(len(b.sampler) - 1), -b.sampler[1:]))[:50] + 1).tolist())
    with DataFile(tiny_data / "test.h5") as f:
        cols = f.read_columns(0, f.n_rows, ["user", "seq", "end", "label", "target/item"])
    pos = cols["label"] > 0
    hit = np.array([i in top50 for i in vocab.encode(cols["target/item"][pos]).tolist()], float)
    users = cols["user"][pos]
    per_user = [hit[users == u].mean() for u in np.unique(users)]
    assert out["most_popular"]["hit_rate@50"] == pytest.approx(np.mean(per_user))
    table = invoke("retrieve", run, "--eval", "--data", tiny_data / "test.h5")
    assert table.exit_code == 0 and "most popular" in table.stdout and "NDCG" in table.stdout
    unlabelled = invoke("retrieve", run, "--eval", "--data", tiny_data / "candidates.h5")
    assert_clean_error(unlabelled, "examples/label is missing")


def test_onnxruntime_backend_matches_torch(run, index, tmp_path):
    """`--backend onnxruntime` reads RUN/export/user_encoder.onnx (the export helper's graph)."""
    res = invoke("index", "build", run, "--backend", "onnxruntime")
    if not (run / "export" / "user_encoder.onnx").exists():
        assert_clean_error(res, "user_encoder.onnx: not there")
        try:
            import onnx

            from dmrx.artifacts import manifests
            from dmrx.export.graphs import export_graph
            from dmrx.models import bundle
            from dmrx.runtime import export_bundle
            from dmrx.runtime.graphs import GraphSpec
        except ImportError as e:
            pytest.skip(f"no exporter to make user_encoder.onnx ({e})")
        b = bundle.load(run)
        (run / "export").mkdir()
        onnx.save(export_graph(b.model, GraphSpec.of(b.model), "user_encoder"), run / "export" / "user_encoder.onnx")
        manifests.write(
            run / "export",
            export_bundle.FORMAT,
            export_bundle.VERSION,
            ["user_encoder.onnx"],
            source={"weights_sha256": b.weights_hash},
        )
        res = invoke("index", "build", run, "--backend", "onnxruntime", "--json")
    assert res.exit_code == 0, res.output
    from dmrx.retrieval.index import load_index

    onnx_index = load_index(run)
    assert onnx_index.manifest["backend"] == "onnxruntime"
    np.testing.assert_allclose(onnx_index.user_vectors, index.user_vectors, atol=1e-5)
    stale = run / "export" / "manifest.json"
    kept = stale.read_text()
    stale.write_text(json.dumps({**json.loads(kept), "source": {"weights_sha256": "0" * 64}}))
    assert_clean_error(invoke("index", "build", run, "--backend", "onnxruntime"), "exported from other weights")
    stale.write_text(kept)
    assert invoke("index", "build", run).exit_code == 0  # back to the torch index for later tests


def test_json_is_one_record_per_user_for_one_user_and_many(run, index, tmp_path):
    """--json writes the same per-user object (one JSON line each) for --user, --users and --all."""
    uids = [int(index.users[0]), int(index.users[1])]
    one = invoke("retrieve", run, "--user", uids[0], "-k", 3, "--json")
    ufile = tmp_path / "users.txt"
    ufile.write_text("\n".join(map(str, uids)) + "\n")
    many = invoke("retrieve", run, "--users", ufile, "-k", 3, "--json")
    assert one.exit_code == 0 and many.exit_code == 0, one.output + many.output
    one_records = [json.loads(line) for line in one.stdout.splitlines()]
    many_records = [json.loads(line) for line in many.stdout.splitlines()]
    assert len(one_records) == 1 and [r["user"] for r in many_records] == uids
    a, b = one_records[0], many_records[0]
    assert {k: v for k, v in a.items() if k != "items"} == {k: v for k, v in b.items() if k != "items"}
    assert [x["item"] for x in a["items"]] == [x["item"] for x in b["items"]]
    np.testing.assert_allclose([x["score"] for x in a["items"]], [x["score"] for x in b["items"]], atol=1e-6)
    assert set(one_records[0]) == {"user", "run", "search", "match_field", "items"}
    assert [set(x) for x in one_records[0]["items"]] == [{"rank", "item", "score"}] * 3
