"""Every head that names a paper, held to its authors' published computation.

Each reference below is written anew from the authors' code (or, where there is none, the paper's
text), in plain slow form: loops over queries, classes, shots and cells, float64, the authors' order
of operations. It takes the head's own parameters, so the test compares computations, not
initialisations: scores and gradients (inputs and parameters) must agree over several
(N, K, M, T, D).
"""
import math
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from pipeline.fewshot import heads

SHAPES = [(3, 1, 4, 4, 16), (2, 3, 3, 5, 8), (4, 2, 2, 8, 12)]     # N-way, K-shot, M queries, T steps, D


def cos_sim(x, y, eps=0.01):
    """few-shot-action-recognition `utils.cos_sim` (imported by temporal_matching): x (A, D), y (B, D)
    -> (A, B), x.y / (|x| |y| + eps), one cell at a time."""
    out = torch.zeros(len(x), len(y), dtype=x.dtype)
    for a in range(len(x)):
        for b in range(len(y)):
            out[a, b] = (x[a] * y[b]).sum() / (x[a].norm() * y[b].norm() + eps)
    return out


def otam_cum_dist(d, lbda):
    """few-shot-action-recognition `model.OTAM_cum_dist` for one (L, M) distance matrix: zero padding
    column each side; first row a running sum; then the first real column from the left, upper-left
    and above, the middle from the left and upper-left, the last (padding) column from the left,
    upper-left and above; soft minimum -lbda * log(sum(exp(-x / lbda)))."""
    d = F.pad(d, (1, 1))
    rows, cols = d.shape
    cum = [[d.new_zeros(()) for _ in range(cols)] for _ in range(rows)]

    def softmin(*xs):
        return -lbda * torch.log(sum(torch.exp(-x / lbda) for x in xs))

    for m in range(1, cols):
        cum[0][m] = d[0, m] + cum[0][m - 1]
    for l in range(1, rows):
        cum[l][1] = d[l, 1] + softmin(cum[l - 1][0], cum[l - 1][1], cum[l][0])
        for m in range(2, cols - 1):
            cum[l][m] = d[l, m] + softmin(cum[l - 1][m - 1], cum[l][m - 1])
        cum[l][cols - 1] = d[l, cols - 1] + softmin(cum[l - 1][cols - 2], cum[l - 1][cols - 1], cum[l][cols - 2])
    return cum[-1][-1]


def per_class(n, k, pair_score):
    """Logits (M, N) from `pair_score(c, shot)` (M,): each class's mean over its K support videos
    (`get_video_to_class_similarity`, `CNN_OTAM`'s class mean)."""
    return torch.stack([sum(pair_score(c, s) for s in range(k)) / k for c in range(n)], 1)


def ref_cnn_otam(head, support, queries):
    """few-shot-action-recognition `model.CNN_OTAM.forward` (HyRSM's is the same): distances 1 - cos_sim
    over all steps, OTAM_cum_dist query->support (+ support->query when bidirectional), class mean,
    logits = minus the distance; times the study's weight and temperature (1 by default)."""
    o = head.options
    n, k = support.shape[:2]

    def pair(c, s):
        out = []
        for q in queries:
            d = 1 - cos_sim(q, support[c, s])
            dist = otam_cum_dist(d, o.smoothing)
            if o.bidirectional:
                dist = dist + otam_cum_dist(d.T, o.smoothing)
            out.append(-dist)
        return torch.stack(out)
    return per_class(n, k, pair) * head.weight * o.temperature


def ref_trx(head, support, queries):
    """tobyperrett/trx `model.TemporalCrossTransformer.forward` and `CNN_TRX.forward` (eval mode: no
    dropout): positional encoding x 0.1 (`PositionalEncoding`), all ordered tuples (combinations),
    k = LayerNorm(W_k x), v = W_v x; per class, each query tuple's softmax over every tuple of every
    shot scaled by sqrt(dim); prototype = sum over shots of attention x values; distance = |v_q - p|^2
    summed over tuples and dims, divided by the tuple count, negated; mean over tuple sizes."""
    n, k, t, dim_in = support.shape
    pe = torch.zeros(t, dim_in, dtype=support.dtype)
    for pos in range(t):
        for i in range(0, dim_in, 2):
            div = math.exp(i * -(math.log(10000.0) / dim_in))
            pe[pos, i] = math.sin(pos * div) * 0.1
            pe[pos, i + 1] = math.cos(pos * div) * 0.1
    out = []
    for size, k_lin, v_lin, norm in zip(head.options.tuple_sizes, head.keys, head.values, head.key_norms):
        tuples = list(combinations(range(t), size))
        d_out = k_lin.out_features

        def tup(video):
            video = video + pe
            return torch.stack([torch.cat([video[i] for i in tp]) for tp in tuples])     # (U, size * D)
        logits = torch.zeros(len(queries), n, dtype=support.dtype)
        for qi, q in enumerate(queries):
            qx = tup(q)
            qk, qv = norm(k_lin(qx)), v_lin(qx)
            for c in range(n):
                sk = [norm(k_lin(tup(support[c, s]))) for s in range(k)]
                sv = [v_lin(tup(support[c, s])) for s in range(k)]
                total = 0
                for u in range(len(tuples)):
                    att = torch.stack([(qk[u] * sk[s][w]).sum() / math.sqrt(d_out)
                                       for s in range(k) for w in range(len(tuples))]).softmax(0)
                    proto = sum(att[s * len(tuples) + w] * sv[s][w] for s in range(k) for w in range(len(tuples)))
                    total = total + ((qv[u] - proto) ** 2).sum()
                logits[qi, c] = -total / len(tuples)
        out.append(logits)
    return sum(out) / len(out) * head.weight * head.options.temperature


