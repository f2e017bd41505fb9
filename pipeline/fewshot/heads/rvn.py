import torch
from torch import nn

from . import Head, register

KERNELS = {"rvn1": ((3, 3, 3), (3, 3, 3)), "rvn2": ((3, 3, 3), (3, 1, 1)), "rvn3": ((1, 3, 3), (1, 3, 3))}


class RelationVideoNetwork(Head):
    """The paper's RVN baseline: per video, the mean over T of the clip maps; support and query
    maps concatenated on channels; two Conv3d(64)+BN+ReLU, global average pooling, FC 64, FC 1,
    sigmoid. K-shot: the support maps of a class are averaged first (its centroid).

    The first convolution is linear in the concatenated channels, so it is split into a support
    half and a query half, both computed once per video (`encode`); a pair is then the sum of the
    two halves (`relate`), and a class's K support halves average to its centroid's half. This
    equals the concatenate-then-convolve network (`naive`).
    """

    consumes = "maps"
    kind = "probability"
    loss = "mse"
    variant = "rvn1"

    def __init__(self, options=None, in_dim: int | None = None, width: int = 64):
        super().__init__(options, in_dim)
        k1, k2 = KERNELS[self.variant]
        self.conv1 = nn.Conv3d(2 * in_dim, width, k1, padding=tuple(k // 2 for k in k1))
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, k2, padding=tuple(k // 2 for k in k2))
        self.bn2 = nn.BatchNorm3d(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, 1)

    def encode(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, D, t, h, w) -> (B, 2, 64, t, h, w): the support and the query half of conv1 (no bias)."""
        w = self.conv1.weight
        halves = torch.cat([w[:, :self.in_dim], w[:, self.in_dim:]])            # (128, D, k, k, k)
        out = nn.functional.conv3d(maps, halves, None, padding=self.conv1.padding)
        return out.unflatten(1, (2, w.shape[0]))

    def scores(self, support: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """support (N, K, 2, 64, ...), queries (M, 2, 64, ...) -> (M, N): each class's centroid half
        (the mean of its K support halves) against each query's query half."""
        return self.relate(support[:, :, 0].mean(1), queries[:, 1])

    def relate(self, support_proj: torch.Tensor, query_proj: torch.Tensor) -> torch.Tensor:
        """(C, 64, ...) class halves x (Q, 64, ...) query halves -> (Q, C) scores in [0, 1]."""
        c, q = len(support_proj), len(query_proj)
        h = support_proj[None] + query_proj[:, None] + self.conv1.bias.view(1, 1, -1, 1, 1, 1)
        h = torch.relu(self.bn1(h.flatten(0, 1)))
        h = torch.relu(self.bn2(self.conv2(h))).mean((2, 3, 4))
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(h)))).view(q, c)

    def naive(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Reference: concatenate every pair and run the full first convolution."""
        c, q = len(support), len(query)
        pairs = torch.cat([support[None].expand(q, -1, -1, -1, -1, -1),
                           query[:, None].expand(-1, c, -1, -1, -1, -1)], 2).flatten(0, 1)
        h = torch.relu(self.bn1(self.conv1(pairs)))
        h = torch.relu(self.bn2(self.conv2(h))).mean((2, 3, 4))
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(h)))).view(q, c)


for _name in KERNELS:
    _doc = f"RVN baseline (relation network on clip-mean maps), conv kernels {KERNELS[_name][0]}, {KERNELS[_name][1]}."
    register(_name)(type(_name.upper(), (RelationVideoNetwork,), {"__doc__": _doc, "variant": _name}))
