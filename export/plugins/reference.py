"""Plain PyTorch statements of what each plugin computes: the kernels' test oracle and the
implementation the CPU plugin-graph executor (export/plugins/graph_pass.py) runs for plugin nodes.

The masking rules are model.gpt's (attention_keep_mask): bottom-right causal, padded keys dropped,
a query's own key always kept. Math is done in float32 and cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.gpt import attention_keep_mask


def kv_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, H, S, D]; attention_mask [B, P+S]; caches [B, H, max_seq, D], updated in place
    at positions P..P+S-1. Returns attention over cache positions 0..P+S-1, [B, H, S, D]."""
    S = q.shape[2]
    L = attention_mask.shape[1]
    past = L - S
    k_cache[:, :, past:L] = k
    v_cache[:, :, past:L] = v
    keep = attention_keep_mask(attention_mask, S, L, q.device)
    if keep is None:  # attention_keep_mask only returns None without a mask; keep it explicit anyway
        keep = torch.ones(S, L, dtype=torch.bool, device=q.device).tril(L - S)[None, None]
    y = F.scaled_dot_product_attention(q.float(), k_cache[:, :, :L].float(), v_cache[:, :, :L].float(),
                                       attn_mask=keep)
    return y.to(q.dtype)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(x + bias), approximate "tanh" (GPT-2's gelu_new) or "none" (erf, nanoGPT's nn.GELU)."""
    return F.gelu(x.float() + bias.float(), approximate=approximate).to(x.dtype)