def ref_matching_model(head, support, queries, matching, temperature=None):
    """temporal_matching `MatchingBasedFewShotModel.forward`: clip tuples (`clip_tuples`, combinations
    of `clip_tuple_length`), `fc` + `layer_norm` (r2+1d_fc), `cos_sim`, optional joint concatenation
    of the shots (`concatenate_support_examples`), the matching function (chamfer: both directions
    averaged, ViSiL's network applied to each direction first), the mean over shots
    (`get_video_to_class_similarity`), times `temperature_weight` and `global_temperature`."""
    o = head.options
    n, k = support.shape[:2]

    def feats(video):
        if o.tuple_length > 1:
            video = torch.stack([torch.cat([video[i] for i in tp])
                                 for tp in combinations(range(len(video)), o.tuple_length)])
        if o.projection:
            video = head.layer_norm(head.fc(video))
        return video

    sup = [[feats(support[c, s]) for s in range(k)] for c in range(n)]
    logits = torch.zeros(len(queries), n, dtype=support.dtype)
    for qi, q in enumerate(queries):
        qf = feats(q)
        for c in range(n):
            if o.joint:
                sims = [cos_sim(qf, torch.cat(sup[c]))]
            else:
                sims = [cos_sim(qf, sup[c][s]) for s in range(k)]
            logits[qi, c] = sum(matching(head, s) for s in sims) / len(sims)
    return logits * head.weight * (temperature or o.temperature)


def visil_fcn(head, sim):
    """temporal_matching `VisilFCN.forward` on one (U, V) matrix, with the head's convolution weights."""
    convs = [m for m in head.fcn if isinstance(m, torch.nn.Conv2d)]
    x = sim[None, None]
    x = F.relu(F.max_pool2d(F.conv2d(x, convs[0].weight, padding=1), 2, 2))
    x = F.relu(F.max_pool2d(F.conv2d(x, convs[1].weight, padding=1), 2, 2))
    x = F.conv2d(F.conv2d(x, convs[2].weight, padding=1), convs[3].weight)
    return F.hardtanh(x)[0, 0]


def chamfer_one_way(sim):
    """temporal_matching `ChamferMatching.forward`: mean over rows of the row maximum."""
    return sum(max(sim[i]) for i in range(len(sim))) / len(sim)


MATCHING = {   # temporal_matching `src/matching_functions/*`, on one (U, V) similarity matrix
    "mean": lambda h, s: sum(sum(s[i]) for i in range(len(s))) / len(s),              # MeanMatching: sum, then mean
    "max": lambda h, s: max(max(s[i]) for i in range(len(s))),                         # MaxMatching
    "diag": lambda h, s: sum(s[i, i] for i in range(min(s.shape))) / min(s.shape),     # DiagonalMatching
    "linear": lambda h, s: (h.linear.weight[0] * s.reshape(-1)).sum(),                # LinearMatching
    "otam": lambda h, s: -0.5 * (otam_cum_dist(1 - s, 0.1) + otam_cum_dist((1 - s).T, 0.1)),    # OTAMMatching
    "chamfer": lambda h, s: 0.5 * (chamfer_one_way(s) + chamfer_one_way(s.T)),
    "visil": lambda h, s: 0.5 * (chamfer_one_way(visil_fcn(h, s)) + chamfer_one_way(visil_fcn(h, s.T))),
}


def ref_hyrsm_bimhm(head, support, queries):
    """HyRSM `models/base/few_shot.py` `CNN_HyRSM_1shot.forward`, its distance after the attention
    modules: F.normalize cosines, D = 1 - S, sum over support steps of the minimum over query steps
    plus sum over query steps of the minimum over support steps, class mean, logits = minus that."""
    n, k = support.shape[:2]

    def pair(c, s):
        out = []
        for q in queries:
            d = 1 - F.normalize(support[c, s], dim=-1) @ F.normalize(q, dim=-1).T        # (support, query)
            out.append(-(sum(min(d[i]) for i in range(len(d))) + sum(min(d[:, j]) for j in range(d.shape[1]))))
        return torch.stack(out)
    return per_class(n, k, pair)


