"""Tiny offline transformers checkpoints for the lengen-eval / engine / export tests (random init, no downloads).

``save_tiny(kind, dir)`` writes a Llama, Mistral or Qwen2 causal LM with max_position_embeddings = L (so L is the
trained context lengen-eval reads) and a tokenizer: the byte tokenizer, or a 320-token BPE with a BOS template
trained here on a little stdlib text (Llama).
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

L = 32


def bpe_tokenizer(vocab: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / f).read_text(encoding="utf-8") for f in ("abc.py", "bisect.py", "colorsys.py", "keyword.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def config(kind: str, vocab: int, **kw):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=L, tie_word_embeddings=False, bos_token_id=None,
                eos_token_id=None, pad_token_id=None)
    if kind == "llama":
        return LlamaConfig(**{**base, **kw})
    if kind == "mistral":  # a window shorter than the documents: the sliding window is exercised
        return MistralConfig(**{**base, "head_dim": 16, "sliding_window": 24, **kw})
    if kind == "qwen2":    # q/k/v biases
        return Qwen2Config(**{**base, **kw})
    raise ValueError(kind)


def save_tiny(kind: str, out: Path, *, tokenizer: str | None = None, seed: int = 0, **kw) -> Path:
    from transformers import AutoModelForCausalLM

    from lengen_fast.integrations.hf.export import byte_tokenizer

    tokenizer = tokenizer or ("bpe" if kind == "llama" else "bytes")
    tok = bpe_tokenizer() if tokenizer == "bpe" else byte_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(kind, len(tok), **kw), attn_implementation="eager")
    with torch.no_grad():  # norm weights of 1 and tiny logits make every arm look alike: spread them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(out))
    if tokenizer != "none":
        tok.save_pretrained(str(out))
    return out
