"""The readers under random input: any HDF5 file or CSV bytes either read or raise DmrxError, nothing else."""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmrx.data.format import FORMAT_NAME, SCHEMA_VERSION
from dmrx.data.importers.tabular import import_csv
from dmrx.data.reader import DataFile
from dmrx.errors import DmrxError

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DATASETS = [
    "behaviors/offsets",
    "behaviors/item",
    "examples/seq",
    "examples/end",
    "examples/user",
    "examples/label",
    "examples/prob",
    "examples/target/item",
    "examples/dense/price",
]
DTYPES = st.sampled_from(["i1", "u1", "i4", "i8", "u8", "f4", "f8", "?", "S3"])


@st.composite
def arrays(draw):
    dtype = np.dtype(draw(DTYPES))
    shape = draw(st.sampled_from([(0,), (1,), (3,), (7,), (2, 2), ()]))
    n = int(np.prod(shape))
    if dtype.kind == "S":
        values = np.array(draw(st.lists(st.binary(max_size=3), min_size=n, max_size=n)), dtype).reshape(shape)
    elif dtype.kind == "f":
        values = np.array(
            draw(
                st.lists(
                    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False, width=32),
                    min_size=n,
                    max_size=n,
                )
            ),
            dtype,
        ).reshape(shape)
    else:
        info = np.iinfo(dtype) if dtype.kind in "iu" else None
        lo, hi = (info.min, info.max) if info else (0, 1)
        values = np.array(draw(st.lists(st.integers(max(lo, -(2**62)), min(hi, 2**62)), min_size=n, max_size=n)))
        values = values.astype(dtype).reshape(shape)
    return values


@FUZZ
@given(
    present=st.lists(st.sampled_from(DATASETS), unique=True),
    data=st.data(),
    attrs=st.sampled_from(["ok", "no-format", "bad-version"]),
)
def test_any_hdf5_file_reads_or_raises_dmrx_error(present, data, attrs):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.h5"
        with h5py.File(path, "w") as h5:
            if attrs != "no-format":
                h5.attrs["dmrx_format"] = FORMAT_NAME
            h5.attrs["schema_version"] = SCHEMA_VERSION if attrs != "bad-version" else 99
            for name in present:
                h5.create_dataset(name, data=data.draw(arrays()))
        try:
            with DataFile(path) as f:
                f.read_columns(0, f.n_rows)
                for _ in f.batches(4, 5):
                    pass
        except DmrxError:
            pass


CSV_TOKENS = st.sampled_from(["user_id", "item_id", "label", "hist_item_id", "1", "-1", "x", "2^3", "", "1.5", "\x00"])


@FUZZ
@given(
    raw=st.one_of(
        st.binary(max_size=300),
        st.lists(st.lists(CSV_TOKENS, min_size=1, max_size=5), min_size=1, max_size=6).map(
            lambda rows: "\n".join(",".join(r) for r in rows).encode()
        ),
    )
)
def test_any_csv_bytes_import_or_raise_dmrx_error(raw):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "t.csv"
        src.write_bytes(b"user_id,item_id,label,hist_item_id\n" + raw if raw[:1] == b"1" else raw)
        try:
            import_csv(src, Path(tmp) / "o.h5")
        except DmrxError:
            pass
