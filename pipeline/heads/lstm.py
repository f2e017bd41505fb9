import torch
from torch import nn

from . import register


@register("lstm", hidden=512)
class LSTMHead(nn.Module):
    """The paper's implicit alignment: an LSTM over the T pooled clip vectors in temporal order;
    the last hidden state is the video vector. nn.LSTM computes h = o * tanh(c); the paper's eq. 7
    prints "o + tanh(c)", a typo for the standard Hadamard product."""

    kind, consumes = "embedding", "pooled"

    def __init__(self, hidden: int = 512, in_dim: int = 768):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, _) = self.lstm(x)   # x (B, T, 768) -> h (1, B, hidden)
        return h[-1]
