"""The tiny random model the tests and benchmarks build: a real engine path in seconds.

Nothing is fetched from a model hub: the tokenizer is trained on local text.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from gpu_consumers.model_source import dir_lock

__all__ = ["build_tiny_model"]

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model(out: Path, *, vocab_size: int = 4096, seed: int = 0) -> Path:
    """A 6 MB random-weight Llama with a real byte-level BPE tokenizer and chat template.

    Its text is gibberish; it exercises the real engine path (tokenize, schedule, generate,
    detokenize) in seconds. Trained on local text only.
    """
    if (out / "config.json").is_file():
        return out
    with dir_lock(out):
        if (out / "config.json").is_file():
            return out
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        specials = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        corpus = [p.read_text(errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:60]]
        tok.train_from_iterator(corpus, trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|bos|>",
            eos_token="<|end|>",
            pad_token="<|pad|>",
        )
        fast.chat_template = _CHAT_TEMPLATE
        torch.manual_seed(seed)
        config = LlamaConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(fast),
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
            pad_token_id=fast.pad_token_id,
        )
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
        try:
            LlamaForCausalLM(config).save_pretrained(str(tmp), safe_serialization=True)
            fast.save_pretrained(str(tmp))
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
