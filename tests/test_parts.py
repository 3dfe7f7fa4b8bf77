"""Tests for adapt.rng and adapt.parts: each part against its equation on small tensors."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, stack_module_state, vmap

from adapt import parts, rng
from tests import reference


# --------------------------------------------------------------------------------------
# rng
# --------------------------------------------------------------------------------------
def test_uniform_vmap_matches_separate_calls():
    keys = torch.tensor([0, 12345, 2**40 + 7], dtype=torch.int64)
    batched = vmap(lambda k: reference.uniform(k, (4, 5), salt=3))(keys)
    for i, k in enumerate(keys):
        assert torch.equal(batched[i], reference.uniform(k, (4, 5), salt=3))
    # a Python int key gives the same numbers as the tensor key
    assert torch.equal(reference.uniform(12345, (4, 5), salt=3), batched[1])


def test_uniform_statistics():
    u = reference.uniform(torch.tensor(42), (100_000,))
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1.0 / 12.0) < 0.003
    # no strong serial correlation between neighbouring counters
    c = np.corrcoef(u[:-1].numpy(), u[1:].numpy())[0, 1]
    assert abs(c) < 0.02


def test_keys_and_salts_give_different_streams():
    a = reference.uniform(1, (1000,))
    b = reference.uniform(2, (1000,))
    c = reference.uniform(1, (1000,), salt=1)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < 0.1
    x = torch.ones(1000)
    m1 = rng.dropout(x, 0.5, 1) != 0
    m2 = rng.dropout(x, 0.5, 2) != 0
    m3 = rng.dropout(x, 0.5, 1, salt=7) != 0
    assert (m1 != m2).float().mean() > 0.3 and (m1 != m3).float().mean() > 0.3
    # the same key is reproducible
    assert torch.equal(reference.uniform(1, (1000,)), a)


def test_fold_is_deterministic_distinct_and_vmappable():
    k = torch.tensor(7)
    subs = [rng.fold(k, s) for s in range(50)]
    assert len({int(s) for s in subs}) == 50
    assert all(int(s) >= 0 for s in subs)
    assert int(rng.fold(k, 3)) == int(rng.fold(7, 3))
    assert int(rng.fold(k, 3, 1)) != int(rng.fold(k, 1, 3))
    keys = torch.tensor([1, 2, 3])
    steps = torch.tensor([10, 10, 11])
    batched = vmap(lambda kk, st: rng.fold(kk, st, 5))(keys, steps)
    for i in range(3):
        assert int(batched[i]) == int(rng.fold(int(keys[i]), int(steps[i]), 5))


def _murmur3_32(word: int, seed: int) -> int:
    """MurmurHash3_x86_32 of one 4-byte little-endian word, in plain Python (Appleby's reference)."""
    m = 0xFFFFFFFF
    k = (word * 0xCC9E2D51) & m
    k = ((k << 15) | (k >> 17)) & m
    k = (k * 0x1B873593) & m
    h = seed ^ k
    h = ((h << 13) | (h >> 19)) & m
    h = (h * 5 + 0xE6546B64) & m
    h ^= 4
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


def test_hash_is_the_documented_murmur3_and_splitmix64():
    # the in-place int32 arithmetic (wrapping products, logical shifts) equals the reference in Python integers;
    # rng.fold_int is SplitMix64 in Python integers, checked against the int64-tensor fold below
    for key, salt in ((0, 0), (12345, 3), (2 ** 40 + 7, 2 ** 31 + 5)):
        seed = rng.fold_int(key, salt & 0xFFFFFFFF) & 0xFFFFFFFF
        counters = [0, 1, 2, 77, 1000, 4095]
        got = rng._bits(key, (4096,), salt)[counters].to(torch.int64) & 0xFFFFFFFF
        assert [int(v) for v in got] == [_murmur3_32(c, seed) for c in counters]
    for key, data in ((99, (4, 7)), (0, (0,)), (-3, (5, 2)), (2 ** 62 + 11, (10 ** 6,)), (7, ())):
        assert rng.fold_int(key, *data) == int(rng.fold(key, *data))
    # uniform keeps the top 24 bits
    u = reference.uniform(5, (10,), salt=2)
    seed = rng.fold_int(5, 2) & 0xFFFFFFFF
    assert [float(v) for v in u] == [(_murmur3_32(c, seed) >> 8) / 2 ** 24 for c in range(10)]


def test_dropout_mask_is_the_documented_b_bit_test():
    # p = 0.5: one-bit draws; 0.25 and 0.75: two bits; 0.1 and 0.9: 16 bits (p rounded up to a multiple of 2**-16)
    x = torch.ones(2, 3, 37)  # 222 elements: several words for every width, the last one partly used
    for key, salt, p, b in ((9, 0, 0.5, 1), (5, 2, 0.25, 2), (8, 1, 0.75, 2), (123, 4, 0.1, 16), (77, 1, 0.9, 16)):
        assert rng.draw_bits(p)[0] == b
        seed = rng.fold_int(key, salt) & 0xFFFFFFFF
        fields = [(_murmur3_32(c, seed) >> (b * j)) & (2 ** b - 1) for c in range(-(-222 * b // 32))
                  for j in range(32 // b)][:222]
        p32 = float(torch.tensor(p, dtype=torch.float32))
        t = int(p32 * 2 ** b) if b < 16 else math.ceil(p32 * 2 ** 16)
        want = torch.tensor([u >= t for u in fields]).reshape(x.shape)
        y = rng.dropout(x, p, key, salt=salt)
        assert torch.equal(y != 0, want)
        assert torch.allclose(y[want], torch.full_like(y[want], 1 / (1 - p)))
        assert abs(float(rng.dropout(torch.ones(100_000), p, key, salt=salt).ne(0).float().mean()) - (1 - p)) < 0.01


def test_dropout_scale_rate_and_modes():
    x = torch.ones(20_000)
    y = rng.dropout(x, 0.25, torch.tensor(3), training=True)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.75) < 0.02
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert torch.equal(rng.dropout(x, 0.25, None, training=False), x)
    assert torch.equal(rng.dropout(x, 0.0, None, training=True), x)
    with pytest.raises(ValueError):
        rng.dropout(x, 0.5, None, training=True)


def test_dropout_under_vmap_matches_separate_calls():
    keys = torch.tensor([5, 6, 7])
    x = torch.randn(3, 6, 4)
    for p in (0.5, 0.25, 0.1):  # one-bit, two-bit and 16-bit draws
        batched = vmap(lambda xx, kk: rng.dropout(xx, p, kk), randomness="error")(x, keys)
        for i in range(3):
            assert torch.equal(batched[i], rng.dropout(x[i], p, keys[i]))


# --------------------------------------------------------------------------------------
# GRL
# --------------------------------------------------------------------------------------
def test_grad_reverse_sign_and_scale():
    x = torch.randn(3, 4, requires_grad=True)
    y = parts.grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    (y * 2.0).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.6))
    x.grad = None
    reference.GradReverse(2.0)(x).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -2.0))


