"""Small real backbones shared by tests: a byte-level BPE tokenizer in OPT's layout."""


def opt_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE trained on `texts`, laid out as OPT's: BOS = EOS = `</s>` (id 2), pad id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_opt(folder, tokenizer, *, width: int = 48, ffn: int = 96, max_positions: int = 256) -> None:
    """A 2-layer OPTForCausalLM over `tokenizer` (opt_tokenizer's ids), saved with it to `folder`."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        num_hidden_layers=2,
        ffn_dim=ffn,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        word_embed_proj_dim=width,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    OPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
