"""Tests for adapt.losses against direct loop computations on small hand-made tensors."""
import math

import pytest
import torch
from torch.func import vmap

from adapt import losses
from tests import reference


def _norm(x):
    return x / x.norm(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------
# MK-MMD
# --------------------------------------------------------------------------------------
def _mmd_loop(xs, xt, kernel_mul=2.0, kernel_num=5, unbiased=False):
    z = torch.cat([xs, xt]).double()
    n = z.shape[0]
    d2 = [[float(((z[i] - z[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    sigma0 = sum(d2[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
    sig = [sigma0 * kernel_mul ** (u - kernel_num // 2) for u in range(kernel_num)]

    def k(i, j):
        return sum(math.exp(-d2[i][j] / s) for s in sig) / kernel_num

    ns, nt = xs.shape[0], xt.shape[0]
    S, T = range(ns), range(ns, n)
    if unbiased:
        kss = sum(k(i, j) for i in S for j in S if i != j) / (ns * (ns - 1))
        ktt = sum(k(i, j) for i in T for j in T if i != j) / (nt * (nt - 1))
    else:
        kss = sum(k(i, j) for i in S for j in S) / ns ** 2
        ktt = sum(k(i, j) for i in T for j in T) / nt ** 2
    kst = sum(k(i, j) for i in S for j in T) / (ns * nt)
    return kss + ktt - 2 * kst


def test_mk_mmd_matches_loop_with_unequal_sizes():
    torch.manual_seed(0)
    xs, xt = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64) + 0.5
    assert losses.mk_mmd(xs, xt).item() == pytest.approx(_mmd_loop(xs, xt), abs=1e-9)
    assert losses.mk_mmd(xs, xt, unbiased=True).item() == pytest.approx(_mmd_loop(xs, xt, unbiased=True), abs=1e-9)


def test_mk_mmd_near_zero_for_same_distribution_and_larger_when_shifted():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(256, 16, generator=g)
    b = torch.randn(256, 16, generator=g)
    shifted = torch.randn(256, 16, generator=g) + 1.0
    same = losses.mk_mmd(a, b)
    assert 0 <= same.item() < 0.05
    assert abs(losses.mk_mmd(a, b, unbiased=True).item()) < 0.01
    diff = losses.mk_mmd(a, shifted)
    assert diff.item() > 10 * same.item() and diff.item() > 0.1
    # unequal batch sizes
    uneq_same = losses.mk_mmd(a[:100], b)
    uneq_diff = losses.mk_mmd(a[:100], shifted[:200])
    assert torch.isfinite(uneq_same) and uneq_same.item() < 0.05 and uneq_diff.item() > 0.1


def test_mk_mmd_under_vmap():
    torch.manual_seed(0)
    xs, xt = torch.randn(3, 6, 4), torch.randn(3, 9, 4)
    batched = vmap(losses.mk_mmd)(xs, xt)
    for i in range(3):
        assert torch.allclose(batched[i], losses.mk_mmd(xs[i], xt[i]), atol=1e-6)


# --------------------------------------------------------------------------------------
# MCD, entropy, pseudo-labels
# --------------------------------------------------------------------------------------
def test_mcd_discrepancy():
    p1 = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p2 = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    expect = sum(abs(a - b) for ra, rb in zip(p1.softmax(-1).tolist(), p2.softmax(-1).tolist())
                 for a, b in zip(ra, rb)) / 6
    assert losses.mcd_discrepancy(p1, p2).item() == pytest.approx(expect, abs=1e-6)
    assert losses.mcd_discrepancy(p1, p1).item() == 0.0


def test_entropy():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    h = losses.entropy(logits, reduction="none")
    assert h[0].item() == pytest.approx(math.log(2))
    assert h[1].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    assert losses.entropy(logits).item() == pytest.approx(h.mean().item())


def test_pseudo_label_ce():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.2], [0.0, 0.0, 6.0]], requires_grad=True)
    p = logits.detach().softmax(-1)
    conf, lab = p.max(-1)
    mask = conf > 0.8
    assert mask.tolist() == [True, False, True]
    expect = sum(-math.log(p[i, lab[i]].item()) for i in range(3) if mask[i]) / 2
    loss = losses.pseudo_label_ce(logits, 0.8)
    assert loss.item() == pytest.approx(expect, abs=1e-6)
    loss.backward()
    assert torch.all(logits.grad[1] == 0)
    zero = losses.pseudo_label_ce(torch.zeros(4, 3, requires_grad=True), 0.8)
    assert zero.item() == 0.0


# --------------------------------------------------------------------------------------
# contrastive losses
# --------------------------------------------------------------------------------------
def _nce_loop(q, k, tau, extra=None, mask=None):
    q, k = _norm(q), _norm(k)
    extra = None if extra is None else _norm(extra)
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        den = pos + sum(math.exp(float(q[i] @ k[j]) / tau) for j in range(k.shape[0]) if j != i)
        if extra is not None:
            den += sum(math.exp(float(q[i] @ extra[m]) / tau) for m in range(extra.shape[0])
                       if mask is None or bool(mask[i, m]))
        total += -math.log(pos / den)
    return total / q.shape[0]


def test_info_nce_matches_loop():
    torch.manual_seed(0)
    q, k, neg = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    assert losses.info_nce(q, k, 0.1).item() == pytest.approx(_nce_loop(q, k, 0.1), rel=1e-9)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    got = losses.info_nce(q, k, 0.5, negatives=neg, neg_mask=mask)
    assert got.item() == pytest.approx(_nce_loop(q, k, 0.5, neg, mask), rel=1e-9)
    # per-query negatives (N, M, d)
    got3 = losses.info_nce(q, k, 0.5, negatives=neg.expand(4, 3, 5), neg_mask=mask)
    assert got3.item() == pytest.approx(got.item(), rel=1e-9)


def test_cross_modal_contrastive_matches_loop():
    torch.manual_seed(1)
    za, zb = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    expect = 0.5 * (_nce_loop(za, zb, 0.1) + _nce_loop(zb, za, 0.1))
    assert losses.cross_modal_contrastive(za, zb, 0.1).item() == pytest.approx(expect, rel=1e-9)
    # with memory-bank negatives, the batch's own slots masked out
    bank_a, bank_b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[torch.arange(5), torch.arange(5)] = False
    expect_b = 0.5 * (_nce_loop(za, zb, 0.1, bank_b, mask) + _nce_loop(zb, za, 0.1, bank_a, mask))
    got = losses.cross_modal_contrastive(za, zb, 0.1, negatives_a=bank_a, negatives_b=bank_b, neg_mask=mask)
    assert got.item() == pytest.approx(expect_b, rel=1e-9)


def _cross_domain_loop(fs, ys, ft, pt, ct, bank=None, blab=None, thr=0.8, tau=0.1, anchor="target"):
    fs, ft = _norm(fs), _norm(ft)
    if anchor == "target":
        anchors = [(ft[i], int(pt[i])) for i in range(ft.shape[0]) if ct[i] > thr]
        cands = [(fs[j], int(ys[j])) for j in range(fs.shape[0])]
    else:
        anchors = [(fs[i], int(ys[i])) for i in range(fs.shape[0])]
        cands = [(ft[j], int(pt[j])) for j in range(ft.shape[0]) if ct[j] > thr]
    if bank is not None:
        cands += [(_norm(bank)[m], int(blab[m])) for m in range(bank.shape[0]) if blab[m] >= 0]
    terms = []
    for a, la in anchors:
        num = sum(math.exp(float(a @ c) / tau) for c, lc in cands if lc == la)
        den = sum(math.exp(float(a @ c) / tau) for c, lc in cands)
        if num > 0:
            terms.append(-math.log(num / den))
    return sum(terms) / len(ft)  # every anchor of the batch counts; unconfident ones add 0


def test_cross_domain_contrastive_matches_loop():
    """Kim et al. eq. 5: confident target anchors against the source bank's entries (empty slots ignored), per
    anchor, averaged over the batch's anchors; and as written, the sums over anchors inside the log."""
    torch.manual_seed(2)
    d = 4
    ft = torch.randn(5, d, dtype=torch.float64)
    pt = torch.tensor([0, 1, 3, 2, 1])  # class 3 has no source positive
    ct = torch.tensor([0.9, 0.95, 0.99, 0.5, 0.81], dtype=torch.float64)  # sample 3 not confident
    bank = torch.randn(6, d, dtype=torch.float64)
    blab = torch.tensor([2, -1, 0, 1, 1, 0])  # slot 1 empty
    got = losses.cross_domain_contrastive(ft, pt, ct > 0.8, bank, blab, tau=0.1)
    keep = blab >= 0
    expect = _cross_domain_loop(bank[keep], blab[keep], ft, pt, ct)
    assert got.item() == pytest.approx(expect, rel=1e-9)
    got2 = losses.cross_domain_contrastive(ft, pt, ct > 0.8, bank, blab, tau=0.2)
    assert got2.item() == pytest.approx(_cross_domain_loop(bank[keep], blab[keep], ft, pt, ct, tau=0.2), rel=1e-9)
    # eq. 5 as written: -log( sum_i sum_{P_i} phi / sum_i sum_valid phi ) over the confident anchors with a positive
    f, b = _norm(ft), _norm(bank[keep])
    num = den = 0.0
    for a, la, c in zip(f, pt, ct):
        pos = [math.exp(float(a @ k) / 0.1) for k, lk in zip(b, blab[keep]) if lk == la]
        if c > 0.8 and pos:
            num += sum(pos)
            den += sum(math.exp(float(a @ k) / 0.1) for k in b)
    got3 = losses.cross_domain_contrastive(ft, pt, ct > 0.8, bank, blab, tau=0.1, reduction="sum_in_log")
    assert got3.item() == pytest.approx(-math.log(num / den), rel=1e-9)


def test_cross_domain_contrastive_no_confident_anchor_is_zero_without_nan():
    bank = torch.randn(4, 3)
    ft = torch.randn(3, 3, requires_grad=True)
    loss = losses.cross_domain_contrastive(ft, torch.tensor([0, 1, 2]), torch.tensor([False] * 3), bank,
                                           torch.tensor([0, 1, 0, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(torch.isfinite(ft.grad))
    # confident anchor without any positive: masked out, gradients finite
    ft2 = torch.randn(2, 3, requires_grad=True)
    loss2 = losses.cross_domain_contrastive(ft2, torch.tensor([5, 0]), torch.tensor([True, True]), bank,
                                            torch.tensor([0, 1, 0, 1]))
    loss2.backward()
    assert torch.isfinite(loss2) and torch.all(torch.isfinite(ft2.grad))
    assert torch.all(ft2.grad[0] == 0)


def test_cross_domain_contrastive_under_vmap():
    torch.manual_seed(3)
    ft = torch.randn(3, 5, 4)
    pt = torch.randint(0, 3, (3, 5))
    use = torch.rand(3, 5) > 0.3
    bank, blab = torch.randn(3, 7, 4), torch.randint(-1, 3, (3, 7))
    batched = vmap(losses.cross_domain_contrastive)(ft, pt, use, bank, blab)
    for i in range(3):
        assert torch.allclose(batched[i], losses.cross_domain_contrastive(ft[i], pt[i], use[i], bank[i], blab[i]),
                              atol=1e-6)


# --------------------------------------------------------------------------------------
# memory bank
# --------------------------------------------------------------------------------------
def test_update_memory_bank():
    torch.manual_seed(0)
    bank = _norm(torch.randn(6, 4))
    idx = torch.tensor([4, 1])
    feats = torch.randn(2, 4, requires_grad=True)
    new = reference.update_memory_bank(bank, idx, feats, momentum=0.5)
    assert not new.requires_grad
    for row in range(6):
        if row in (4, 1):
            f = feats[[4, 1].index(row)].detach()
            expect = _norm(0.5 * bank[row] + 0.5 * f)
            assert torch.allclose(new[row], expect, atol=1e-6)
        else:
            assert torch.equal(new[row], bank[row])
    # out of place: the input bank is untouched
    assert not torch.equal(new, bank)
    # a zero-initialised bank holds the normalised features after the first write
    first = reference.update_memory_bank(torch.zeros(6, 4), idx, feats)
    assert torch.allclose(first[idx], _norm(feats.detach()), atol=1e-6)
    labels = losses.update_memory_labels(torch.full((6,), -1), idx, torch.tensor([2, 0]))
    assert labels.tolist() == [-1, 0, -1, -1, 2, -1]


def test_update_memory_bank_under_vmap():
    bank = torch.zeros(3, 5, 2)
    idx = torch.tensor([[0, 1], [2, 3], [4, 0]])
    feats = torch.randn(3, 2, 2)
    batched = vmap(reference.update_memory_bank)(bank, idx, feats)
    for i in range(3):
        assert torch.allclose(batched[i], reference.update_memory_bank(bank[i], idx[i], feats[i]))


def test_trainer_writes_bank_rows_in_place_per_run():
    # the trainer's path: rows computed under vmap, written into the stacked banks in place after the step; the
    # result equals the out-of-place update of each run's bank, and no bank is copied
    from adapt.step import apply_writes
    torch.manual_seed(0)
    banks = _norm(torch.randn(3, 6, 4))
    labels = torch.full((3, 6), -1)
    idx = torch.tensor([[0, 5], [2, 3], [4, 0]])
    feats = torch.randn(3, 2, 4, requires_grad=True)
    want = [reference.update_memory_bank(banks[k], idx[k], feats[k], 0.5) for k in range(3)]
    rows = vmap(lambda b, i, f: losses.memory_bank_rows(b, i, f, 0.5))(banks, idx, feats)
    state = {"bank": banks, "labels": labels}
    ptrs = {k: v.data_ptr() for k, v in state.items()}
    apply_writes(state, {"bank": (idx, rows), "labels": (idx, torch.tensor([[1, 2], [3, 4], [5, 6]]))})
    assert {k: v.data_ptr() for k, v in state.items()} == ptrs
    for k in range(3):
        torch.testing.assert_close(state["bank"][k], want[k])
        assert state["labels"][k].tolist() == losses.update_memory_labels(
            torch.full((6,), -1), idx[k], torch.tensor([[1, 2], [3, 4], [5, 6]])[k]).tolist()
    assert not state["bank"].requires_grad


def test_mmsada_mmd_is_the_codes_fixed_bandwidth_biased_estimate():
    """MM-SADA model.py:521-531, mmd.py:27-54: 12 RBF kernels exp(-d^2 / g), g = 9.7 x 2^k, k = -8, -8 + sqrt 2, ...,
    summed; biased MMD^2 of the source and target halves."""
    bw = losses.MMSADA_BANDWIDTHS
    assert len(bw) == 12 and bw[0] == pytest.approx(9.7 / 256) and bw[-1] == pytest.approx(9.7 * 2 ** (-8 + 11 * 2 ** 0.5))
    torch.manual_seed(0)
    xs, xt = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64) + 0.5

    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / g) for g in bw)
    mean = lambda A, B: sum(k(a, b) for a in A for b in B) / (len(A) * len(B))  # noqa: E731
    expect = mean(xs, xs) + mean(xt, xt) - 2 * mean(xs, xt)
    assert losses.mmsada_mmd(xs, xt).item() == pytest.approx(expect, rel=1e-9)
