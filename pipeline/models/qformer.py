"""The BLIP-2 Q-Former baseline connector (model.connector: qformer), for comparisons.

    feats [B, N, Dv] -> ln_vision -> Q-Former(32 learned queries, cross-attention to feats every
    `cross_attention_freq` layers) -> [B, 32, 768] -> proj2 -> [B, 32, D_llm]

transformers' Blip2QFormerModel, initialised like BLIP-2: self-attention and FFN from a BERT
checkpoint (the FFN copied into the query FFN), cross-attention and queries random (std 0.02). Here
it is trained single-stage with the LM loss only, like SimVLG, so the two connectors compare directly.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import QFormerConfig

from .llm import hf_config_from_json


def qformer_config(bert_cfg, cfg: QFormerConfig, vision_width: int):
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(
        vocab_size=bert_cfg.vocab_size,
        hidden_size=bert_cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=bert_cfg.num_attention_heads,
        intermediate_size=bert_cfg.intermediate_size,
        hidden_act=bert_cfg.hidden_act,
        hidden_dropout_prob=bert_cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=bert_cfg.attention_probs_dropout_prob,
        max_position_embeddings=bert_cfg.max_position_embeddings,
        layer_norm_eps=bert_cfg.layer_norm_eps,
        cross_attention_frequency=cfg.cross_attention_freq,
        encoder_hidden_size=vision_width,
    )


def bert_to_qformer(bert_state: dict, qformer: nn.Module) -> dict:
    """Rename BertModel weights to Blip2QFormerModel's (only keys the Q-Former has)."""
    out = {}
    for k, v in bert_state.items():
        k = k.removeprefix("bert.")
        if k.startswith("embeddings.LayerNorm."):
            out[k.replace("embeddings.LayerNorm.", "layernorm.")] = v
        elif k.startswith("encoder.layer."):
            k = k.replace(".attention.self.", ".attention.attention.")
            out[k] = v
            out[
                k.replace(".intermediate.", ".intermediate_query.")
                .replace(".output.dense", ".output_query.dense")
                .replace(".output.LayerNorm", ".output_query.LayerNorm")
            ] = v
    own = qformer.state_dict()
    return {k: v for k, v in out.items() if k in own and own[k].shape == v.shape}


def build_qformer(cfg: QFormerConfig, vision_width: int, *, meta: bool = False):
    """-> (Blip2QFormerModel, query_tokens [1, Q, C] parameter)."""
    from transformers import AutoModel, BertConfig, Blip2QFormerModel

    if meta or cfg.init is None:
        if cfg.arch_config is None:
            raise ValueError("model.qformer.arch_config is needed without init weights / on meta")
        bert_cfg, bert_state = hf_config_from_json(cfg.arch_config), None
    else:
        bert = AutoModel.from_pretrained(cfg.init, dtype=torch.float32)
        bert_cfg, bert_state = bert.config, bert.state_dict()
    if not isinstance(bert_cfg, BertConfig) and not hasattr(bert_cfg, "intermediate_size"):
        raise ValueError("the Q-Former is initialised from a BERT-family config")
    qcfg = qformer_config(bert_cfg, cfg, vision_width)
    with torch.device("meta" if meta else "cpu"):
        qformer = Blip2QFormerModel(qcfg)
        query_tokens = nn.Parameter(torch.empty(1, cfg.num_queries, qcfg.hidden_size))
    if not meta:
        nn.init.normal_(query_tokens, std=qcfg.initializer_range)
        if bert_state is not None:
            sd = bert_to_qformer(bert_state, qformer)
            missing, _ = qformer.load_state_dict(sd, strict=False)
            lacking = [k for k in missing if "crossattention" not in k]
            if lacking:
                raise ValueError(f"{cfg.init}: no BERT weights for {lacking[:4]}")
    return qformer, query_tokens
