import torch

from dmrx.training.optim import LazyAdam


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