def test_grad_reverse_tensor_coeff_under_vmap():
    xs = torch.randn(3, 5)
    cs = torch.tensor([0.5, 1.0, 2.0])
    g = vmap(grad(lambda x, c: (parts.grad_reverse(x, c) * 3.0).sum()))(xs, cs)
    assert torch.allclose(g, -3.0 * cs[:, None].expand(3, 5))
    # outer autograd through a vmapped forward
    x = xs.clone().requires_grad_(True)
    vmap(parts.grad_reverse)(x, cs).sum().backward()
    assert torch.allclose(x.grad, -cs[:, None].expand(3, 5))


# --------------------------------------------------------------------------------------
# Embedding, discriminator, correspondence, projection
# --------------------------------------------------------------------------------------
def test_embedding_vector_and_spatial():
    torch.manual_seed(0)
    emb = parts.Embedding(8, 6, dropout=0.5)
    x = torch.randn(2, 3, 8)
    emb.eval()
    assert torch.allclose(emb(x), torch.relu(emb.fc(x)))
    emb.train()
    y = emb(x, key=torch.tensor(1))
    assert y.shape == (2, 3, 6)
    assert torch.equal(y, emb(x, key=torch.tensor(1)))
    assert not torch.equal(y, emb(x, key=torch.tensor(2)))
    sp = parts.Embedding(8, 6, dropout=0.0, spatial=True)
    m = torch.randn(2, 8, 7, 7)
    out = sp(m)
    assert out.shape == (2, 6, 7, 7)
    conv = torch.nn.functional.conv2d(m, sp.fc.weight[:, :, None, None], sp.fc.bias)
    assert torch.allclose(out, torch.relu(conv), atol=1e-6)


