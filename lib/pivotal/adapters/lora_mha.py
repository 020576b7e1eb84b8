"""LoRA for ``nn.MultiheadAttention`` with a packed ``in_proj_weight`` (open_clip text towers).

In the webui, SDXL's second text encoder (clip_g) is an open_clip model whose attention is
``nn.MultiheadAttention``: q, k and v share one ``in_proj_weight`` of shape (3d, d), and the
output projection is applied inside ``F.multi_head_attention_forward`` without calling
``out_proj``'s own forward. So hooks on sub-modules cannot add a LoRA term; instead this layer
computes the effective weights ``W + up @ down * scale`` per call and runs the functional
attention with them. It is saved as four kohya modules ``{key}_q_proj`` / ``_k_proj`` /
``_v_proj`` / ``_out_proj``, exactly what a LoRA on the equivalent HF ``CLIPTextModel`` has.

Dropout here is rank dropout (a per-call mask over the rank dimension): with the delta folded
into the weight there is no per-token activation to drop.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pivotal.adapters.lora_layers import LoraModule
from pivotal.errors import LoraTargetError

#: Sub-module suffixes, in the order of the packed in_proj rows (q, k, v) then the output.
MHA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoraMultiheadAttention(LoraModule):
    """LoRA on q/k/v (rows of ``in_proj_weight``) and on ``out_proj`` of one MHA module.

    Parameters per projection p: ``{p}_down`` (rank, d) and ``{p}_up`` (d, rank).
    """

    def __init__(self, key: str, host: nn.MultiheadAttention, rank: int, alpha: float,
                 dropout: float = 0.0) -> None:
        super().__init__(key, host, rank, alpha, dropout)
        if not host._qkv_same_embed_dim or host.in_proj_weight is None:
            raise LoraTargetError(f"{key}: MultiheadAttention with separate q/k/v weights "
                                  "(kdim/vdim != embed_dim) is not supported")
        if host.bias_k is not None or host.add_zero_attn:
            raise LoraTargetError(f"{key}: MultiheadAttention with bias_k/add_zero_attn is not supported")
        d = host.embed_dim
        self.weights = nn.ParameterDict()
        for p in MHA_PROJECTIONS:
            down = torch.empty(rank, d)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.weights[f"{p}_down"] = nn.Parameter(down)
            self.weights[f"{p}_up"] = nn.Parameter(torch.zeros(d, rank))
        # Files written by other tools may give q/k/v/out different alphas; keep each.
        self.alphas = {p: self.alpha for p in MHA_PROJECTIONS}

    def _delta(self, p: str) -> torch.Tensor:
        """(d, d) weight delta of projection ``p``, scaled, with rank dropout when training."""
        down = self.weights[f"{p}_down"]
        if self.dropout and self.training:
            keep = torch.rand(self.rank, 1, device=down.device) >= self.dropout
            down = down * keep.to(down.dtype) / (1.0 - self.dropout)
        return self.weights[f"{p}_up"] @ down * (self.alphas[p] / self.rank * self.multiplier)

    def lora_forward(self, base_forward, query, key, value, key_padding_mask=None, need_weights=True,
                     attn_mask=None, average_attn_weights=True, is_causal=False):
        if self.multiplier == 0.0:
            return base_forward(query, key, value, key_padding_mask=key_padding_mask,
                                need_weights=need_weights, attn_mask=attn_mask,
                                average_attn_weights=average_attn_weights, is_causal=is_causal)
        mha: nn.MultiheadAttention = self.host  # type: ignore[assignment]
        w = mha.in_proj_weight
        in_delta = torch.cat([self._delta(p) for p in MHA_PROJECTIONS[:3]], dim=0)
        in_w = w + in_delta.to(w.dtype)
        out_w = mha.out_proj.weight + self._delta("out_proj").to(mha.out_proj.weight.dtype)
        batched = query.dim() == 3
        if mha.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, mha.embed_dim, mha.num_heads, in_w, mha.in_proj_bias,
            mha.bias_k, mha.bias_v, mha.add_zero_attn, mha.dropout, out_w, mha.out_proj.bias,
            training=mha.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if mha.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for p in MHA_PROJECTIONS:
            out[f"{self.key}_{p}.lora_down.weight"] = self.weights[f"{p}_down"].detach()
            out[f"{self.key}_{p}.lora_up.weight"] = self.weights[f"{p}_up"].detach()
            out[f"{self.key}_{p}.alpha"] = torch.tensor(self.alphas[p], dtype=torch.float32)
        return out

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        used: set[str] = set()
        for p in MHA_PROJECTIONS:
            for part in ("down", "up"):
                k = f"{self.key}_{p}.lora_{part}.weight"
                if k not in tensors:
                    raise LoraTargetError(f"{self.key}: missing tensor {k}")
                param = self.weights[f"{p}_{part}"]
                t = tensors[k]
                if tuple(t.shape) != tuple(param.shape):
                    raise LoraTargetError(f"{k}: shape {tuple(t.shape)} does not fit this model's "
                                          f"module (expected {tuple(param.shape)})")
                with torch.no_grad():
                    param.copy_(t.to(param.dtype))
                used.add(k)
            ak = f"{self.key}_{p}.alpha"
            if ak in tensors:
                self.alphas[p] = float(tensors[ak].float().item())
                used.add(ak)
        return used
