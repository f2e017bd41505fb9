import torch
from torch import nn

from . import register

KERNELS = {"rvn1": ((3, 3, 3), (3, 3, 3)), "rvn2": ((3, 3, 3), (3, 1, 1)), "rvn3": ((1, 3, 3), (1, 3, 3))}


class RelationVideoNetwork(nn.Module):
    """The paper's RVN baseline: per video, the mean over T of the clip maps; support and query
    maps concatenated on channels; two Conv3d(64)+BN+ReLU, global average pooling, FC 64, FC 1,
    sigmoid. K-shot: the support maps of a class are averaged first (its centroid).

    The first convolution is linear in the concatenated channels, so it is split into a support
    half and a query half (`project`), computed once per video; a pair is then the sum of the two
    halves (`relate`). `forward` composes them and equals the concatenate-then-convolve network.
    """

    kind, consumes = "relation", "maps"

    def __init__(self, variant: str = "rvn1", in_dim: int = 768, width: int = 64):
        super().__init__()
        k1, k2 = KERNELS[variant]
        self.conv1 = nn.Conv3d(2 * in_dim, width, k1, padding=tuple(k // 2 for k in k1))
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, k2, padding=tuple(k // 2 for k in k2))
        self.bn2 = nn.BatchNorm3d(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, 1)
        self.in_dim = in_dim

    def project(self, maps: torch.Tensor, side: str) -> torch.Tensor:
        """(B, 768, t, h, w) -> (B, 64, t, h, w): the support (side "s") or query ("q") half of conv1."""
        w = self.conv1.weight[:, :self.in_dim] if side == "s" else self.conv1.weight[:, self.in_dim:]
        return nn.functional.conv3d(maps, w, None, padding=self.conv1.padding)

    def relate(self, support_proj: torch.Tensor, query_proj: torch.Tensor) -> torch.Tensor:
        """(C, 64, ...) class halves x (Q, 64, ...) query halves -> (Q, C) scores in [0, 1]."""
        c, q = len(support_proj), len(query_proj)
        h = support_proj[None] + query_proj[:, None] + self.conv1.bias.view(1, 1, -1, 1, 1, 1)
        h = torch.relu(self.bn1(h.flatten(0, 1)))
        h = torch.relu(self.bn2(self.conv2(h))).mean((2, 3, 4))
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(h)))).view(q, c)

    def forward(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """support (C, 768, t, h, w) class centroids, query (Q, 768, t, h, w) -> (Q, C)."""
        return self.relate(self.project(support, "s"), self.project(query, "q"))

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
    register(_name, variant=_name)(type(_name.upper(), (RelationVideoNetwork,), {"__doc__": _doc}))