def ref_seed_mean(head, support, queries):
    """The seed paper's mean baseline (Cao et al., section 3.3: "we average over the embedding features of
    all the samples from the same class to form a prototype"; cosine similarity to it): each video the
    mean of its clip vectors; each class the mean of its K video vectors; the score their cosine."""
    n, k = support.shape[:2]
    out = torch.zeros(len(queries), n, dtype=support.dtype)
    for qi, q in enumerate(queries):
        qv = sum(q) / len(q)
        for c in range(n):
            proto = sum(sum(support[c, s]) / len(support[c, s]) for s in range(k)) / k
            out[qi, c] = (qv * proto).sum() / (qv.norm() * proto.norm())
    return out


def ref_lstm(head, support, queries):
    """The seed paper's implicit alignment (eqs. 3-7 without peepholes, h = o * tanh(c); eq. 8-11):
    the last hidden state of a one-layer LSTM over the T clip vectors from a zero state, PyTorch's
    gate order i, f, g, o; prototype = mean of the K video vectors; score = cosine."""
    w_ih, w_hh = head.lstm.weight_ih_l0, head.lstm.weight_hh_l0
    b = head.lstm.bias_ih_l0 + head.lstm.bias_hh_l0
    hid = w_hh.shape[1]

    def video(x):
        h = c = x.new_zeros(hid)
        for xt in x:
            a = w_ih @ xt + w_hh @ h + b
            i, f, g, o = a[:hid].sigmoid(), a[hid:2 * hid].sigmoid(), a[2 * hid:3 * hid].tanh(), a[3 * hid:].sigmoid()
            c = f * c + i * g
            h = o * c.tanh()
        return h
    n, k = support.shape[:2]
    out = torch.zeros(len(queries), n, dtype=support.dtype)
    for qi, q in enumerate(queries):
        qv = video(q)
        for c in range(n):
            proto = sum(video(support[c, s]) for s in range(k)) / k
            out[qi, c] = (qv * proto).sum() / (qv.norm() * proto.norm())
    return out


def ref_rvn(head, support, queries):
    """The seed paper's RVN (section 4.2, Fig. 4-5): the class centroid map (mean of its K maps) and the
    query map concatenated on channels, then two Conv3d(64) + BatchNorm + ReLU, global average pooling,
    FC 64 + ReLU, FC 1, sigmoid; one pair at a time (BatchNorm in eval mode: running statistics)."""
    def bn(x, m):
        return ((x - m.running_mean[:, None, None, None]) / torch.sqrt(m.running_var[:, None, None, None] + m.eps)
                * m.weight[:, None, None, None] + m.bias[:, None, None, None])
    n, k = support.shape[:2]
    out = torch.zeros(len(queries), n, dtype=support.dtype)
    for qi, q in enumerate(queries):
        for c in range(n):
            x = torch.cat([sum(support[c, s] for s in range(k)) / k, q])[None]
            x = F.relu(bn(F.conv3d(x, head.conv1.weight, head.conv1.bias, padding=head.conv1.padding)[0], head.bn1))
            x = F.relu(bn(F.conv3d(x[None], head.conv2.weight, head.conv2.bias, padding=head.conv2.padding)[0], head.bn2))
            x = x.mean((1, 2, 3))
            out[qi, c] = torch.sigmoid(head.fc2(F.relu(head.fc1(x))))[0]
    return out


STUDY = dict(projection=6, weight=0.1, learn_weight=True, temperature=100.0)
CASES = [   # (head, options, reference); options small so that the loops stay fast
    ("otam", {}, ref_cnn_otam),
    ("otam", {"bidirectional": True, "smoothing": 0.5}, ref_cnn_otam),
    ("otam", dict(STUDY, bidirectional=True, temperature=50.0),     # the study's OTAM: half the sum, temperature 100
     lambda h, s, q: ref_matching_model(h, s, q, MATCHING["otam"], temperature=100.0)),
    ("trx", {"dim": 6}, ref_trx),
    ("trx", {"dim": 6, "tuple_sizes": "1,2,3", "weight": 0.5, "temperature": 3}, ref_trx),
    ("mean", dict(STUDY, form="matching"), lambda h, s, q: ref_matching_model(h, s, q, MATCHING["mean"])),
    ("max", STUDY, lambda h, s, q: ref_matching_model(h, s, q, MATCHING["max"])),
    ("max", dict(STUDY, projection=0, learn_weight=False, weight=1.0, temperature=1.0),
     lambda h, s, q: ref_matching_model(h, s, q, MATCHING["max"])),
    ("diag", STUDY, lambda h, s, q: ref_matching_model(h, s, q, MATCHING["diag"])),
    ("linear", STUDY, lambda h, s, q: ref_matching_model(h, s, q, MATCHING["linear"])),
    ("linear", dict(STUDY, tuple_length=2), lambda h, s, q: ref_matching_model(h, s, q, MATCHING["linear"])),
    ("chamfer", {"projection": 6}, lambda h, s, q: ref_matching_model(h, s, q, MATCHING["chamfer"])),
    ("chamfer", {"projection": 6, "tuple_length": 2, "joint": False},
     lambda h, s, q: ref_matching_model(h, s, q, MATCHING["chamfer"])),
    ("visil", {"projection": 6}, lambda h, s, q: ref_matching_model(h, s, q, MATCHING["visil"])),
    ("mean", {}, ref_seed_mean),
    ("lstm", {"hidden": 5}, ref_lstm),
]


