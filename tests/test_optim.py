import torch

from dmrx.training.optim import LazyAdam, _merge_rows_sync_free


def test_lazy_adam_matches_sparse_adam():
    torch.manual_seed(0)
    a = torch.nn.Embedding(50, 4, sparse=True)
    b = torch.nn.Embedding(50, 4, sparse=True)
    b.load_state_dict(a.state_dict())
    oa, ob = LazyAdam(a.parameters(), lr=0.05), torch.optim.SparseAdam(b.parameters(), lr=0.05)
    for step in range(6):
        idx = torch.randint(0, 50, (7, 3), generator=torch.Generator().manual_seed(step))  # repeats included
        for emb, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            (emb(idx) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


def test_lazy_adam_leaves_rows_not_looked_up():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = LazyAdam(emb.parameters())
    emb(torch.tensor([1, 4, 4])).sum().backward()
    opt.step()
    changed = (emb.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [i in (1, 4) for i in range(10)]


def test_sync_free_step_matches_sparse_adam_and_coalesce():
    # the merge CUDA takes, forced on the CPU: lookups repeat rows many times and leave most rows untouched
    torch.manual_seed(0)
    tables = [torch.nn.Embedding(100, 4, sparse=True) for _ in range(3)]
    for t in tables[1:]:
        t.load_state_dict(tables[0].state_dict())
    initial = tables[0].weight.detach().clone()
    opts = [
        LazyAdam(tables[0].parameters(), lr=0.05, sync_free=True),
        LazyAdam(tables[1].parameters(), lr=0.05, sync_free=False),
        torch.optim.SparseAdam(tables[2].parameters(), lr=0.05),
    ]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        idx = torch.randint(0, 30, (16, 5), generator=gen) * 2  # 80 lookups of even rows below 60
        weight = torch.randn(16, 5, 4, generator=gen)  # each copy of a row gets its own gradient
        for emb, opt in zip(tables, opts, strict=True):
            opt.zero_grad()
            (emb(idx) * weight).sum().backward()
            opt.step()
    touched = torch.zeros(100, dtype=torch.bool)
    touched[0:60:2] = True
    sync_free, coalesced, reference = tables
    for other in (coalesced, reference):
        torch.testing.assert_close(sync_free.weight, other.weight, atol=1e-6, rtol=1e-5)
    for key in ("exp_avg", "exp_avg_sq"):
        state = opts[0].state[sync_free.weight][key]
        torch.testing.assert_close(state, opts[2].state[reference.weight][key], atol=1e-6, rtol=1e-5)
        assert not state[~touched].any()
    assert torch.equal(sync_free.weight[~touched], initial[~touched])
    assert (sync_free.weight[touched] != initial[touched]).all(dim=1).all()


def test_sync_free_merge_sums_rows_like_coalesce():
    gen = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 12, (200,), generator=gen)  # about 17 copies per row, some rows absent
    grad = torch.sparse_coo_tensor(
        rows.unsqueeze(0), torch.randn(200, 3, generator=gen), (40, 3), check_invariants=True
    )
    merged_rows, sums = _merge_rows_sync_free(grad)
    assert torch.equal(merged_rows, rows.sort().values)  # one entry per gradient entry
    torch.testing.assert_close(sums, grad.coalesce().to_dense()[merged_rows], atol=1e-5, rtol=1e-5)

    no_rows = torch.empty(1, 0, dtype=torch.long)
    empty = torch.sparse_coo_tensor(no_rows, torch.empty(0, 3), (40, 3), check_invariants=True)
    assert [t.shape[0] for t in _merge_rows_sync_free(empty)] == [0, 0]