def test_embedding_training_is_dropout_of_relu_values_and_gradients():
    # the embedding multiplies by the mask before the ReLU (one pass fewer); values and gradients are those of
    # dropout(relu(W x + b)), for the exponent-bit mask of p = 0.5 and the converted masks of other p
    for p in (0.5, 0.25, 0.1):
        torch.manual_seed(0)
        emb = parts.Embedding(8, 6, dropout=p)
        x = torch.randn(4, 3, 8)
        key = torch.tensor(11)
        y = emb(x, key=key, salt=2)
        want = rng.dropout(torch.relu(emb.fc(x)), p, key, salt=2)
        assert torch.equal(y, want)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, list(emb.parameters()), g)
        ref = torch.autograd.grad(want, list(emb.parameters()), g)
        for a, b in zip(got, ref):
            assert torch.allclose(a, b, atol=1e-6)
        assert torch.equal(rng.keep_mask(key, (4, 3, 6), p, 2).unique().sort().values,
                           torch.tensor([0.0, 1 / (1 - p)]))
        with pytest.raises(ValueError):
            emb(x)  # training mode needs a key


def test_domain_discriminator_shape_and_reversed_gradient():
    torch.manual_seed(0)
    d = parts.DomainDiscriminator(16, hidden=100)
    assert [tuple(p.shape) for p in d.parameters()] == [(100, 16), (100,), (2, 100), (2,)]
    x = torch.randn(4, 16, requires_grad=True)
    out = d(x, coeff=0.5)
    assert out.shape == (4, 2)
    out.sum().backward()
    g_rev = x.grad.clone()
    x.grad = None
    d.fc2(torch.relu(d.fc1(x))).sum().backward()
    assert torch.allclose(g_rev, -0.5 * x.grad, atol=1e-6)


def test_correspondence_head_and_negatives():
    # MM-SADA batch_generator.py:110-119: half of a domain's clips are negatives
    from adapt.methods.mmsada import negatives
    assert [negatives(b) for b in (4, 5, 64)] == [2, 2, 32]
    rgb, flow = torch.randn(6, 3), torch.randn(6, 2)
    head = parts.CorrespondenceHead(in_dim=5, hidden=100)
    logits = head(rgb, flow)
    assert logits.shape == (6, 2)
    assert torch.allclose(logits, head.fc2(torch.relu(head.fc1(torch.cat([rgb, flow], -1)))))