def _inputs(head, n, k, m, t, d, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (d, 8, 4, 4) if head.consumes == "maps" else (t, d)
    support = torch.randn(n, k, *shape, generator=g, dtype=torch.float64)
    queries = torch.randn(m, *shape, generator=g, dtype=torch.float64)
    return support.requires_grad_(), queries.requires_grad_()


def _check(head, ref, n, k, m, t, d, seed=0):
    support, queries = _inputs(head, n, k, m, t, d, seed)
    ours, theirs = head(support, queries), ref(head, support, queries)
    assert ours.shape == theirs.shape == (m, n)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    weights = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    wrt = [support, queries] + [p for p in head.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad((ours * weights).sum(), wrt, allow_unused=True)
    g_theirs = torch.autograd.grad((theirs * weights).sum(), wrt, allow_unused=True)
    for a, b in zip(g_ours, g_theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name,options,ref", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_head_equals_its_published_computation(name, options, ref):
    for i, (n, k, m, t, d) in enumerate(SHAPES):
        if name == "visil" and t < 4:
            continue
        opts = dict(options)
        if "hidden" not in opts:
            opts["clips"] = t
        torch.manual_seed(i)
        head = heads.build(name, opts, d).double().eval()
        if name == "trx" and max(head.options.tuple_sizes) > t:
            continue
        _check(head, ref, n, k, m, t, d, seed=i)


@pytest.mark.parametrize("name", ["rvn1", "rvn2", "rvn3"])
def test_rvn_equals_the_papers_relation_network(name):
    torch.manual_seed(0)
    head = heads.build(name, {}, 6).double().eval()
    for bn in (head.bn1, head.bn2):        # running statistics away from 0 / 1, so that they count
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    for n, k, m in ((3, 1, 2), (2, 2, 3)):
        _check(head, ref_rvn, n, k, m, 0, 6)


def test_bimhm_ranks_as_hyrsm():
    """HyRSM's logits are -2T + 2T x ours (T steps each side), so ours = 1 + HyRSM / (2T) exactly."""
    for n, k, m, t, d in SHAPES:
        head = heads.build("bimhm", {"clips": t}, d).double()
        support, queries = _inputs(head, n, k, m, t, d, 0)
        torch.testing.assert_close(head(support, queries), 1 + ref_hyrsm_bimhm(head, support, queries) / (2 * t),
                                   rtol=1e-12, atol=1e-12)


def test_the_published_defaults():
    """Chamfer++: all ordered triples (56 at 8 clips), 1152, joint, weight 0.1 learnt x temperature 100;
    TRX: sizes 2 and 3, 1152, dropout 0.1; OTAM: lambda 0.1; the study's diag/max/linear/visil: 1152,
    0.1 x 100; mean: the seed paper's parameter-free prototype."""
    c = heads.build("chamfer", {}, 16)
    assert (c.options.tuple_length, c.options.tuples, c.options.projection, c.options.joint) == (3, "all", 1152, True)
    assert c.encode(torch.zeros(2, 8, 16)).shape == (2, 56, 1153)
    assert (c.weight.item(), c.weight.requires_grad, c.options.temperature) == (pytest.approx(0.1), True, 100.0)
    t = heads.build("trx", {}, 16)
    assert (t.options.tuple_sizes, t.options.dim, t.options.dropout, t.weight) == ((2, 3), 1152, 0.1, 1.0)
    assert heads.build("otam", {}, 16).options.smoothing == 0.1
    for name in ("diag", "max", "linear", "visil"):
        h = heads.build(name, {}, 16)
        assert (h.options.projection, h.weight.item(), h.options.temperature) == (1152, pytest.approx(0.1), 100.0)
    m = heads.build("mean", {}, 16)
    assert m.options.form == "prototype" and not list(m.parameters())
    assert heads.build("chamfer", {"tuples": "consecutive"}, 16).encode(torch.zeros(2, 8, 16)).shape == (2, 6, 1153)
