from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import EmbeddingHead, option, register


@register("lstm")
class LSTMHead(EmbeddingHead):
    """The paper's implicit alignment: an LSTM over the T pooled clip vectors in temporal order;
    the last hidden state is the video vector. The cell is the standard h = o * tanh(c); the
    paper's eq. 7 prints "o + tanh(c)", a typo for the Hadamard product.

    The parameters are an nn.LSTM's (same state_dict, same numbers); the recurrence runs in
    `last_hidden` because, for an episode's ten videos and T = 3, oneDNN's fused RNN kernel takes
    2.2 ms forward + 6.4 ms backward on 2 cores, `last_hidden` about 2 + 3 ms."""

    @dataclass
    class Options:
        hidden: int = option(512, "hidden units of the LSTM (the video vector's size)", low=1)
        clips: int = option(3, "sequence length T: clips per video, one from each of T segments", low=1)
        order_blind: bool = option(False, "feed the mean clip vector at every step: a trained control that "
                                          "cannot see order")
        peephole: bool = option(False, "the paper's eqs. 3, 4, 6: the input and forget gates also see c(t-1), "
                                       "the output gate c(t), through per-unit weights (zero at start)")

    def __init__(self, options=None, in_dim: int | None = None):
        super().__init__(options, in_dim)
        self.lstm = nn.LSTM(in_dim, self.options.hidden, batch_first=True)
        if self.options.peephole:   # W_cI, W_cf, W_co of the paper, diagonal: zero starts as the standard cell
            self.peephole = nn.Parameter(torch.zeros(3, self.options.hidden))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.options.order_blind:    # what training buys without order: every step sees the same input
            x = x.mean(1, keepdim=True).expand_as(x)
        p = self.lstm
        weights = (x, p.weight_ih_l0, p.weight_hh_l0, p.bias_ih_l0 + p.bias_hh_l0)
        if self.options.peephole:
            return peephole_last_hidden(*weights, self.peephole)
        return last_hidden(*weights)                                            # (B, T, D) -> (B, H)


class _LastHidden(torch.autograd.Function):
    """Backpropagation through time written out, so that each weight gradient is one matmul over
    all steps (autograd makes one per step and sums them: more passes over 2.6M weights).
    Step-major buffers (T, B, .) keep every per-step slice contiguous."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, bias):
        b, steps, _ = x.shape
        hid = w_hh.shape[1]
        xt = x.transpose(0, 1).reshape(steps * b, -1)                          # (T*B, D)
        acts = torch.addmm(bias, xt, w_ih.t()).view(steps, b, 4 * hid)        # gate pre-activations, then activations
        cs, tcs, hs = (x.new_empty(steps, b, hid) for _ in range(3))     # c, tanh(c), h per step
        for t in range(steps):
            a = acts[t]
            if t:
                a.addmm_(hs[t - 1], w_hh.t())
            u = a[:, 2 * hid:3 * hid].tanh()
            a.sigmoid_()[:, 2 * hid:3 * hid] = u                           # i, f, g, o: PyTorch's order
            i, f, _, o = a.chunk(4, 1)
            torch.mul(i, u, out=cs[t])
            if t:
                cs[t].addcmul_(f, cs[t - 1])
            torch.mul(o, torch.tanh(cs[t], out=tcs[t]), out=hs[t])
        ctx.save_for_backward(xt, w_ih, w_hh, acts, cs, tcs, hs)
        return hs[-1].clone()

    @staticmethod
    def backward(ctx, dh):
        xt, w_ih, w_hh, acts, cs, tcs, hs = ctx.saved_tensors
        steps, b, hid = hs.shape
        # d(activation)/d(pre-activation) of every gate: a (1 - a) for the sigmoids, 1 - g^2 for tanh
        slope = acts * (1 - acts)
        slope[:, :, 2 * hid:3 * hid] = 1 - acts[:, :, 2 * hid:3 * hid].square()
        dg = torch.empty_like(acts)                      # gradient of the gate pre-activations (T, B, 4H)
        dc = torch.zeros_like(dh)
        for t in reversed(range(steps)):
            i, f, u, o = acts[t].chunk(4, 1)
            di, df, du, do = dg[t].chunk(4, 1)
            tc = tcs[t]
            torch.mul(dh, tc, out=do)
            dc.addcmul_(dh * o, 1 - tc.square())
            torch.mul(dc, u, out=di)
            if t:
                torch.mul(dc, cs[t - 1], out=df)
            else:
                df.zero_()                               # no previous cell state
            torch.mul(dc, i, out=du)
            dg[t].mul_(slope[t])
            if t:
                dc, dh = dc * f, dg[t] @ w_hh
        flat = dg.view(steps * b, 4 * hid)
        dx = (flat @ w_ih).view(steps, b, -1).transpose(0, 1) if ctx.needs_input_grad[0] else None
        dw_ih = flat.t() @ xt
        dw_hh = dg[1:].reshape(-1, 4 * hid).t() @ hs[:-1].reshape(-1, hid)
        return dx, dw_ih, dw_hh, flat.sum(0)


def last_hidden(x, w_ih, w_hh, bias):
    """Last hidden state (B, H) of a one-layer LSTM over x (B, T, D), zero initial state."""
    return _LastHidden.apply(x, w_ih, w_hh, bias)


def peephole_last_hidden(x, w_ih, w_hh, bias, peep):
    """`last_hidden` with the paper's peephole terms (eqs. 3-7, `peep` (3, H): input, forget and output
    gates' per-unit weights on the cell state), by autograd: a slower path, kept plain."""
    pre = (x @ w_ih.t() + bias).unbind(1)                                      # T x (B, 4H)
    h = c = x.new_zeros(x.shape[0], w_hh.shape[1])
    for a in pre:
        i, f, g, o = (a + h @ w_hh.t()).chunk(4, 1)                            # PyTorch's gate order
        c = torch.sigmoid(f + peep[1] * c) * c + torch.sigmoid(i + peep[0] * c) * torch.tanh(g)
        h = torch.sigmoid(o + peep[2] * c) * torch.tanh(c)
    return h
