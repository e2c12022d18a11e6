"""Masked mixer language model for Hugging Face transformers (written into exports by `mmscale export-hf`).

A masked mixer (B. L. Badger, "Masked Mixers for Language Generation and Retrieval", arXiv 2409.01482)
is a transformer whose attention is replaced by learned T x T matrices over token positions
(T = n_ctx, fixed), lower-triangular when causal, shared by all channels of a head:

    x = embed(ids)                                  # no positional encoding: the mixing matrix is positional
    for block in blocks:
        x = x + TokenMixing(LayerNorm(x))           # tril(W) @ x + b (per head; kernel k slides over features)
        x = x + FFN(LayerNorm(x))                   # Linear(d, f) -> GELU -> Linear(f, d)
    logits = lm_head(norm(x))                       # norm is Identity unless config.final_norm

This file is self-contained (torch and transformers only). Loading:

    AutoModelForCausalLM.from_pretrained(EXPORT, trust_remote_code=True)

The window is fixed: inputs shorter than n_ctx are padded internally with zero vectors (causal
mixing: padding after position i cannot change position i); longer inputs are an error. Positions
whose attention_mask is 0 are treated as absent: the real tokens of each row are moved to the start
of the window, so left-padded batches give the same result as unpadded rows. generate() works
through GenerationMixin without a cache (each step recomputes the window), up to n_ctx tokens.
gradient_checkpointing_enable() (and Trainer(gradient_checkpointing=True)) recompute each block in the
backward pass. Written for transformers 4.45+ and 5.x alike (tied weights as a mapping, return_dict).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput


class MaskedMixerConfig(PretrainedConfig):
    model_type = "mmscale_masked_mixer"
    # names other tools read (lm-evaluation-harness takes its max length from n_positions / n_ctx)
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "max_position_embeddings": "n_ctx",
                     "n_positions": "n_ctx", "intermediate_size": "ffn_hidden"}

    def __init__(self, vocab_size: int = 4096, d_model: int = 64, n_layers: int = 2, n_ctx: int = 64,
                 mixer: str = "flat", heads: int = 1, kernel_size: int = 1, ffn_hidden: int = 256,
                 bidirectional: bool = False, final_norm: bool = False, norm_eps: float = 1e-5,
                 init_std: float = 0.02, tie_word_embeddings: bool = False, use_cache: bool = False,
                 pad_token_id: Optional[int] = 0, bos_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None, **kwargs):
        if mixer not in ("flat", "multihead"):
            raise ValueError(f"mixer must be 'flat' or 'multihead', got {mixer!r}")
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        if mixer == "multihead" and d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.vocab_size, self.d_model, self.n_layers, self.n_ctx = vocab_size, d_model, n_layers, n_ctx
        self.mixer, self.heads, self.kernel_size, self.ffn_hidden = mixer, heads, kernel_size, ffn_hidden
        self.bidirectional, self.final_norm = bidirectional, final_norm
        self.norm_eps, self.init_std = norm_eps, init_std
        self.use_cache = False  # nothing to cache: each step recomputes the fixed window
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)


def _shift_features(x: torch.Tensor, offset: int) -> torch.Tensor:
    """y[..., c] = x[..., c + offset], zero outside (the zero padding of a Conv1d with padding k // 2)."""
    if offset == 0:
        return x
    c = x.shape[-1]
    if offset > 0:
        return F.pad(x[..., offset:], (0, min(offset, c)))
    return F.pad(x[..., :c + offset], (min(-offset, c), 0))


class TokenMixer(nn.Module):
    """`heads` x `kernel_size` learned T x T matrices over positions, masked lower-triangular when causal.

    out[b, i, h, c] = sum_t sum_j (W * mask)[h, t, i, j] x[b, j, h, c + t - k // 2]  (+ bias[i])
    """

    def __init__(self, n_ctx: int, heads: int, kernel_size: int, bias: bool, causal: bool):
        super().__init__()
        self.n_ctx, self.heads, self.kernel_size, self.causal = n_ctx, heads, kernel_size, causal
        self.weight = nn.Parameter(torch.zeros(heads, kernel_size, n_ctx, n_ctx))
        self.bias = nn.Parameter(torch.zeros(n_ctx)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        w = self.weight.to(x.dtype)
        if self.causal:
            w = w.tril()  # the mask is applied functionally; masked entries never contribute
        xh = x.reshape(b, t, self.heads, c // self.heads).transpose(1, 2)  # [B, H, T, C/H]
        out = None
        for tap in range(self.kernel_size):
            y = torch.einsum("hij,bhjc->bhic", w[:, tap], _shift_features(xh, tap - self.kernel_size // 2))
            out = y if out is None else out + y
        out = out.transpose(1, 2).reshape(b, t, c)
        return out if self.bias is None else out + self.bias.to(x.dtype)[:, None]


class MultiHeadTokenMixing(nn.Module):
    def __init__(self, d_model: int, n_ctx: int, heads: int, kernel_size: int, causal: bool):
        super().__init__()
        self.in_proj = nn.Linear(d_model, d_model)
        self.mixer = TokenMixer(n_ctx, heads, kernel_size, bias=False, causal=causal)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.mixer(self.in_proj(x)))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class MixerBlock(nn.Module):
    def __init__(self, config: MaskedMixerConfig):
        super().__init__()
        causal = not config.bidirectional
        self.mix_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        if config.mixer == "flat":
            self.mixing = TokenMixer(config.n_ctx, 1, config.kernel_size, bias=True, causal=causal)
        else:
            self.mixing = MultiHeadTokenMixing(config.d_model, config.n_ctx, config.heads, config.kernel_size, causal)
        self.ffn_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.ffn = FeedForward(config.d_model, config.ffn_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixing(self.mix_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class MaskedMixerPreTrainedModel(PreTrainedModel):
    config_class = MaskedMixerConfig
    base_model_prefix = "model"
    # transformers sets `gradient_checkpointing` and `_gradient_checkpointing_func` on every module that has the
    # attribute (4.x and 5.x alike): MaskedMixerModel has it and wraps each block
    supports_gradient_checkpointing = True
    _no_split_modules = ["MixerBlock"]
    _supports_cache_class = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, TokenMixer):  # the paper's Conv1d default, future entries zeroed
            bound = 1.0 / math.sqrt(module.n_ctx * module.kernel_size)
            with torch.no_grad():
                module.weight.uniform_(-bound, bound)
                if module.causal:
                    module.weight.copy_(module.weight.tril())
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound)


class MaskedMixerModel(MaskedMixerPreTrainedModel):
    """The residual stream: embeddings, mixer blocks and the final norm (no LM head)."""

    def __init__(self, config: MaskedMixerConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(MixerBlock(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps) if config.final_norm else nn.Identity()
        self.gradient_checkpointing = False
        self.post_init()

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            func = getattr(self, "_gradient_checkpointing_func", None)
            if func is None:  # set without gradient_checkpointing_enable(): torch's own, non-reentrant
                from torch.utils.checkpoint import checkpoint
                return checkpoint(block, x, use_reentrant=False)
            return func(block.__call__, x)
        return block(x)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs):
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if input_ids is not None else inputs_embeds
        n_ctx = self.config.n_ctx
        bsz, length = x.shape[:2]
        if length > n_ctx:
            raise ValueError(f"input length {length} exceeds the masked mixer's fixed window n_ctx = {n_ctx}; "
                             f"pass at most {n_ctx} tokens (generate: prompt + new tokens <= {n_ctx})")
        order = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            # absent positions leave the window: real tokens first (in order), zero vectors after them
            keep = attention_mask.bool()
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            x = torch.gather(x, 1, order[..., None].expand_as(x))
            live = torch.arange(length, device=x.device)[None] < keep.sum(1, keepdim=True)
            x = x * live[..., None].to(x.dtype)

        def restore(h: torch.Tensor) -> torch.Tensor:
            h = h[:, :length]
            if order is None:
                return h
            return torch.empty_like(h).scatter_(1, order[..., None].expand_as(h), h)

        if length < n_ctx:
            x = F.pad(x, (0, 0, 0, n_ctx - length))
        states = []
        for block in self.blocks:
            if output_hidden_states:
                states.append(restore(x))
            x = self._run_block(block, x)
        last = restore(self.norm(x))
        if output_hidden_states:
            states.append(last)
        hidden_states = tuple(states) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (last, hidden_states) if v is not None)
        return BaseModelOutput(last_hidden_state=last, hidden_states=hidden_states)


class MaskedMixerForCausalLM(MaskedMixerPreTrainedModel, GenerationMixin):
    # target -> source (transformers 5 reads a mapping; 4.x iterates the keys); tied only when
    # config.tie_word_embeddings
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: MaskedMixerConfig):
        super().__init__(config)
        self.model = MaskedMixerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs):
        """labels [B, L] (HF convention): position t predicts labels[:, t + 1]; -100 is ignored."""
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100)
        if not return_dict:
            rest = (logits,) + ((out.hidden_states,) if out.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        # no cache: every step sees the whole sequence so far (the window fills in place)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """GenerationMixin.generate, refusing up front to run past the fixed window of n_ctx tokens."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is None and kwargs.get("inputs_embeds") is not None:
            ids = kwargs["inputs_embeds"]
        prompt = ids.shape[1] if ids is not None else 1
        gc = generation_config if generation_config is not None else self.generation_config
        max_new = kwargs.get("max_new_tokens", getattr(gc, "max_new_tokens", None))
        max_len = kwargs.get("max_length", getattr(gc, "max_length", None))
        total = prompt + max_new if max_new is not None else max_len
        n_ctx = self.config.n_ctx
        if total is not None and total > n_ctx:
            raise ValueError(f"the masked mixer's window is fixed at n_ctx = {n_ctx} tokens, but this call asks for "
                             f"{total} (prompt {prompt} + new tokens); pass max_new_tokens <= {n_ctx - prompt}")
        return super().generate(inputs=inputs, generation_config=generation_config, **kwargs)