def test_projection_head():
    h = parts.ProjectionHead(16, 8)
    z = h(torch.randn(5, 16))
    assert z.shape == (5, 8)
    assert torch.allclose(z.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert parts.ProjectionHead(16).fc2.out_features == 128


# --------------------------------------------------------------------------------------
# M3EM SMR (mutual refinement) and CMC (spatial consensus)
# --------------------------------------------------------------------------------------
def test_mutual_refinement_matches_equations():
    torch.manual_seed(0)
    c, r = 32, 16
    mr = parts.MutualRefinement(("rgb", "flow", "audio"), c, r, spatial=("rgb", "flow"))
    feats = {"rgb": torch.randn(2, c, 3, 3), "flow": torch.randn(2, c, 3, 3), "audio": torch.randn(2, c)}
    out = mr(feats)
    pooled = {"rgb": feats["rgb"].mean((2, 3)), "flow": feats["flow"].mean((2, 3)), "audio": feats["audio"]}

    def gate(g, f):  # eq. 1 / 3
        return torch.sigmoid(g.fc2.weight @ torch.relu(g.fc1.weight @ f + g.fc1.bias) + g.fc2.bias)

    for b in range(2):
        for m, others in [("rgb", ("flow", "audio")), ("flow", ("rgb", "audio")), ("audio", ("rgb", "flow"))]:
            ts = gate(mr.self_gates[m], pooled[m][b])
            tc = gate(mr.cross_gates[m], torch.cat([pooled[o][b] for o in others]))
            x = feats[m][b]
            if m == "audio":
                expect = torch.cat([x * ts, x * tc])
            else:
                expect = torch.cat([x * ts[:, None, None], x * tc[:, None, None]])  # eqs. 2-4
            assert torch.allclose(out[m][b], expect, atol=1e-6)
    # list input gives a list in modality order
    lst = mr([feats["rgb"], feats["flow"], feats["audio"]])
    assert all(torch.equal(a, out[m]) for a, m in zip(lst, ("rgb", "flow", "audio")))


def test_mutual_refinement_shapes_and_param_count_c1024():
    c, r = 1024, 16
    mr = parts.MutualRefinement(("rgb", "flow"), c, r)
    n_params = sum(p.numel() for p in mr.parameters())
    formula = 2 * ((2 + 2) * c * (c // r) + 2 * (c // r) + 2 * c)
    assert n_params == formula == parts.mutual_refinement_param_count([c, c], r) == 528_640
    out = mr({"rgb": torch.randn(2, c, 7, 7), "flow": torch.randn(2, c, 7, 7)})
    assert out["rgb"].shape == (2, 2 * c, 7, 7) and out["flow"].shape == (2, 2 * c, 7, 7)
    mr3 = parts.MutualRefinement(("rgb", "flow", "audio"), c, r)
    n3 = sum(p.numel() for p in mr3.parameters())
    assert n3 == 3 * ((3 + 2) * c * (c // r) + 2 * (c // r) + 2 * c) == parts.mutual_refinement_param_count([c] * 3) == 989_568


def test_correlation_map_equals_numpy_corrcoef():
    torch.manual_seed(0)
    a = torch.randn(2, 16, 3, 4, dtype=torch.float64)
    b = 0.5 * a + torch.randn(2, 16, 3, 4, dtype=torch.float64)
    cm = parts.correlation_map(a, b, centred=True, eps=0.0)
    cos = parts.correlation_map(a, b, centred=False, eps=0.0)
    for n in range(2):
        for i in range(3):
            for j in range(4):
                va, vb = a[n, :, i, j].numpy(), b[n, :, i, j].numpy()
                assert cm[n, i, j].item() == pytest.approx(np.corrcoef(va, vb)[0, 1], abs=1e-10)
                assert cos[n, i, j].item() == pytest.approx(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb), abs=1e-10)


def test_spatial_consensus_shapes_and_scales():
    c2 = 64
    sc = parts.SpatialConsensus(in_channels=c2, proj_dim=16, k=3)
    assert sc.scale_sizes(7, 7) == [(7, 7), (4, 4), (2, 2), (1, 1)]
    feats = {"rgb": torch.randn(3, c2, 7, 7), "flow": torch.randn(3, c2, 7, 7), "audio": torch.randn(3, c2)}
    pooled, cmap = sc(feats)
    assert {k: tuple(v.shape) for k, v in pooled.items()} == {"rgb": (3, c2), "flow": (3, c2), "audio": (3, c2)}
    assert cmap.shape == (3, 7, 7)
    assert float(cmap.detach().abs().max()) <= 4.0 + 1e-5
    assert torch.equal(pooled["audio"], feats["audio"])  # audio passes through
    # weighted average with residual: f = mean_ij (1 + C_ij / (k+1)) F_ij
    w = 1 + cmap / 4.0
    assert torch.allclose(pooled["rgb"], (feats["rgb"] * w[:, None]).mean((2, 3)), atol=1e-5)
    # extra leading (segment) dims are kept
    seg = {k: v.unsqueeze(1).expand(3, 2, *v.shape[1:]) for k, v in feats.items()}
    pooled_s, cmap_s = sc(seg)
    assert pooled_s["rgb"].shape == (3, 2, c2) and cmap_s.shape == (3, 2, 7, 7)
    assert torch.allclose(pooled_s["flow"][:, 1], pooled["flow"], atol=1e-5)
    # list input
    sc2 = parts.SpatialConsensus(c2, 16, k=2)
    out_l, cm2 = sc2([feats["rgb"], feats["flow"], feats["audio"]])
    assert isinstance(out_l, list) and out_l[0].shape == (3, c2) and cm2.shape == (3, 7, 7)


def test_spatial_consensus_identical_inputs_give_full_consensus():
    # the same projection for both and identical maps: every per-scale correlation is 1, so C = k+1 and
    # the weights are 1 + 1 = 2 everywhere (2 x GAP).
    torch.manual_seed(0)
    sc = parts.SpatialConsensus(in_channels=8, proj_dim=4, k=3, modalities=("rgb", "flow"))
    sc.proj["flow"].load_state_dict(sc.proj["rgb"].state_dict())
    x = torch.randn(2, 8, 7, 7)
    pooled, cmap = sc({"rgb": x, "flow": x})
    assert torch.allclose(cmap, torch.full_like(cmap, 4.0), atol=1e-4)
    assert torch.allclose(pooled["rgb"], 2 * x.mean((2, 3)), atol=1e-4)


# --------------------------------------------------------------------------------------
# temporal aggregation and TA3N attention
# --------------------------------------------------------------------------------------
def test_temporal_average():
    x = torch.randn(2, 5, 7)
    assert torch.allclose(reference.TemporalAverage()(x), x.mean(1))
    one = torch.randn(4, 1, 6, requires_grad=True)  # one window: the window itself, and the same gradient
    y = parts.time_mean(one)
    assert y.shape == (4, 6) and torch.equal(y, one.mean(1))
    y.sum().backward()
    assert torch.equal(one.grad, torch.ones_like(one))


def test_trn_multiscale_is_ta3ns_relation_module():
    """TA3N TRNmodule.py: scales 5..2, at most 3 relations each at fixed lexicographic positions ceil(i N / 3), one
    ReLU-Linear-ReLU per scale, relations summed within a scale."""
    torch.manual_seed(0)
    n, d, out_dim = 5, 6, 4
    trn = parts.TRNMultiScale(d, n, out_dim=out_dim, relations=3)
    assert trn.scales == [5, 4, 3, 2]
    got = {s: [tuple(r) for r in trn.subsets(s).tolist()] for s in trn.scales}
    assert got == {5: [(0, 1, 2, 3, 4)], 4: [(0, 1, 2, 3), (0, 1, 3, 4), (1, 2, 3, 4)],
                   3: [(0, 1, 2), (0, 2, 4), (1, 2, 4)], 2: [(0, 1), (1, 2), (2, 3)]}
    assert [m[1].in_features for m in trn.mlps] == [5 * d, 4 * d, 3 * d, 2 * d]
    assert all(isinstance(m[0], nn.ReLU) and isinstance(m[2], nn.ReLU) and len(m) == 3 for m in trn.mlps)
    x = torch.randn(3, n, d)
    per_scale = trn(x)
    assert per_scale.shape == (3, n - 1, out_dim)
    for j, (s, mlp) in enumerate(zip(trn.scales, trn.mlps)):
        expect = sum(mlp(torch.cat([x[:, t] for t in rel], dim=-1)) for rel in got[s])
        assert torch.allclose(per_scale[:, j], expect, atol=1e-5)
    every = parts.TRNMultiScale(d, n, out_dim=out_dim, relations=0)
    assert sum(every.subsets(s).shape[0] for s in every.scales) == 26

def test_domain_attention_and_attentive_entropy():
    att = parts.DomainAttention()
    logits = torch.tensor([[0.0, 0.0], [20.0, -20.0]])
    w = att.weights(logits)
    assert torch.allclose(w, torch.tensor([2 - math.log(2), 2.0]), atol=1e-5)
    feats = torch.randn(2, 3)
    assert torch.allclose(att(feats, logits), feats * w[:, None])
    # per-frame attention (B, n, d) with (B, n, 2)
    assert att(torch.randn(2, 4, 3), torch.randn(2, 4, 2)).shape == (2, 4, 3)
    y = torch.randn(4, 5)
    d = torch.randn(4, 2)
    py, pd = y.softmax(-1), d.softmax(-1)
    hy = -(py * py.log()).sum(-1)
    hd = -(pd * pd.log()).sum(-1)
    assert torch.allclose(parts.attentive_entropy(y, d), ((1 + hd) * hy).mean(), atol=1e-6)


def test_classifiers():
    x = torch.randn(4, 16)
    assert reference.Classifier(16, 8)(x).shape == (4, 8)
    v, n = reference.VerbNounClassifier(16)(x)
    assert v.shape == (4, 97) and n.shape == (4, 300)


# --------------------------------------------------------------------------------------
# composition under vmap(functional_call) with K = 3 stacked runs
# --------------------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.ModuleDict({
            "rgb": parts.Embedding(8, 16, 0.5, spatial=True),
            "flow": parts.Embedding(8, 16, 0.5, spatial=True),
            "audio": parts.Embedding(8, 16, 0.5),
        })
        self.mr = parts.MutualRefinement(("rgb", "flow", "audio"), 16, reduction=4)
        self.sc = parts.SpatialConsensus(32, 8, k=2)
        self.disc = parts.DomainDiscriminator(32, hidden=10)
        self.trn = parts.TRNMultiScale(32, 3, out_dim=12)
        self.cls = reference.Classifier(12 + 64, 5)

    def forward(self, feats, key, coeff):
        B, n = feats["audio"].shape[:2]
        e = {m: self.emb[m](x, rng.fold(key, i)) for i, (m, x) in enumerate(feats.items())}
        r = self.mr(e)
        pooled, cmap = self.sc(r)  # (B, n, 32) each
        dom = self.disc(pooled["rgb"], coeff)
        rel = self.trn(pooled["audio"]).sum(1)
        video = torch.cat([rel, pooled["rgb"].mean(1), pooled["flow"].mean(1)], -1)
        return self.cls(video), dom, cmap


def test_composition_under_vmap_functional_call_matches_separate_runs():
    torch.manual_seed(0)
    K, B, n = 3, 2, 3
    models = [_Tiny() for _ in range(K)]
    for m in models:
        m.train()
    feats = {"rgb": torch.randn(B, n, 8, 5, 5), "flow": torch.randn(B, n, 8, 5, 5), "audio": torch.randn(B, n, 8)}
    keys = torch.tensor([11, 22, 33])
    coeffs = torch.tensor([0.1, 0.5, 1.0])
    params, buffers = stack_module_state(models)
    base = _Tiny().to("meta")
    base.train()

    def run(p, b, key, coeff):
        return functional_call(base, (p, b), (feats, key, coeff))

    logits, dom, cmap = vmap(run)(params, buffers, keys, coeffs)
    assert logits.shape == (K, B, 5) and dom.shape == (K, B, n, 2) and cmap.shape == (K, B, n, 5, 5)
    loss = (logits.logsumexp(-1) - logits[..., 0]).sum() + dom.square().sum()
    loss.backward()
    for i, m in enumerate(models):
        li, di, ci = m(feats, keys[i], coeffs[i])
        assert torch.allclose(logits[i], li, atol=1e-5)
        assert torch.allclose(dom[i], di, atol=1e-5)
        assert torch.allclose(cmap[i], ci, atol=1e-5)
        ((li.logsumexp(-1) - li[..., 0]).sum() + di.square().sum()).backward()
        for name, p in m.named_parameters():
            assert torch.allclose(params[name].grad[i], p.grad, atol=1e-5), name
    # the functional form the trainer may use: vmap(grad(loss)) gives the same gradients
    def loss_fn(p, b, key, coeff):
        li, di, _ = functional_call(base, (p, b), (feats, key, coeff))
        return (li.logsumexp(-1) - li[..., 0]).sum() + di.square().sum()

    detached = {k: v.detach() for k, v in params.items()}
    g = vmap(grad(loss_fn))(detached, buffers, keys, coeffs)
    for name in params:
        assert torch.allclose(g[name], params[name].grad, atol=1e-5), name
    # different keys really gave different dropout masks
    assert not torch.allclose(logits[0], models[0](feats, keys[1], coeffs[0])[0])
