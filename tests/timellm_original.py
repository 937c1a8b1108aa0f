"""Hand-written copies of Time-LLM's original eager layers (layers/Embed.py PatchEmbedding and
TokenEmbedding, models/TimeLLM.py ReprogrammingLayer), written from docs/spec.md §1 with Time-LLM's class
names, attributes and submodules (including its right-only ReplicationPad1d).

The tests use them three ways: as the layer users have today (the eager baseline that bf16/fp16
results are judged against), as the source of original-format state dicts, and as what
patch_model must recognize by structure alone (timellm_fast never imports them).
"""
import math

import torch
import torch.nn as nn


class ReplicationPad1d(nn.Module):
    """Time-LLM's pad: repeats the last value `padding[-1]` times on the right."""

    def __init__(self, padding):
        super().__init__()
        self.padding = padding

    def forward(self, x):
        return torch.cat([x, x[:, :, -1:].repeat(1, 1, self.padding[-1])], dim=-1)


class TokenEmbedding(nn.Module):
    def __init__(self, c_in, d_model):
        super().__init__()
        self.tokenConv = nn.Conv1d(c_in, d_model, kernel_size=3, padding=1, padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.tokenConv.weight, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, x):
        return self.tokenConv(x.permute(0, 2, 1)).transpose(1, 2)


class PatchEmbedding(nn.Module):
    def __init__(self, d_model, patch_len, stride, dropout):
        super().__init__()
        self.patch_len = patch_len
        self.stride = stride
        self.padding_patch_layer = ReplicationPad1d((0, stride))
        self.value_embedding = TokenEmbedding(patch_len, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        n_vars = x.shape[1]
        x = self.padding_patch_layer(x)
        x = x.unfold(dimension=-1, size=self.patch_len, step=self.stride)
        x = torch.reshape(x, (x.shape[0] * x.shape[1], x.shape[2], x.shape[3]))
        return self.dropout(self.value_embedding(x)), n_vars


class ReprogrammingLayer(nn.Module):
    def __init__(self, d_model, n_heads, d_keys=None, d_llm=None, attention_dropout=0.1):
        super().__init__()
        d_keys = d_keys or (d_model // n_heads)
        self.query_projection = nn.Linear(d_model, d_keys * n_heads)
        self.key_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.value_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.out_projection = nn.Linear(d_keys * n_heads, d_llm)
        self.n_heads = n_heads
        self.dropout = nn.Dropout(attention_dropout)

    def forward(self, target_embedding, source_embedding, value_embedding):
        B, L, _ = target_embedding.shape
        S, _ = source_embedding.shape
        H = self.n_heads
        q = self.query_projection(target_embedding).view(B, L, H, -1)
        k = self.key_projection(source_embedding).view(S, H, -1)
        v = self.value_projection(value_embedding).view(S, H, -1)
        scores = torch.einsum("blhe,she->bhls", q, k)
        a = self.dropout(torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1))
        out = torch.einsum("bhls,she->blhe", a, v).reshape(B, L, -1)
        return self.out_projection(out)


class InputStage(nn.Module):
    """Time-LLM's input stage alone: patches -> reprogramming against mapped prototypes.

    Built from Time-LLM's original layers by default; pass our classes to build it with ours.
    """

    def __init__(self, d_model=16, d_llm=24, vocab=40, num_tokens=30, n_heads=2, d_keys=16,
                 patch_embedding_class=PatchEmbedding, reprogramming_class=ReprogrammingLayer):
        super().__init__()
        self.patch_embedding = patch_embedding_class(d_model, 8, 4, 0.0)
        self.word_embeddings = nn.Parameter(torch.randn(vocab, d_llm))
        self.mapping_layer = nn.Linear(vocab, num_tokens)
        self.reprogramming_layer = reprogramming_class(d_model, n_heads, d_keys, d_llm, attention_dropout=0.0)

    def forward(self, x):  # x: [B, T, N] -> [B*N, P, d_llm]
        source = self.mapping_layer(self.word_embeddings.t()).t()
        enc, _ = self.patch_embedding(x.permute(0, 2, 1))
        return self.reprogramming_layer(enc, source, source)
